"""Triton backend of `lora_linear`: torch.library custom ops with autograd, registered with
dispatch as the "triton" implementation.

The fully fused path, selectable by name ("triton"); "auto" takes the cuBLAS composite
(lora_composite.py) until a measured backend table says this one is faster (dispatch.py).

Forward (two kernels, see kernels/lora_shrink.py and kernels/lora_expand.py):
    h = dropout(x) Aᵀ / (1 - p)                 lora_shrink, fp32 (M × r), stores the mask's
                                                keep bytes (1 bit per element of x)
    y = x Wᵀ + b + s · h Bᵀ                     lora_expand, expand fused into the matmul
Backward (saves x, h and the keep bytes; never a byte mask, dropped x or the M × N product):
    dh = s · dy B                               lora_shrink with Bᵀ
    dB = s · dyᵀ h,  dA = dhᵀ dropout(x)/(1-p)  lora_adapter_grad (mask read from the bytes)
    dx = dy W + mask ⊙ (dh A) / (1 - p)         lora_expand with Wᵀ, Aᵀ
    dW = dyᵀ x, db = Σ dy                       torch, only when W / b require grad

`torch.ops.peft_fast.lora_linear_triton_fwd` / `lora_linear_triton_bwd` are opaque to torch.compile (fake
kernels give their shapes), so a compiled model has no graph break here. The dropout seed
is drawn from torch's generator on x's device, so `torch.manual_seed` makes masks
reproducible and every call draws a fresh mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_fast.kernels.dropout import MAX_ELEMENTS, keep_bytes_shape
from peft_fast.kernels.lora_adapter_grad import lora_adapter_grad
from peft_fast.kernels.lora_expand import lora_expand
from peft_fast.kernels.lora_shrink import lora_shrink

from .. import dispatch
from ..autograd import new_seed, register_lora_autograd
from ..checks import size_reason
from . import device_reason


@torch.library.custom_op("peft_fast::lora_linear_triton_fwd", mutates_args=())
def lora_linear_triton_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, keep) for 2-D x: y (M, out) in x's dtype, h = dropout(x)Aᵀ/(1-p) (M, r) in fp32,
    keep the dropout mask's keep bytes (empty without dropout)."""
    keep = new_keep(x, dropout_p)
    h = lora_shrink(x, lora_A, 1.0 / (1.0 - dropout_p), dropout_p, seed, keep if dropout_p > 0.0 else None)
    y = lora_expand(x, weight, bias, h, lora_B, alpha=scaling)
    return y, h, keep


@lora_linear_triton_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return lora_fwd_fake(x, weight, lora_A, dropout_p)


def new_keep(x: Tensor, dropout_p: float) -> Tensor:
    """An uninitialized keep-bytes tensor for x's dropout mask (empty when dropout_p is 0)."""
    shape = keep_bytes_shape(*x.shape) if dropout_p > 0.0 else (0,)
    return torch.empty(shape, dtype=torch.uint8, device=x.device)


def lora_fwd_fake(x: Tensor, weight: Tensor, lora_A: Tensor, dropout_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """Fake (y, h, keep) of a Triton LoRA forward op, for torch.compile."""
    M = x.shape[0]
    keep = x.new_empty(keep_bytes_shape(*x.shape) if dropout_p > 0.0 else (0,), dtype=torch.uint8)
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=torch.float32), keep


@torch.library.custom_op("peft_fast::lora_linear_triton_bwd", mutates_args=())
def lora_linear_triton_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    h: Tensor,
    keep: Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of lora_linear_triton_fwd's y, the mask read from its keep bytes; dx is an
    empty tensor when not `need_dx`."""
    mask = keep if dropout_p > 0.0 else None
    rescale = 1.0 / (1.0 - dropout_p)
    dh = lora_shrink(dy, lora_B.t(), scaling)
    dB = lora_adapter_grad(h, dy, lora_A.dtype, scaling, transpose=True)
    dA = lora_adapter_grad(dh, x, lora_A.dtype, rescale, mask)
    dx = lora_expand(dy, weight.t(), None, dh, lora_A.t(), alpha=rescale, keep=mask) if need_dx else dy.new_empty((0,))
    return dx, dA, dB


@lora_linear_triton_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, keep, scaling, dropout_p, need_dx):
    return lora_bwd_fake(dy, x, lora_A, lora_B, need_dx)


def lora_bwd_fake(
    dy: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Fake (dx, dA, dB) of a Triton LoRA backward op, for torch.compile."""
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


register_lora_autograd(lora_linear_triton_fwd, torch.ops.peft_fast.lora_linear_triton_bwd)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """Same contract as `peft_fast.ops.lora_linear`, on fused Triton kernels.

    x may have any leading dims and strides (it is viewed as 2-D, copied only when its
    strides do not allow a view); gradients reach x, lora_A, lora_B, and weight/bias when
    they require grad.
    """
    in_f, out_f = weight.shape[1], weight.shape[0]
    p = float(dropout_p) if training else 0.0
    x2 = x.reshape(-1, in_f)
    seed = new_seed(x.device) if p > 0.0 else None
    y, _, _ = torch.ops.peft_fast.lora_linear_triton_fwd(x2, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    return y.reshape(*x.shape[:-1], out_f)


def supports(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> str | None:
    """None when the Triton kernels can take this call, else the reason (dispatch falls back)."""
    why = device_reason({"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B})
    if why is not None:
        return why
    if dropout_p > 0.0 and training and x.numel() > MAX_ELEMENTS:
        return f"dropout on {x.numel()} elements exceeds the kernels' int32 mask numbering"
    return size_reason(x, weight)


dispatch.register("lora_linear", "triton", lora_linear, supports)
