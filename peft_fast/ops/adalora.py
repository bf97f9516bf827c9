"""AdaLoRA op: what AdaLoRA's SVD layers call (`adalora_linear`), dispatched like every op.

Why no kernel of its own: AdaLoRA's adapter is LoRA's with `A ⊙ E` in place of A (E holds one
singular value per rank) and the scaling `alpha / (ranknum + 1e-5)`. Forming `A ⊙ E · scale`
costs r·in multiplies, nothing next to the two matmuls (M·r·(in + out) for M rows), so the
work is LoRA's:
- "torch" (the reference, and the CPU path): one autograd Function (same dtype and device, frozen
  base weight; anything else runs the same math with plain autograd) that folds the scale and
  the dropout's `1/(1-p)` into `A ⊙ E` (r × in), accumulates the adapter's second matmul onto the
  base output in one `addmm` (HF peft scales, divides and adds the (M, out) update in three more
  passes, and two more in backward), saves a uint8 keep mask (HF: the fp32 noise), and adds the
  adapter's input gradient into the base's inside one `addmm` (HF: two (M, in) tensors summed
  by autograd). The mask is F.dropout's own draw on CPU (`bernoulli_(1-p)` on x's shape and
  dtype), so the same seed gives HF peft's mask;
- "triton" and "cuda": `A ⊙ E · scale` handed to `lora_linear`'s front door, so AdaLoRA runs
  LoRA's fused kernels (and their fallbacks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .checks import check_linear_args
from .frozen_linear import applies, draw_dropout, input_grad
from .lora import lora_linear

# HF peft divides by `ranknum + 1e-5`.
RANKNUM_EPS = 1e-5

__all__ = ["RANKNUM_EPS", "adalora_linear", "orthogonality_norms"]


def _scaled_a(lora_A: torch.Tensor, lora_E: torch.Tensor, scaling: float, ranknum: float) -> torch.Tensor:
    return lora_A * (lora_E * (scaling / (ranknum + RANKNUM_EPS)))


def _pruned_away(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dropout_p: float, training: bool):
    """r = 0 (every triplet pruned; HF peft allows it): the base layer alone. HF peft still
    draws the dropout mask, so this does too (same random stream afterwards)."""
    if dropout_p > 0.0 and training:
        F.dropout(x, p=dropout_p, training=True)
    return F.linear(x, weight, bias)


class _AdaLoraLinear(torch.autograd.Function):
    """`y = x Wᵀ + b + ((x ⊙ keep) (A ⊙ E · c)ᵀ) Bᵀ` for 2-D x, W frozen, one dtype, with
    c = scaling / (ranknum + 1e-5) / (1 - p) (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_E, lora_B, scale, dropout_p):
        y = F.linear(x, weight, bias)
        xd, keep = draw_dropout(x, dropout_p)
        if dropout_p > 0.0:
            scale = scale / (1.0 - dropout_p)
        e_scaled = lora_E * scale
        a_scaled = lora_A * e_scaled
        h = F.linear(xd, a_scaled)
        y.addmm_(h, lora_B.t())
        ctx.save_for_backward(weight, lora_A, lora_B, e_scaled, a_scaled, keep, xd, h)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, lora_A, lora_B, e_scaled, a_scaled, keep, xd, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dB = dy.t() @ h if need[5] else None
        dh = dy @ lora_B
        dA = dE = None
        if need[3] or need[4]:
            da_scaled = dh.t() @ xd  # dL/d(A ⊙ E · c)
            dA = da_scaled * e_scaled if need[3] else None
            dE = (da_scaled * lora_A).sum(1, keepdim=True).mul_(ctx.scale) if need[4] else None
        dx = None
        if need[0]:
            dx = input_grad(dh @ a_scaled, keep, dy, weight)
        db = dy.sum(0) if ctx.has_bias and need[2] else None
        return dx, None, db, dA, dE, dB, None, None


def _adalora_linear_composed(
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
    """The CPU path: `_AdaLoraLinear` where it applies (one dtype and device, frozen base weight,
    r > 0), else the same math with plain autograd (`_adalora_linear_composed`)."""
    tensors = (x, weight, lora_A, lora_E, lora_B) + (() if bias is None else (bias,))
    if lora_A.shape[0] == 0 or not applies(weight, tensors):
        return _adalora_linear_composed(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, training)
    in_f, out_f = weight.shape[1], weight.shape[0]
    p = float(dropout_p) if training else 0.0
    scale = scaling / (ranknum + RANKNUM_EPS)
    y = _AdaLoraLinear.apply(x.reshape(-1, in_f), weight, bias, lora_A, lora_E, lora_B, scale, p)
    return y.view(*x.shape[:-1], out_f)


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


class _OrthogonalityNorms(torch.autograd.Function):
    """Σ_F ‖F Fᵀ − I‖_F over factors F (r, n), with the gradient written out:
    d‖D‖/dF = 2 D F / ‖D‖ for D = F Fᵀ − I (symmetric), 0 where ‖D‖ = 0 (as autograd's norm)."""

    @staticmethod
    def forward(ctx, *factors):
        devs, norms = [], []
        for f in factors:
            dev = f @ f.t()
            dev.diagonal().sub_(1.0)
            devs.append(dev)
            norms.append(torch.linalg.matrix_norm(dev))
        ctx.save_for_backward(*factors, *devs, *norms)
        ctx.count = len(factors)
        return torch.stack(norms).sum()

    @staticmethod
    def backward(ctx, grad):
        saved, n = ctx.saved_tensors, ctx.count
        grads = []
        for f, dev, norm in zip(saved[:n], saved[n : 2 * n], saved[2 * n :]):
            if not ctx.needs_input_grad[len(grads)]:
                grads.append(None)
                continue
            coeff = torch.where(norm > 0, 2.0 * grad / norm, 0.0)
            grads.append((dev @ f).mul_(coeff))
        return tuple(grads)


def orthogonality_norms(factors: list[torch.Tensor]) -> torch.Tensor:
    """`Σ ‖F Fᵀ − I‖_F` over `factors` (each (r, n); AdaLoRA passes every A and every Bᵀ), the sum
    of HF peft's orthogonality terms, with gradients to each factor. One autograd node for all
    of them (HF peft: five per factor), its backward one (r, r) @ (r, n) product per factor."""
    if not factors:
        raise ValueError("factors must be a non-empty list of 2-D tensors")
    for i, f in enumerate(factors):
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise ValueError(f"factors[{i}] must be a 2-D tensor, got {tuple(getattr(f, 'shape', ()))}")
    return _OrthogonalityNorms.apply(*factors)
