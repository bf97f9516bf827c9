"""QLoRA on CPU with chosen sizes: `peft-fast bench --suite qlora` (bench/qlora.py, which says
what is measured and how) with --reps/--steps/--tokens instead of a preset.

    python bench/bench_qlora.py [--reps 3] [--steps 4] [--tokens 128] [--note TEXT] [--out DIR]

Writes `<out>/cpu-qlora-<date>.json` (default out: bench/results/), the same record the suite writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from peft_fast_bench import qlora
from peft_fast_bench.timing import device_name, make_record, write_record


def main(argv: list[str] | None = None) -> Path:
    """Run the qlora suite on the 100M model with the given sizes; returns the record's path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds over the cases")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per case (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per step (batch 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (default %(default)s)")
    parser.add_argument("--note", default="", help="free text saved with the results (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="directory for the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = {**qlora.PRESETS["full"], "reps": args.reps, "steps": args.steps, "tokens": args.tokens}
    device = torch.device("cpu")
    rows, extra = qlora.run(preset, device)
    print(f"\n[qlora] on {device_name(device)}")
    print(qlora.table(rows))
    argv = sys.argv[1:] if argv is None else argv
    record = make_record("qlora", device, rows, argv=argv, extra={"preset": "custom", "note": args.note, **extra})
    record["command"] = " ".join(["python bench/bench_qlora.py", *argv])
    path = write_record(args.out, record)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
