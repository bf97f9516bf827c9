"""Triton backend of `xlora_linear`: torch.library custom ops with autograd, registered with
dispatch as the "triton" implementation.

A composite, as "auto" wants by default (see dispatch.AUTO_DEFAULT): the base products stay
torch's (cuBLAS), the adapter passes are Triton kernels.
Forward:
    y = x Wᵀ + b                          torch
    hs = (x Aᵀ) ⊙ G                       xlora_shrink: stacked shrink, per-token expert scaling
                                          in its epilogue (G[m, j] = c[m, expert(j)])
    y += hs Bᵀ                            lora_expand_add_ with the stacked B, in place
Backward:
    dh = (dy B) ⊙ G, raw = dy B           xlora_shrink with Bᵀ (a strided view)
    dB = dyᵀ hs,  dA = dhᵀ x              lora_adapter_grad
    dx = dy W (torch), dx += dh A         lora_expand_add_ with Aᵀ
    dc[m, i] = Σ_{j of expert i} raw ⊙ h  torch (M × R elementwise, one index_add)
h = x Aᵀ (unscaled) is kept only when the coefficients need a gradient; otherwise the forward
skips tiles whose coefficients are all zero (experts top-k dropped for every token of the tile).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from peft_fast.kernels.lora_adapter_grad import lora_adapter_grad
from peft_fast.kernels.lora_expand import lora_expand_add_
from peft_fast.kernels.xlora_shrink import xlora_shrink

from .. import dispatch, reference
from ..autograd import base_grads
from ..checks import size_reason
from . import device_reason


@torch.library.custom_op("peft_fast::xlora_linear_triton_fwd", mutates_args=())
def xlora_linear_triton_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    expert_of_rank: Tensor,
    coeff: Tensor,
    save_raw: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, hs, h) for 2-D x: y (M, out) in x's dtype; hs = (x Aᵀ) ⊙ G and h = x Aᵀ, fp32
    (M, R), h empty unless `save_raw`."""
    hs, h = xlora_shrink(x, lora_A, coeff, expert_of_rank, store_raw=save_raw, skip_zero=not save_raw)
    y = lora_expand_add_(torch.nn.functional.linear(x, weight, bias), hs, lora_B, 1.0)
    return y, hs, (h if h is not None else hs.new_empty((0,)))


@xlora_linear_triton_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, expert_of_rank, coeff, save_raw):
    M, R = x.shape[0], lora_A.shape[0]
    hs = x.new_empty((M, R), dtype=torch.float32)
    h = x.new_empty((M, R) if save_raw else (0,), dtype=torch.float32)
    return x.new_empty((M, weight.shape[0])), hs, h


@torch.library.custom_op("peft_fast::xlora_linear_triton_bwd", mutates_args=())
def xlora_linear_triton_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    expert_of_rank: Tensor,
    coeff: Tensor,
    hs: Tensor,
    h: Tensor,
    need_dx: bool,
    need_dcoeff: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dcoeff) of xlora_linear_triton_fwd's y; dx / dcoeff are empty tensors when not needed."""
    adapter_dtype = lora_A.dtype
    dh, raw = xlora_shrink(dy, lora_B.t(), coeff, expert_of_rank, store_raw=need_dcoeff, skip_zero=not need_dcoeff)
    dB = lora_adapter_grad(hs, dy, adapter_dtype, 1.0, transpose=True)
    dA = lora_adapter_grad(dh, x, adapter_dtype, 1.0)
    dx = lora_expand_add_(dy.mm(weight), dh, lora_A.t(), 1.0) if need_dx else dy.new_empty((0,))
    if need_dcoeff:
        dc = torch.zeros(coeff.shape, dtype=torch.float32, device=coeff.device)
        dc = dc.index_add_(1, expert_of_rank.long(), raw * h).to(coeff.dtype)
    else:
        dc = coeff.new_empty((0,))
    return dx, dA, dB, dc


@xlora_linear_triton_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, expert_of_rank, coeff, hs, h, need_dx, need_dcoeff):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    dc = coeff.new_empty(coeff.shape) if need_dcoeff else coeff.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), dc


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, expert_of_rank, coeff, save_raw = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, expert_of_rank, coeff, output[1], output[2])
    ctx.save_raw = save_raw


def _backward(ctx, dy, _dhs, _dh):
    x, weight, lora_A, lora_B, expert_of_rank, coeff, hs, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[6] and not ctx.save_raw:
        raise RuntimeError("xlora_linear: the coefficients need grad but the forward ran without saving x Aᵀ")
    dx, dA, dB, dc = torch.ops.peft_fast.xlora_linear_triton_bwd(
        dy, x, weight, lora_A, lora_B, expert_of_rank, coeff, hs, h, need[0], need[6]
    )
    dW, db = base_grads(dy, x, need[1], need[2])
    return (
        dx if need[0] else None,
        dW,
        db,
        dA if need[3] else None,
        dB if need[4] else None,
        None,
        dc if need[6] else None,
        None,
    )


xlora_linear_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def xlora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    ranks: Sequence[int],
    token_scalings: Tensor,
    dropout_ps: Sequence[float],
    training: bool = True,
) -> Tensor:
    """Same contract as `peft_fast.ops.xlora_linear`, on Triton kernels (no dropout: see `supports`).

    x may have any leading dims and strides (viewed as 2-D, copied only where its strides do
    not allow a view); gradients reach x, lora_A, lora_B, token_scalings, and weight/bias when
    they require grad."""
    in_f, out_f = weight.shape[1], weight.shape[0]
    n = len(ranks)
    x2 = x.reshape(-1, in_f)
    coeff = token_scalings.reshape(-1, n)
    expert_of_rank = reference.expert_of_rank(tuple(ranks), x.device)
    save_raw = torch.is_grad_enabled() and coeff.requires_grad
    y, _, _ = torch.ops.peft_fast.xlora_linear_triton_fwd(
        x2, weight, bias, lora_A, lora_B, expert_of_rank.to(torch.int32), coeff, save_raw
    )
    return y.reshape(*x.shape[:-1], out_f)


def supports(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    ranks: Sequence[int],
    token_scalings: Tensor,
    dropout_ps: Sequence[float],
    training: bool = True,
) -> str | None:
    """None when the Triton kernels can take this call, else the reason (dispatch falls back)."""
    if training and any(p > 0.0 for p in dropout_ps):
        return "X-LoRA with dropout draws one mask per expert; the stacked kernels take no dropout"
    named = {
        "x": x,
        "weight": weight,
        "bias": bias,
        "lora_A": lora_A,
        "lora_B": lora_B,
        "token_scalings": token_scalings,
    }
    why = device_reason(named)
    if why is not None:
        return why
    return size_reason(x, weight)


dispatch.register("xlora_linear", "triton", xlora_linear, supports)
