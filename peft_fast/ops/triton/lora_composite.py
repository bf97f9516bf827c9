"""The cuBLAS composite of `lora_linear`, registered with dispatch as "triton_composite": the
base products stay on torch (cuBLAS on a GPU), Triton does only the adapter's passes. It is
what "auto" runs on CUDA until a measured backend table shows the fully fused kernel
("triton", lora.py) faster for a shape class (dispatch.py).

Forward:
    y = x Wᵀ + b                                torch (F.linear: cuBLAS)
    h = dropout(x) Aᵀ / (1 - p)                 lora_shrink: one pass over x, Philox once per
                                                8 elements, the mask's keep bytes stored
    y += s · h Bᵀ                               lora_expand_add_, in place (epilogue kernel)
Backward (saves x, h and the keep bytes):
    dh = s · dy B,  dB = s · dyᵀ h              lora_grad_dy: one pass over dy
    dx = dy W                                   torch (cuBLAS)
    dx += mask ⊙ (dh A) / (1 - p)               lora_expand_add_, in place, mask from the bytes
    dA = dhᵀ dropout(x) / (1 - p)               lora_adapter_grad, mask from the bytes
    dW = dyᵀ x, db = Σ dy                       torch, only when W / b require grad

Never slower than the unfused torch composition by construction: the same cuBLAS products,
and each adapter pass moves no more bytes than torch's (torch's dropout writes a dropped copy
of x and a byte mask that its shrink then reads; here x is read once and 1 bit per element is
written). `torch.ops.peft_fast.lora_linear_triton_composite_fwd` / `_bwd` take the same arguments as
the fused backend's ops and are opaque to torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_fast.kernels.lora_adapter_grad import lora_adapter_grad
from peft_fast.kernels.lora_expand import lora_expand_add_
from peft_fast.kernels.lora_grad_dy import lora_grad_dy
from peft_fast.kernels.lora_shrink import lora_shrink

from .. import dispatch
from ..autograd import new_seed, register_lora_autograd
from .lora import lora_bwd_fake, lora_fwd_fake, new_keep, supports


@torch.library.custom_op("peft_fast::lora_linear_triton_composite_fwd", mutates_args=())
def lora_linear_triton_composite_fwd(
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
    y = F.linear(x, weight, bias)
    h = lora_shrink(x, lora_A, 1.0 / (1.0 - dropout_p), dropout_p, seed, keep if dropout_p > 0.0 else None)
    lora_expand_add_(y, h, lora_B, alpha=scaling)
    return y, h, keep


@lora_linear_triton_composite_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return lora_fwd_fake(x, weight, lora_A, dropout_p)


@torch.library.custom_op("peft_fast::lora_linear_triton_composite_bwd", mutates_args=())
def lora_linear_triton_composite_bwd(
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
    """(dx, dA, dB) of lora_linear_triton_composite_fwd's y, the mask read from its keep bytes; dx is
    an empty tensor when not `need_dx`."""
    mask = keep if dropout_p > 0.0 else None
    rescale = 1.0 / (1.0 - dropout_p)
    dh, dB = lora_grad_dy(dy, lora_B, h, scaling)
    dA = lora_adapter_grad(dh, x, lora_A.dtype, rescale, mask)
    dx = lora_expand_add_(dy.mm(weight), dh, lora_A.t(), alpha=rescale, keep=mask) if need_dx else dy.new_empty((0,))
    return dx, dA, dB


@lora_linear_triton_composite_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, keep, scaling, dropout_p, need_dx):
    return lora_bwd_fake(dy, x, lora_A, lora_B, need_dx)


register_lora_autograd(lora_linear_triton_composite_fwd, torch.ops.peft_fast.lora_linear_triton_composite_bwd)


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
    """Same contract as `peft_fast.ops.lora_linear`: cuBLAS base products, Triton adapter passes.

    x may have any leading dims and strides (viewed as 2-D, copied only when its strides do not
    allow a view); gradients reach x, lora_A, lora_B, and weight/bias when they require grad.
    """
    in_f, out_f = weight.shape[1], weight.shape[0]
    p = float(dropout_p) if training else 0.0
    x2 = x.reshape(-1, in_f)
    seed = new_seed(x.device) if p > 0.0 else None
    y, _, _ = torch.ops.peft_fast.lora_linear_triton_composite_fwd(
        x2, weight, bias, lora_A, lora_B, float(scaling), p, seed
    )
    return y.reshape(*x.shape[:-1], out_f)


# The same inputs as the fused kernels (Triton devices and dtypes, int32 sizes and numbering).
dispatch.register("lora_linear", "triton_composite", lora_linear, supports)
