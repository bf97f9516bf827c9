"""LoRA suite: one adapter on one linear layer, ours against bare cuBLAS and HF peft.

On a CUDA GPU (bf16 base) it times, for each shape K→N, tokens M, rank r and dropout p, in
the same run:

  linear        bare frozen `F.linear` (forward; backward = input grad only)
  peft_bf16     HF peft's lora.Linear with bf16 adapters
  peft_fp32     HF peft's lora.Linear with fp32 adapters (peft's default under autocast_adapter_dtype)
  torch_bf16    peft_fast.ops.lora_linear on the "torch" backend (the unfused composition)
  triton_bf16   the same on the "triton" backend (fully fused); triton_composite_bf16 on the
                cuBLAS composite ("auto"'s default); cuda_bf16 on the "cuda" backend (csrc/)
  *_fp32        the same with fp32 adapters

forward, backward and forward+backward separately, the peak memory of one forward+backward,
and each time as a ratio over `linear` of the same phase. A kernel backend that is
unavailable is left out with a note saying why. Without a GPU the torch variants run on
small CPU shapes (the harness only; GPU numbers are not measured).

`backend_table_from_rows` turns a GPU run into the backend table "auto" follows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .plot import ratio_groups
from .timing import phase_times_ms

PRESETS = {
    "full": {"shapes": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)], "tokens": [2048, 8192, 16384],
             "ranks": [8, 16, 64], "dropouts": [0.0, 0.1]},
    "quick": {"shapes": [(4096, 4096), (4096, 14336)], "tokens": [256, 8192], "ranks": [16], "dropouts": [0.1]},
    "cpu": {"shapes": [(256, 256), (256, 512)], "tokens": [128], "ranks": [8], "dropouts": [0.0]},
    "tiny": {"shapes": [(32, 48)], "tokens": [16], "ranks": [4], "dropouts": [0.1]},
}  # fmt: skip


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


def kernel_backends(left_out: dict[str, str], names: tuple[str, ...] = ("triton", "cuda")) -> list[str]:
    """The kernel backends of `names` that can run here; each one that cannot goes into
    `left_out` (backend -> reason) and is printed once."""
    from peft_fast.ops import dispatch

    out = []
    for b in names:
        why = dispatch.unavailable_reason(b)
        if why is None:
            out.append(b)
        elif b not in left_out:
            left_out[b] = why
            print(f"bench: backend {b!r} left out: {why}")
    return out


def hf_lora_layer(weight: torch.Tensor, r: int, p: float, adapter_dtype: torch.dtype) -> nn.Module | None:
    """HF peft's lora.Linear around a frozen copy of `weight` (None when peft is not installed)."""
    try:
        import peft
    except ImportError:
        return None
    N, K = weight.shape
    base = nn.Sequential(nn.Linear(K, N, bias=False, device=weight.device, dtype=weight.dtype))
    base[0].weight.data.copy_(weight)
    base[0].weight.requires_grad_(False)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], init_lora_weights=False)
    layer = peft.inject_adapter_in_model(cfg, base)[0]
    layer.lora_A["default"].to(adapter_dtype)
    layer.lora_B["default"].to(adapter_dtype)
    return layer.train()


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(
    K: int, N: int, M: int, r: int, p: float, device: torch.device, rounds: int, left_out: dict[str, str]
) -> list[Row]:
    """Time every variant of one case; ratios are over bare `linear` of the same phase."""
    import peft_fast

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    fwds: dict[str, Callable[[], torch.Tensor]] = {"linear": lambda: F.linear(x, W)}
    params: dict[str, list[torch.Tensor]] = {"linear": [x]}
    backends = ["torch"] + (kernel_backends(left_out, ("triton", "triton_composite", "cuda")) if cuda else [])
    for ad in (torch.bfloat16, torch.float32) if cuda else (torch.float32,):
        tag = "bf16" if ad == torch.bfloat16 else "fp32"
        layer = hf_lora_layer(W, r, p, ad)
        if layer is not None:
            fwds[f"peft_{tag}"] = lambda layer=layer: layer(x)
            params[f"peft_{tag}"] = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        A = (torch.randn(r, K, generator=g) / K**0.5).to(device, ad).requires_grad_()
        B = (torch.randn(N, r, generator=g) / r**0.5).to(device, ad).requires_grad_()
        for backend in backends:

            def ours(A=A, B=B, backend=backend):
                with peft_fast.use_backend(backend):
                    return peft_fast.ops.lora_linear(x, W, None, A, B, 2.0, p, True)

            fwds[f"{backend}_{tag}"] = ours
            params[f"{backend}_{tag}"] = [x, A, B]
    times = phase_times_ms(fwds, dy, cuda=cuda, grads=params, rounds=rounds)
    rows = []
    for name, f in fwds.items():
        peak = _peak_mib(lambda f=f: f().backward(dy)) if cuda else float("nan")
        rows.append(Row(K, N, M, r, p, name, *times[name], peak))
    base = rows[0]
    for row in rows:
        row.fwd_ratio = row.fwd_ms / base.fwd_ms
        row.bwd_ratio = row.bwd_ms / base.bwd_ms
        row.fwd_bwd_ratio = row.fwd_bwd_ms / base.fwd_bwd_ms
    return rows


