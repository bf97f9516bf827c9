"""VeRA op: what VeRA's layers call (`vera_linear`), dispatched like every op.

Why the "torch" backend is the reference and no kernel: VeRA's adapter is two matmuls with the
frozen shared projections, `λ_b ⊙ ((λ_d ⊙ (x A_sᵀ)) B_sᵀ)`, plus two vector scalings. Folding
the vectors into LoRA factors (A' = λ_d A_s, B' = λ_b B_s) to reuse `lora_linear`'s kernels
would make backward form the full gradients of A' (r·in·M multiplies) and B' (out·r·M), work
HF peft never does since A and B are frozen; the unfused form needs only M·r and M·out for
the two vectors. The torch path adds `λ_b ⊙ v` onto the base output in one pass (addcmul). A
fused backend can register under "vera_linear" with this signature.

The CPU path is one autograd Function (same tensors and dtypes, frozen base weight; anything else
runs HF peft's composition with plain autograd). Against HF peft's composition it saves, per call:
- the dropout's scale `1/(1-p)` folded into λ_d (r values) instead of a pass over the (M, in) noise,
  and a uint8 keep mask saved (HF: the fp32 noise); the mask is F.dropout's own draw on CPU
  (`bernoulli_(1-p)` on x's shape, into a uint8 tensor: the same draws), so the same seed gives HF peft's mask;
- `λ_b ⊙ v` added in place onto the base output (HF: a product and a sum, two (M, out) tensors),
  and no scalar pass in backward (autograd's addcmul multiplies by its `value`);
- the adapter's input gradient, masked in place, taking the base's as the GEMM's accumulation (`addmm_`; HF: two (M, in)
  tensors summed by autograd)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .checks import check_dropout_p, check_linear_args
from .frozen_linear import applies, draw_dropout, input_grad

__all__ = ["vera_linear"]


def _vera_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    result = F.linear(x, weight, bias)
    out_dtype = result.dtype
    in_f, out_f = weight.shape[1], weight.shape[0]
    xa = x.to(lambda_d.dtype)
    if dropout_p > 0.0 and training:
        xa = F.dropout(xa, p=dropout_p, training=True)
    sliced_A = vera_A[:, :in_f].to(xa.device)
    sliced_B = vera_B[:out_f, :].to(xa.device)
    v = F.linear(lambda_d * F.linear(xa, sliced_A), sliced_B)
    if v.dtype == result.dtype:
        return torch.addcmul(result, lambda_b, v)  # λ_b ⊙ v added in one pass (HF peft: two)
    return (result + lambda_b * v).to(out_dtype)


class _VeraLinear(torch.autograd.Function):
    """`y = x Wᵀ + b + λ_b ⊙ ((λ_d' ⊙ (x ⊙ keep) A_sᵀ) B_sᵀ)` for 2-D x, W frozen, one dtype, with
    λ_d' = λ_d / (1 - p) (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sliced_A, sliced_B, lambda_d, lambda_b, dropout_p):
        y = F.linear(x, weight, bias)
        xd, keep = draw_dropout(x, dropout_p)
        u = F.linear(xd, sliced_A)
        del xd
        d_scale = lambda_d / (1.0 - dropout_p) if dropout_p > 0.0 else lambda_d
        v = F.linear(u * d_scale, sliced_B)
        y.addcmul_(v, lambda_b)
        ctx.save_for_backward(weight, sliced_A, sliced_B, d_scale, lambda_b, keep, u, v)
        ctx.dropout_p = dropout_p
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, sliced_A, sliced_B, d_scale, lambda_b, keep, u, v = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_lambda_b = (dy * v).sum(0) if need[6] else None
        du = (dy * lambda_b) @ sliced_B  # dL/d(u ⊙ λ_d')
        d_lambda_d = (du * u).sum(0).div_(1.0 - ctx.dropout_p) if need[5] else None
        dx = None
        if need[0]:
            dx = input_grad((du * d_scale) @ sliced_A, keep, dy, weight)
        db = dy.sum(0) if ctx.has_bias and need[2] else None
        return dx, None, db, None, None, d_lambda_d, d_lambda_b, None


def _vera_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    """The CPU path: `_VeraLinear` where it applies (one dtype and device, frozen base weight and
    projections), else HF peft's composition (`_vera_linear_reference`)."""
    tensors = (x, weight, vera_A, vera_B, lambda_d, lambda_b) + (() if bias is None else (bias,))
    if vera_A.requires_grad or vera_B.requires_grad or not applies(weight, tensors):
        return _vera_linear_reference(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training)
    in_f, out_f = weight.shape[1], weight.shape[0]
    p = float(dropout_p) if training else 0.0
    x2 = x.reshape(-1, in_f)
    y = _VeraLinear.apply(x2, weight, bias, vera_A[:, :in_f], vera_B[:out_f, :], lambda_d, lambda_b, p)
    return y.view(*x.shape[:-1], out_f)


dispatch.register("vera_linear", "torch", _vera_linear_torch)


def vera_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) A[:, :in]ᵀ)) B[:out, :]ᵀ)`: HF peft's VeRA Linear.

    x (..., in); weight (out, in); bias (out,) or None; vera_A (r, ≥ in) and vera_B (≥ out, r),
    the model's shared projections, of which the first `in` columns / `out` rows are used;
    lambda_d (r,); lambda_b (out,). Returns (..., out) in the base output's dtype."""
    in_f, out_f = check_linear_args(x, weight, bias)
    if not isinstance(lambda_d, torch.Tensor) or lambda_d.dim() != 1:
        raise ValueError(f"lambda_d must be (r,), got {tuple(getattr(lambda_d, 'shape', ()))}")
    r = lambda_d.shape[0]
    if not isinstance(vera_A, torch.Tensor) or vera_A.dim() != 2 or vera_A.shape[0] != r or vera_A.shape[1] < in_f:
        raise ValueError(f"vera_A must be ({r}, >= {in_f}), got {tuple(getattr(vera_A, 'shape', ()))}")
    if not isinstance(vera_B, torch.Tensor) or vera_B.dim() != 2 or vera_B.shape[1] != r or vera_B.shape[0] < out_f:
        raise ValueError(f"vera_B must be (>= {out_f}, {r}), got {tuple(getattr(vera_B, 'shape', ()))}")
    if not isinstance(lambda_b, torch.Tensor) or tuple(lambda_b.shape) != (out_f,):
        raise ValueError(f"lambda_b must be ({out_f},), got {tuple(getattr(lambda_b, 'shape', ()))}")
    check_dropout_p(dropout_p)
    args = (x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training)
    return dispatch.select("vera_linear", *args)(*args)
