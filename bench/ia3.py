"""IA³ suite: a learned scale on one linear layer, ours against bare cuBLAS and HF peft.

On a CUDA GPU (bf16 base and scale) it times, for each shape K→N, tokens M and placement
(attention-style: the output is scaled; feed-forward: the input is scaled), in the same run:

  linear   bare frozen `F.linear`
  peft     HF peft's ia3.Linear
  torch    peft_fast.ops.ia3_linear on the "torch" backend (the unfused composition)
  triton   the same on the "triton" backend; cuda on the "cuda" backend (csrc/)

forward, backward and forward+backward, each as a ratio over `linear` of the same phase.
Without a GPU the torch variants run on small CPU shapes (the harness only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora import kernel_backends
from .plot import ratio_groups
from .timing import phase_times_ms

PRESETS = {
    "full": {"shapes": [(4096, 4096), (4096, 14336), (14336, 4096)], "tokens": [2048, 8192, 16384],
             "feedforward": [False, True]},
    "quick": {"shapes": [(4096, 14336)], "tokens": [8192], "feedforward": [False, True]},
    "cpu": {"shapes": [(256, 512)], "tokens": [128], "feedforward": [False, True]},
    "tiny": {"shapes": [(32, 48)], "tokens": [16], "feedforward": [False, True]},
}  # fmt: skip


@dataclass
class Ia3Row:
    """One variant of one case: median times in milliseconds and ratios over bare linear."""

    K: int
    N: int
    M: int
    feedforward: bool
    variant: str
    fwd_ms: float
    bwd_ms: float
    fwd_bwd_ms: float
    fwd_ratio: float = float("nan")
    bwd_ratio: float = float("nan")
    fwd_bwd_ratio: float = float("nan")


def hf_ia3_layer(weight: torch.Tensor, feedforward: bool) -> nn.Module | None:
    """HF peft's ia3.Linear around a frozen copy of `weight` (None when peft is not installed)."""
    try:
        import peft
    except ImportError:
        return None
    N, K = weight.shape
    base = nn.Sequential(nn.Linear(K, N, bias=False, device=weight.device, dtype=weight.dtype))
    base[0].weight.data.copy_(weight)
    base[0].weight.requires_grad_(False)
    cfg = peft.IA3Config(target_modules=["0"], feedforward_modules=["0"] if feedforward else [], init_ia3_weights=False)
    return peft.inject_adapter_in_model(cfg, base)[0].train()


def run_case(
    K: int, N: int, M: int, feedforward: bool, device: torch.device, rounds: int, left_out: dict[str, str]
) -> list[Ia3Row]:
    """Time every variant of one case; ratios are over bare `linear` of the same phase."""
    import peft_fast

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    shape = (1, K) if feedforward else (N, 1)
    scale = (1 + 0.1 * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_()
    fwds: dict[str, Callable[[], torch.Tensor]] = {"linear": lambda: F.linear(x, W)}
    params: dict[str, list[torch.Tensor]] = {"linear": [x]}
    layer = hf_ia3_layer(W, feedforward)
    if layer is not None:
        fwds["peft"] = lambda: layer(x)
        params["peft"] = [x, layer.ia3_l["default"]]
    for backend in ["torch"] + (kernel_backends(left_out) if cuda else []):

        def ours(backend=backend):
            with peft_fast.use_backend(backend):
                return peft_fast.ops.ia3_linear(x, W, None, scale, feedforward)

        fwds[backend] = ours
        params[backend] = [x, scale]
    times = phase_times_ms(fwds, dy, cuda=cuda, grads=params, rounds=rounds)
    rows = [Ia3Row(K, N, M, feedforward, name, *times[name]) for name in fwds]
    for row in rows:
        row.fwd_ratio = row.fwd_ms / rows[0].fwd_ms
        row.bwd_ratio = row.bwd_ms / rows[0].bwd_ms
        row.fwd_bwd_ratio = row.fwd_bwd_ms / rows[0].fwd_bwd_ms
    return rows


def run(preset: dict, device: torch.device, rounds: int) -> tuple[list[Ia3Row], dict]:
    """Every case of `preset` (see PRESETS) on `device`: (rows, facts for the record)."""
    rows: list[Ia3Row] = []
    left_out: dict[str, str] = {}
    for K, N in preset["shapes"]:
        for M in preset["tokens"]:
            for ff in preset["feedforward"]:
                rows.extend(run_case(K, N, M, ff, device, rounds, left_out))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, {"dtype": "bf16 base and scale" if device.type == "cuda" else "fp32", "backends_left_out": left_out}


def table(rows: list[Ia3Row]) -> str:
    """A printable table of `rows`."""
    head = f"{'K→N':>12} {'M':>6} {'ff':>5} {'variant':<8} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'f+b/lin':>7}"
    lines = [head, "-" * len(head)]
    for w in rows:
        lines.append(
            f"{f'{w.K}→{w.N}':>12} {w.M:>6} {w.feedforward!s:>5} {w.variant:<8} {w.fwd_ms:>8.3f} "
            f"{w.bwd_ms:>8.3f} {w.fwd_bwd_ms:>8.3f} {w.fwd_bwd_ratio:>7.2f}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per case label, each variant's forward+backward time over bare linear (for plots)."""
    return ratio_groups(
        rows, lambda r: f"ia3 {r['K']}→{r['N']} M={r['M']} {'ff' if r['feedforward'] else 'attn'}", "fwd_bwd_ratio"
    )
