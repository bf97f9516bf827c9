"""X-LoRA's op: every LoRA expert of a layer in one stacked shrink and one stacked expand,
each expert's rank slice scaled per token between the two (see `reference.xlora_linear`).

The front door checks arguments once (the same error for the same bad input on every
backend), then dispatches; the "torch" backend is the reference, the "triton" backend
(`ops/triton/xlora.py`) fuses the per-token scaling into the shrink's epilogue."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch, reference
from .checks import check_linear_args

dispatch.register("xlora_linear", "torch", reference.xlora_linear)


def check_xlora_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: Sequence[int],
    token_scalings: torch.Tensor,
    dropout_ps: Sequence[float],
) -> None:
    """ValueError/TypeError naming the argument when the arguments of `xlora_linear` do not fit."""
    in_f, out_f = check_linear_args(x, weight, bias)
    ranks = list(ranks)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of integers >= 1 (one per expert), got {ranks!r}")
    total = sum(ranks)
    if not isinstance(lora_A, torch.Tensor) or tuple(lora_A.shape) != (total, in_f):
        raise ValueError(f"lora_A must be (sum(ranks)={total}, {in_f}), got {tuple(getattr(lora_A, 'shape', ()))}")
    if not isinstance(lora_B, torch.Tensor) or tuple(lora_B.shape) != (out_f, total):
        raise ValueError(f"lora_B must be ({out_f}, sum(ranks)={total}), got {tuple(getattr(lora_B, 'shape', ()))}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    if not lora_A.is_floating_point():
        raise TypeError(f"lora_A must be floating point, got {lora_A.dtype}")
    expected = tuple(x.shape[:-1]) + (len(ranks),)
    if not isinstance(token_scalings, torch.Tensor) or tuple(token_scalings.shape) != expected:
        raise ValueError(
            f"token_scalings must be x's leading dims + (n_experts,) = {expected}, got"
            f" {tuple(getattr(token_scalings, 'shape', ()))}"
        )
    if not token_scalings.is_floating_point():
        raise TypeError(f"token_scalings must be floating point, got {token_scalings.dtype}")
    ps = list(dropout_ps)
    if len(ps) != len(ranks):
        raise ValueError(f"dropout_ps must have one entry per expert ({len(ranks)}), got {len(ps)}")
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0 for p in ps):
        raise ValueError(f"dropout_ps must be numbers in [0, 1), got {ps!r}")


def xlora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: Sequence[int],
    token_scalings: torch.Tensor,
    dropout_ps: Sequence[float],
    training: bool = True,
) -> torch.Tensor:
    """`x Wᵀ + b + Σ_i c_i(t) · dropout_i(x) A_iᵀ B_iᵀ` for every token t, in one stacked
    shrink and one stacked expand.

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_A: the experts' A stacked
    along the rank, (Σ r_i, in); lora_B: their B, (out, Σ r_i); ranks: r_i per expert, in
    stack order; token_scalings: (..., n_experts), c_i(t), the whole coefficient of expert i
    for token t (X-LoRA weight · alpha_i / r_i · global weight). Returns (..., out) in the
    base output's dtype; gradients reach x, lora_A, lora_B and token_scalings. An expert
    whose coefficient is zero for every token contributes nothing; leave it out of the stack
    to save its work (the X-LoRA layer does so under top-k)."""
    check_xlora_args(x, weight, bias, lora_A, lora_B, ranks, token_scalings, dropout_ps)
    ranks, dropout_ps = [int(r) for r in ranks], [float(p) for p in dropout_ps]
    fn = dispatch.select("xlora_linear", x, weight, bias, lora_A, lora_B, ranks, token_scalings, dropout_ps, training)
    return fn(x, weight, bias, lora_A, lora_B, ranks, token_scalings, dropout_ps, training)