def run(preset: dict, device: torch.device, rounds: int) -> tuple[list[Row], dict]:
    """Every case of `preset` (see PRESETS) on `device`: (rows, facts for the record)."""
    cuda = device.type == "cuda"
    rows: list[Row] = []
    left_out: dict[str, str] = {}
    for K, N in preset["shapes"]:
        for M in preset["tokens"]:
            for r in preset["ranks"]:
                for p in preset["dropouts"]:
                    rows.extend(run_case(K, N, M, r, p, device, rounds, left_out))
                    if cuda:
                        torch.cuda.empty_cache()
    extra = {"dtype": "bf16 base" if cuda else "fp32", "scaling": 2.0, "phases": "fwd, bwd, fwd+bwd"}
    return rows, {**extra, "backends_left_out": left_out}


def table(rows: list[Row]) -> str:
    """A printable table of `rows`."""
    head = f"{'K→N':>12} {'M':>6} {'r':>3} {'p':>4} {'variant':<12} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'f+b/lin':>7} {'peak MiB':>9}"  # noqa: E501
    lines = [head, "-" * len(head)]
    for w in rows:
        lines.append(
            f"{f'{w.K}→{w.N}':>12} {w.M:>6} {w.r:>3} {w.dropout:>4} {w.variant:<12} {w.fwd_ms:>8.3f} "
            f"{w.bwd_ms:>8.3f} {w.fwd_bwd_ms:>8.3f} {w.fwd_bwd_ratio:>7.2f} {w.peak_mib:>9.1f}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per case label, each variant's forward+backward time over bare linear (for plots)."""
    return ratio_groups(
        rows, lambda r: f"lora {r['K']}→{r['N']} M={r['M']} r={r['r']} p={r['dropout']}", "fwd_bwd_ratio"
    )


def backend_table_from_rows(rows: list[Row] | list[dict], source: str, device: str) -> dict:
    """The backend table for `lora_linear` from a run's rows: per shape class (see
    dispatch.shape_class), the backends ordered by median forward+backward time with bf16
    adapters (ties keep name order). Rows of other variants are ignored."""
    from peft_fast.ops import dispatch

    by_class: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        row = row if isinstance(row, dict) else row.__dict__
        backend, _, tag = row["variant"].rpartition("_")
        if backend not in dispatch.FALLBACK_ORDER or tag != "bf16" or math.isnan(row["fwd_bwd_ms"]):
            continue
        cls = dispatch.shape_class(torch.empty(row["M"], 1, device="meta"))
        by_class.setdefault(cls, {}).setdefault(backend, []).append(row["fwd_bwd_ms"])
    entries = {cls: sorted(times, key=lambda b: statistics.median(times[b])) for cls, times in sorted(by_class.items())}
    return {
        "about": "Backend order 'auto' uses per op and shape class, fastest first, from the bench run in "
        "'source' (median forward+backward ms, bf16 adapters). Regenerate with `peft-fast bench --write-table PATH`.",
        "source": source,
        "device": device,
        "entries": {"lora_linear": entries} if entries else {},
    }
