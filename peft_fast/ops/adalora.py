"""AdaLoRA op: what AdaLoRA's SVD layers call (`adalora_linear`), dispatched like every op.

Why no kernel of its own: AdaLoRA's adapter is LoRA's with `A ⊙ E` in place of A (E holds one
singular value per rank) and the scaling `alpha / (ranknum + 1e-5)`. Forming `A ⊙ E · scale`
costs r·in multiplies, nothing next to the two matmuls (M·r·(in + out) for M rows), so the
work is LoRA's:
- "torch" (the reference, and the CPU path): the scale folded into `A ⊙ E`, and the adapter's
  second matmul accumulated onto the base output in one `addmm` (HF peft scales, divides and
  adds the (M, out) update in three more passes);
- "triton" and "cuda": `A ⊙ E · scale` handed to `lora_linear`'s front door, so AdaLoRA runs
  LoRA's fused kernels (and their fallbacks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .checks import check_linear_args
from .lora import lora_linear

# HF peft divides by `ranknum + 1e-5`.
RANKNUM_EPS = 1e-5

__all__ = ["RANKNUM_EPS", "adalora_linear"]


def _scaled_a(lora_A: torch.Tensor, lora_E: torch.Tensor, scaling: float, ranknum: float) -> torch.Tensor:
    return lora_A * (lora_E * (scaling / (ranknum + RANKNUM_EPS)))


def _pruned_away(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dropout_p: float, training: bool):
    """r = 0 (every triplet pruned; HF peft allows it): the base layer alone. HF peft still
    draws the dropout mask, so this does too (same random stream afterwards)."""
    if dropout_p > 0.0 and training:
        F.dropout(x, p=dropout_p, training=True)
    return F.linear(x, weight, bias)


def _adalora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    ranknum: float,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    if lora_A.shape[0] == 0:
        return _pruned_away(x, weight, bias, dropout_p, training)
    result = F.linear(x, weight, bias)
    xa = x.to(lora_A.dtype)
    if dropout_p > 0.0 and training:
        xa = F.dropout(xa, p=dropout_p, training=True)
    h = F.linear(xa, _scaled_a(lora_A, lora_E, scaling, ranknum))
    if result.dtype != h.dtype:  # e.g. fp32 adapters on a bf16 base: add in the adapter's dtype, as HF peft
        return (result + F.linear(h, lora_B)).to(result.dtype)
    rows = result.reshape(-1, result.shape[-1])
    return torch.addmm(rows, h.reshape(-1, h.shape[-1]), lora_B.t()).view(result.shape)


def _adalora_linear_via_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    ranknum: float,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    if lora_A.shape[0] == 0:
        return _pruned_away(x, weight, bias, dropout_p, training)
    return lora_linear(x, weight, bias, _scaled_a(lora_A, lora_E, scaling, ranknum), lora_B, 1.0, dropout_p, training)


dispatch.register("adalora_linear", "torch", _adalora_linear_torch)
dispatch.register("adalora_linear", "triton", _adalora_linear_via_lora)
dispatch.register("adalora_linear", "cuda", _adalora_linear_via_lora)


def adalora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    ranknum: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`y = x Wᵀ + b + dropout(x) (A ⊙ E)ᵀ Bᵀ · scaling / (ranknum + 1e-5)`: HF peft's SVDLinear.

    x (..., in); weight (out, in); bias (out,) or None; lora_A (r, in); lora_E (r, 1);
    lora_B (out, r), r >= 0. Returns (..., out) in the base output's dtype. Gradients flow to
    A, E and B (and x)."""
    in_f, out_f = check_linear_args(x, weight, bias)
    if not isinstance(lora_A, torch.Tensor) or lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must be (r, {in_f}), got {tuple(getattr(lora_A, 'shape', ()))}")
    r = lora_A.shape[0]
    if not isinstance(lora_E, torch.Tensor) or tuple(lora_E.shape) != (r, 1):
        raise ValueError(f"lora_E must be ({r}, 1), got {tuple(getattr(lora_E, 'shape', ()))}")
    if not isinstance(lora_B, torch.Tensor) or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B must be ({out_f}, {r}), got {tuple(getattr(lora_B, 'shape', ()))}")
    for name, value in (("scaling", scaling), ("ranknum", ranknum)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    args = (x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, training)
    return dispatch.select("adalora_linear", *args)(*args)
