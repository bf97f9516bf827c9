"""`peft-fast bench`: time LoRA linear layers, ours against bare cuBLAS and HF peft.

On a CUDA GPU (bf16 base): for each shape K→N, tokens M, rank r and dropout p it times, in
the same run, with `triton.testing.do_bench` medians:

  linear        bare frozen `F.linear` (forward; backward = input grad only)
  peft_bf16     HF peft's lora.Linear with bf16 adapters
  peft_fp32     HF peft's lora.Linear with fp32 adapters (peft's default under autocast_adapter_dtype)
  triton_bf16   peft_fast.ops.lora_linear on the "triton" backend, bf16 adapters
  triton_fp32   the same with fp32 adapters
  cuda_bf16     peft_fast.ops.lora_linear on the "cuda" backend (csrc/), bf16 adapters
  cuda_fp32     the same with fp32 adapters

A kernel backend that is unavailable (no Triton, CUDA kernels not built) is left out of the
table with a note saying why.

forward, backward and forward+backward separately, the peak memory of one
forward+backward, and each time as a ratio over `linear` of the same phase. Results go to
stdout as a table and to JSON in bench/results/ (device, versions, date, command, raw
numbers), with a PNG plot beside it when matplotlib is importable.

`--write-table` (GPU only) also rewrites peft_fast/ops/backend_table.json: per shape class
(token buckets, see dispatch.shape_class) the backends ordered by their median
forward+backward time in this run, which "auto" then follows.

Without a GPU the same command times the torch reference path on small CPU shapes (wall
clock medians) so the harness itself is exercised; such a file is labelled CPU, and GPU
numbers are not measured by it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

GPU_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
GPU_TOKENS = [2048, 8192, 16384]
GPU_RANKS = [8, 16, 64]
DROPOUTS = [0.0, 0.1]
QUICK = {"shapes": [(4096, 4096), (4096, 14336)], "tokens": [8192], "ranks": [16], "dropouts": DROPOUTS}
CPU = {"shapes": [(256, 256), (256, 512)], "tokens": [128], "ranks": [8], "dropouts": [0.0]}


@dataclass
class Row:
    """One variant of one case: times in milliseconds, memory in MiB."""

    K: int
    N: int
    M: int
    r: int
    dropout: float
    variant: str
    fwd_ms: float
    bwd_ms: float
    fwd_bwd_ms: float
    peak_mib: float
    fwd_ratio: float = float("nan")
    bwd_ratio: float = float("nan")
    fwd_bwd_ratio: float = float("nan")


def _median_ms(fn: Callable[[], object], grads: list[torch.Tensor], cuda: bool) -> float:
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, grad_to_none=grads, return_mode="median"))

    def once() -> float:
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    warm_until = time.perf_counter() + 0.2  # thread pools and allocator warm up first
    while time.perf_counter() < warm_until:
        once()
    times = [once() for _ in range(21)]
    return statistics.median(times)


def _peft_layer(K: int, N: int, r: int, p: float, weight: torch.Tensor, adapter_dtype: torch.dtype) -> nn.Module:
    import peft

    base = nn.Sequential(nn.Linear(K, N, bias=False, device=weight.device, dtype=weight.dtype))
    base[0].weight.data.copy_(weight)
    base[0].weight.requires_grad_(False)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False)
    layer = peft.inject_adapter_in_model(cfg, base)[0]
    layer.lora_A["default"].to(adapter_dtype)
    layer.lora_B["default"].to(adapter_dtype)
    return layer.train()


def _time_variant(fwd, x, dy, params, cuda) -> tuple[float, float, float, float]:
    grads = [x] + params
    fwd_ms = _median_ms(fwd, grads, cuda)
    out = [fwd()]
    bwd_ms = _median_ms(lambda: out[0].backward(dy, retain_graph=True), grads, cuda)
    out.clear()
    tot_ms = _median_ms(lambda: fwd().backward(dy), grads, cuda)
    peak = float("nan")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd().backward(dy)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return fwd_ms, bwd_ms, tot_ms, peak


def run_case(K: int, N: int, M: int, r: int, p: float, device: torch.device) -> list[Row]:
    """Time every variant of one case; ratios are over bare `linear` of the same phase."""
    import peft_fast

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    variants: dict[str, tuple[Callable[[], torch.Tensor], list[torch.Tensor]]] = {
        "linear": (lambda: F.linear(x, W), []),
    }
    backends = kernel_backends() if cuda else ["torch"]
    for ad in (torch.bfloat16, torch.float32) if cuda else (torch.float32,):
        tag = "bf16" if ad == torch.bfloat16 else "fp32"
        try:
            layer = _peft_layer(K, N, r, p, W, ad)
        except ImportError:
            layer = None
        if layer is not None:
            variants[f"peft_{tag}"] = (layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
        A = (torch.randn(r, K, generator=g) / K**0.5).to(device, ad).requires_grad_()
        B = (torch.randn(N, r, generator=g) / r**0.5).to(device, ad).requires_grad_()
        for backend in backends:

            def ours(A=A, B=B, backend=backend):
                with peft_fast.use_backend(backend):
                    return peft_fast.ops.lora_linear(x, W, None, A, B, 2.0, p, True)

            variants[f"{backend}_{tag}"] = (ours, [A, B])
    rows = []
    for name, (fwd, params) in variants.items():
        fx = (lambda m=fwd: m(x)) if isinstance(fwd, nn.Module) else fwd
        rows.append(Row(K, N, M, r, p, name, *_time_variant(fx, x, dy, params, cuda)))
    base = rows[0]
    for row in rows:
        row.fwd_ratio = row.fwd_ms / base.fwd_ms
        row.bwd_ratio = row.bwd_ms / base.bwd_ms
        row.fwd_bwd_ratio = row.fwd_bwd_ms / base.fwd_bwd_ms
    return rows


def kernel_backends() -> list[str]:
    """The kernel backends to time here ("triton", "cuda"), each printed once when unavailable."""
    from peft_fast.ops import dispatch

    out = []
    for b in ("triton", "cuda"):
        why = dispatch.unavailable_reason(b)
        if why is None:
            out.append(b)
        elif b not in _said_unavailable:
            _said_unavailable.add(b)
            print(f"bench: backend {b!r} left out: {why}")
    return out


_said_unavailable: set[str] = set()


def backend_table(rows: list[Row], source: str, device: str) -> dict:
    """backend_table.json's content from this run's rows: for lora_linear, per shape class,
    backends ordered by median forward+backward time (bf16 adapters; ties keep name order)."""
    from peft_fast.ops import dispatch

    by_class: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        backend, _, tag = row.variant.partition("_")
        if backend not in dispatch.FALLBACK_ORDER or tag != "bf16":
            continue
        cls = dispatch.shape_class(torch.empty(row.M, 1, device="meta"))
        by_class.setdefault(cls, {}).setdefault(backend, []).append(row.fwd_bwd_ms)
    entries = {cls: sorted(times, key=lambda b: statistics.median(times[b])) for cls, times in sorted(by_class.items())}
    return {
        "about": "Backend order 'auto' uses per op and shape class, fastest first, from the bench run in "
        "'source' (median forward+backward ms, bf16 adapters). Regenerate with `peft-fast bench --write-table`.",
        "source": source,
        "device": device,
        "entries": {"lora_linear": entries} if entries else {},
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for mod in ("triton", "peft", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:
            out[mod] = f"unavailable ({type(e).__name__})"
    import peft_fast

    out["peft_fast"] = peft_fast.__version__
    return out


def _table(rows: list[Row]) -> str:
    head = f"{'K→N':>12} {'M':>6} {'r':>3} {'p':>4} {'variant':<12} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'f+b/lin':>7} {'peak MiB':>9}"  # noqa: E501
    lines = [head, "-" * len(head)]
    for w in rows:
        lines.append(
            f"{f'{w.K}→{w.N}':>12} {w.M:>6} {w.r:>3} {w.dropout:>4} {w.variant:<12} {w.fwd_ms:>8.3f} "
            f"{w.bwd_ms:>8.3f} {w.fwd_bwd_ms:>8.3f} {w.fwd_bwd_ratio:>7.2f} {w.peak_mib:>9.1f}"
        )
    return "\n".join(lines)


def _plot(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = [v for v in dict.fromkeys(r.variant for r in rows) if v != "linear"]
    cases = list(dict.fromkeys((r.K, r.N, r.M, r.r, r.dropout) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, len(cases) * 0.6), 4))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ratios = {(r.K, r.N, r.M, r.r, r.dropout): r.fwd_bwd_ratio for r in rows if r.variant == v}
        ax.bar([c + i * width for c in range(len(cases))], [ratios.get(c, float("nan")) for c in cases], width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{K}→{N}\nM={M} r={r} p={p}" for K, N, M, r, p in cases], fontsize=6, rotation=90)
    ax.set_ylabel("forward+backward time / bare linear")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table, write JSON (and PNG) under --out. Returns 0 on success."""
    parser = argparse.ArgumentParser(prog="peft-fast bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few-minute subset of the GPU shapes")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>-<date>.json)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument(
        "--suite",
        choices=("lora", "sgmv"),
        default="lora",
        help="lora: one adapter per layer (default); sgmv: many adapters in one batch (bench_sgmv.py)",
    )
    parser.add_argument(
        "--write-table", action="store_true", help="GPU only: rewrite peft_fast/ops/backend_table.json from this run"
    )
    args = parser.parse_args(argv)
    if args.suite == "sgmv":
        return _main_sgmv(args, argv)

    cuda = torch.cuda.is_available()
    if args.write_table and not cuda:
        parser.error("--write-table needs a CUDA GPU: the table orders GPU backends by measured time")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        preset = (
            QUICK
            if args.quick
            else {"shapes": GPU_SHAPES, "tokens": GPU_TOKENS, "ranks": GPU_RANKS, "dropouts": DROPOUTS}
        )
        device_name = torch.cuda.get_device_name(device)
    else:
        preset = CPU
        device_name = f"CPU ({platform.processor() or platform.machine()})"
        print("No CUDA GPU: timing the torch reference path on small CPU shapes. GPU numbers are not measured.")
        torch.set_num_threads(1)  # one thread: stable medians on shared CPU machines
    rows: list[Row] = []
    for K, N in preset["shapes"]:
        for M in preset["tokens"]:
            for r in preset["ranks"]:
                for p in preset["dropouts"]:
                    rows.extend(run_case(K, N, M, r, p, device))
                    if cuda:
                        torch.cuda.empty_cache()
    print(_table(rows))

    now = _dt.datetime.now(_dt.timezone.utc)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
    out = args.out or Path("bench/results") / f"{'cpu' if not cuda else slug}-{now:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "device": device_name,
        "kind": "gpu" if cuda else "cpu (reference path only; GPU numbers not measured)",
        "versions": _versions(),
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["peft-fast bench"] + (sys.argv[1:] if argv is None else list(argv))),
        "timer": "triton.testing.do_bench median (CUDA events)"
        if cuda
        else "time.perf_counter median of 21, 1 CPU thread",
        "dtype": "bf16 base" if cuda else "fp32",
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    if args.write_table:
        from peft_fast.ops import dispatch

        table = backend_table(rows, str(out), device_name)
        dispatch.BACKEND_TABLE.write_text(json.dumps(table, indent=1) + "\n")
        dispatch._table_cache = None  # this process follows the new table too
        print(f"wrote {dispatch.BACKEND_TABLE}")
    if not args.no_plot and _plot(rows, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    return 0


def _record(device_name: str, cuda: bool, argv: list[str] | None, timer_note: str, rows: list, extra: dict) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "device": device_name,
        "kind": "gpu" if cuda else "cpu (reference path only; GPU numbers not measured)",
        "versions": _versions(),
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["peft-fast bench"] + (sys.argv[1:] if argv is None else list(argv))),
        "timer": "triton.testing.do_bench median (CUDA events)" if cuda else timer_note,
        **extra,
        "rows": [asdict(r) for r in rows],
    }


def _main_sgmv(args: argparse.Namespace, argv: list[str] | None) -> int:
    from . import bench_sgmv

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = bench_sgmv.cpu_name()
        print("No CUDA GPU: timing the torch variants on small CPU shapes. GPU numbers are not measured.")
        torch.set_num_threads(1)
    rows, extra = bench_sgmv.sweep(args.quick, device)
    print(bench_sgmv.table(rows))
    now = _dt.datetime.now(_dt.timezone.utc)
    slug = "cpu" if not cuda else "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
    out = args.out or Path("bench/results") / f"{slug}-sgmv-{now:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = _record(device_name, cuda, argv, "time.perf_counter median of 21, 1 CPU thread", rows, extra)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
