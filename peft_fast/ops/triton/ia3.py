"""Triton backend of `ia3_linear`: torch.library custom ops with autograd, registered with
dispatch as the "triton" implementation (kernel: kernels/ia3_scale.py).

Attention-style layer (ia3_l (out, 1)):  y = (x Wᵀ + b) ⊙ l in one matmul epilogue.
    When l needs grad the pre-scale z = x Wᵀ + b is written too (HF peft's autograd keeps
    the same M × out tensor); backward: dx = (dy ⊙ l) W with the scaling in the prologue,
    dl = Σ_m dy ⊙ z reduced in that same kernel's prologue.
Feed-forward layer (ia3_l (1, in)):      y = (x ⊙ l) Wᵀ + b, scaling in the prologue.
    Backward: g = dy W, dx = g ⊙ l in the epilogue, dl = Σ_m g ⊙ x reduced in it.
dW and db (only when the frozen base requires grad) come from torch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_fast.kernels.ia3_scale import ia3_scaled_matmul

from .. import dispatch
from ..autograd import register_ia3_autograd
from ..checks import size_reason
from . import device_reason


@torch.library.custom_op("peft_fast::ia3_linear_triton_fwd", mutates_args=())
def ia3_linear_triton_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, feedforward: bool, save_z: bool
) -> tuple[Tensor, Tensor]:
    """(y, z) for 2-D x and a flat scale vector; z is x Wᵀ + b when `save_z` (attention-style
    layers only), else an empty tensor."""
    if feedforward:
        y, _, _, _ = ia3_scaled_matmul(x, weight, bias, in_scale=scale)
        return y, x.new_empty((0,))
    y, z, _, _ = ia3_scaled_matmul(x, weight, bias, out_scale=scale, store_z=save_z)
    return y, (z if z is not None else x.new_empty((0,)))


@ia3_linear_triton_fwd.register_fake
def _(x, weight, bias, scale, feedforward, save_z):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, (x.new_empty(y.shape) if save_z and not feedforward else x.new_empty((0,)))


@torch.library.custom_op("peft_fast::ia3_linear_triton_bwd", mutates_args=())
def ia3_linear_triton_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, scale: Tensor, z: Tensor, feedforward: bool
) -> tuple[Tensor, Tensor]:
    """(dx, dscale) of ia3_linear_triton_fwd's y; dscale is fp32 with scale's shape (zeros for an
    attention-style layer whose forward saved no z)."""
    if feedforward:
        dx, _, _, dscale = ia3_scaled_matmul(dy, weight.t(), out_scale=scale, epilogue_reduce=x)
    else:
        saved = z.numel() > 0
        dx, _, dscale, _ = ia3_scaled_matmul(dy, weight.t(), in_scale=scale, prologue_reduce=z if saved else None)
        if dscale is None:
            dscale = torch.zeros(scale.shape, dtype=torch.float32, device=scale.device)
    return dx, dscale


@ia3_linear_triton_bwd.register_fake
def _(dy, x, weight, scale, z, feedforward):
    return x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=torch.float32)


register_ia3_autograd(ia3_linear_triton_fwd, torch.ops.peft_fast.ia3_linear_triton_bwd)


def ia3_linear(x: Tensor, weight: Tensor, bias: Tensor | None, ia3_l: Tensor, feedforward: bool) -> Tensor:
    """Same contract as `peft_fast.ops.ia3_linear`, on fused Triton kernels; x may have any
    leading dims and strides. Gradients reach x, ia3_l, and weight/bias when they require grad."""
    in_f, out_f = weight.shape[1], weight.shape[0]
    scale = ia3_l.reshape(-1)
    save_z = (not feedforward) and ia3_l.requires_grad and torch.is_grad_enabled()
    x2 = x.reshape(-1, in_f)
    y, _ = torch.ops.peft_fast.ia3_linear_triton_fwd(x2, weight, bias, scale, bool(feedforward), save_z)
    return y.reshape(*x.shape[:-1], out_f)


def supports(x: Tensor, weight: Tensor, bias: Tensor | None, ia3_l: Tensor, feedforward: bool) -> str | None:
    """None when the Triton kernel can take this call, else the reason (dispatch falls back)."""
    return device_reason({"x": x, "weight": weight, "bias": bias, "ia3_l": ia3_l}) or size_reason(x, weight)


dispatch.register("ia3_linear", "triton", ia3_linear, supports)
