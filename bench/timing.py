"""Timing and records, shared by every suite: medians, device names, versions, and the JSON
record each run writes (device, versions, date, command, timer, raw numbers).

On CUDA a time is `triton.testing.do_bench`'s median (CUDA events, after warm-up, with the
gradients of `grads` reset between runs). On CPU the variants of one case are timed in
interleaved rounds (variant a, b, c, then b, c, a, ...) with `time.perf_counter`, and each
variant's median over the rounds is reported: load from other processes then falls on every
variant alike, so the ratios between them stay meaningful on a shared machine.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

CPU_ROUNDS = 21
CPU_TIMER = "time.perf_counter, median of interleaved rounds, 1 CPU thread"
CUDA_TIMER = "triton.testing.do_bench median (CUDA events)"


def median_times_ms(
    fns: Mapping[str, Callable[[], object]],
    *,
    cuda: bool,
    grads: Mapping[str, Sequence[torch.Tensor]] | None = None,
    rounds: int = CPU_ROUNDS,
    warmup_s: float = 0.05,
) -> dict[str, float]:
    """Median milliseconds of each callable in `fns` (same keys, same order).

    `grads[name]` lists tensors whose `.grad` is reset to None before each call of `fns[name]`
    (so backward timings do not include accumulation). On CPU, `rounds` interleaved rounds
    follow a warm-up of at least two calls and `warmup_s` seconds per callable."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    grads = grads or {}
    if cuda:
        from triton.testing import do_bench

        return {
            name: float(do_bench(fn, grad_to_none=list(grads.get(name, ())) or None, return_mode="median"))
            for name, fn in fns.items()
        }

    def once(name: str) -> float:
        for t in grads.get(name, ()):
            t.grad = None
        t0 = time.perf_counter()
        fns[name]()
        return (time.perf_counter() - t0) * 1e3

    names = list(fns)
    for name in names:
        until = time.perf_counter() + warmup_s
        once(name)
        while time.perf_counter() < until:
            once(name)
        once(name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            samples[name].append(once(name))
    return {name: statistics.median(samples[name]) for name in names}


def phase_times_ms(
    fwds: Mapping[str, Callable[[], torch.Tensor]],
    dy: torch.Tensor,
    *,
    cuda: bool,
    grads: Mapping[str, Sequence[torch.Tensor]],
    rounds: int = CPU_ROUNDS,
) -> dict[str, tuple[float, float, float]]:
    """Per variant of `fwds` (each returns an output of dy's shape): the median forward,
    backward (of one retained graph, output gradient `dy`) and forward+backward milliseconds,
    each phase timed across all variants as `median_times_ms` does."""
    fwd = median_times_ms(fwds, cuda=cuda, grads=grads, rounds=rounds)
    outs = {name: f() for name, f in fwds.items()}
    bwd = median_times_ms(
        {name: (lambda o=outs[name]: o.backward(dy, retain_graph=True)) for name in fwds},
        cuda=cuda,
        grads=grads,
        rounds=rounds,
    )
    outs.clear()
    both = median_times_ms(
        {name: (lambda f=f: f().backward(dy)) for name, f in fwds.items()}, cuda=cuda, grads=grads, rounds=rounds
    )
    return {name: (fwd[name], bwd[name], both[name]) for name in fwds}


def median_ms(
    fn: Callable[[], object], *, cuda: bool, grads: Sequence[torch.Tensor] = (), rounds: int = CPU_ROUNDS
) -> float:
    """Median milliseconds of one callable (see `median_times_ms`)."""
    return median_times_ms({"fn": fn}, cuda=cuda, grads={"fn": grads}, rounds=rounds)["fn"]


def device_name(device: torch.device) -> str:
    """A readable name of the device: the GPU's name, or "CPU (<processor>)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def device_slug(name: str) -> str:
    """The device's name for file names: "NVIDIA H200" -> "nvidia-h200", any CPU -> "cpu"."""
    if name.startswith("CPU"):
        return "cpu"
    return "-".join("".join(ch if ch.isalnum() else " " for ch in name.lower()).split())


def versions() -> dict[str, str]:
    """Versions of python, torch, CUDA, triton, peft, transformers and peft_fast."""
    import peft_fast

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for mod in ("triton", "peft", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # absent or broken: say so in the record rather than fail the run
            out[mod] = f"unavailable ({type(e).__name__})"
    out["peft_fast"] = peft_fast.__version__
    return out


def make_record(
    suite: str,
    device: torch.device,
    rows: Sequence[Any],
    *,
    argv: Sequence[str] | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record of one suite's run. `rows` are dataclasses or dicts (the raw numbers);
    `argv` the arguments of `peft-fast bench` (None: this process's own)."""
    cuda = device.type == "cuda"
    now = _dt.datetime.now(_dt.timezone.utc)
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "suite": suite,
        "device": device_name(device),
        "kind": "gpu" if cuda else "cpu (harness check; GPU numbers are not measured here)",
        "versions": versions(),
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["peft-fast bench", *args]),
        "timer": CUDA_TIMER if cuda else CPU_TIMER,
        **(extra or {}),
        "rows": [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows],
    }


def record_path(out_dir: Path, record: Mapping[str, Any]) -> Path:
    """`out_dir/<device>-<suite>-<YYYYmmdd-HHMMSS>.json` for a record made by `make_record`."""
    stamp = _dt.datetime.fromisoformat(record["date"]).strftime("%Y%m%d-%H%M%S")
    return Path(out_dir) / f"{device_slug(record['device'])}-{record['suite']}-{stamp}.json"


def write_record(out_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write `record` as JSON under `out_dir` (created if needed); return the file's path."""
    path = record_path(out_dir, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
