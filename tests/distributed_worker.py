"""One rank of tests/test_distributed.py's 2-process runs (not a test module).

Started by the test as WORLD_SIZE plain processes with the variables torchrun sets (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR; MASTER_PORT per run), each in its own working folder, so a file
written by a rank other than 0 shows up in that rank's folder. For each run given on the
command line (MODE:BACKEND:PORT) it calls `peft-fast train` exactly as a torchrun launch would
(MODE "accelerate": with the variables of `accelerate launch` and an fsdp_version 2 config, and
no --distributed), saving to the relative folder MODE-BACKEND; `peft-fast train` initialises and destroys the
process group itself. Dispatch's fallback notes (debug level) go to stderr, so the test can
check that the Triton backend ran rather than fell back.

    python distributed_worker.py MODEL DATA ddp:torch:29500 fsdp2:triton:29501 ...
"""

from __future__ import annotations

import logging
import os
import sys

from peft_fast.cli import main


def run_all(model: str, data: str, runs: list[str]) -> int:
    """Train each MODE:BACKEND:PORT run in turn; the first nonzero exit status, else 0."""
    for spec in runs:
        mode, backend, port = spec.split(":")
        os.environ["MASTER_PORT"] = port
        args = ["train", "--model", model, "--data", data, "--backend", backend]
        if mode == "accelerate":  # what `accelerate launch` sets with an fsdp_version 2 config
            os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_CPU_RAM_EFFICIENT_LOADING="false")
        else:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
            args += ["--distributed", mode]
        args += ["--steps", "2", "--batch-size", "4", "--dropout", "0", "--seed", "0"]
        rc = main(args + ["--output-dir", f"{mode}-{backend}"])
        print(f"[rank {os.environ['RANK']}] {spec}: exit {rc}", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("peft_fast.ops.dispatch").setLevel(logging.DEBUG)
    status = run_all(sys.argv[1], sys.argv[2], sys.argv[3:])
    # The exit status is the runs' (each printed above). os._exit skips interpreter finalization:
    # after five process groups set up and destroyed in one process, gloo's C++ threads were once
    # torn down at finalization and aborted the process ("terminate called without an active
    # exception", SIGABRT) after every run had exited 0 (CI on a loaded machine, 29 Nov).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
