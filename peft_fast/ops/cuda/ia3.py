"""CUDA C++ backend of `ia3_linear` (csrc/ia3_scale.cu), registered with dispatch as the "cuda"
implementation. The products stay on cuBLAS; the scaling and the scale vector's gradient
reduction are the kernels:

Attention-style layer (ia3_l (out, 1)):  z = x Wᵀ + b (cuBLAS), y = ia3_scale(z, l); z is
    kept when l needs grad (HF peft's autograd keeps the same M × out tensor).
    Backward: (dz, dl) = ia3_scale_grad(dy, z, l) in one pass; dx = dz W (cuBLAS).
Feed-forward layer (ia3_l (1, in)):      y = ia3_scale(x, l) Wᵀ + b.
    Backward: g = dy W (cuBLAS); (dx, dl) = ia3_scale_grad(g, x, l) in one pass.
dW and db (only when the frozen base requires grad) come from torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ..autograd import register_ia3_autograd
from .library import adapter_dtype_reason, cuda_reason, inner_contiguous


@torch.library.custom_op("peft_fast::ia3_linear_cuda_fwd", mutates_args=())
def ia3_linear_cuda_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, feedforward: bool, save_z: bool
) -> tuple[Tensor, Tensor]:
    """(y, z) for 2-D x and a flat scale vector; z = x Wᵀ + b when `save_z` (attention-style
    layers only), else an empty tensor."""
    if feedforward:
        scaled = torch.ops.peft_fast.ia3_scale_cuda(inner_contiguous(x), scale)
        return F.linear(scaled, weight, bias), x.new_empty((0,))
    z = F.linear(x, weight, bias).contiguous()
    y = torch.ops.peft_fast.ia3_scale_cuda(z, scale)
    return y, (z if save_z else x.new_empty((0,)))


@ia3_linear_cuda_fwd.register_fake
def _(x, weight, bias, scale, feedforward, save_z):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, (x.new_empty(y.shape) if save_z and not feedforward else x.new_empty((0,)))


@torch.library.custom_op("peft_fast::ia3_linear_cuda_bwd", mutates_args=())
def ia3_linear_cuda_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, scale: Tensor, z: Tensor, feedforward: bool
) -> tuple[Tensor, Tensor]:
    """(dx, dscale) of ia3_linear_cuda_fwd's y; dscale is fp32 with scale's shape (zeros for
    an attention-style layer whose forward saved no z)."""
    dy = inner_contiguous(dy)
    if feedforward:
        g = dy.mm(weight).contiguous()
        return torch.ops.peft_fast.ia3_scale_grad_cuda(g, inner_contiguous(x), scale)
    if z.numel() > 0:
        dz, dscale = torch.ops.peft_fast.ia3_scale_grad_cuda(dy, z, scale)
    else:
        dz = torch.ops.peft_fast.ia3_scale_cuda(dy, scale)
        dscale = torch.zeros(scale.shape, dtype=torch.float32, device=scale.device)
    return dz.mm(weight), dscale


@ia3_linear_cuda_bwd.register_fake
def _(dy, x, weight, scale, z, feedforward):
    return x.new_empty(x.shape), scale.new_empty(scale.shape, dtype=torch.float32)


register_ia3_autograd(ia3_linear_cuda_fwd, torch.ops.peft_fast.ia3_linear_cuda_bwd)


def ia3_linear(x: Tensor, weight: Tensor, bias: Tensor | None, ia3_l: Tensor, feedforward: bool) -> Tensor:
    """Same contract as `peft_fast.ops.ia3_linear`, on the CUDA kernels; x may have any leading
    dims and strides. Gradients reach x, ia3_l, and weight/bias when they require grad."""
    in_f, out_f = weight.shape[1], weight.shape[0]
    scale = ia3_l.reshape(-1)
    save_z = (not feedforward) and ia3_l.requires_grad and torch.is_grad_enabled()
    x2 = x.reshape(-1, in_f)
    y, _ = torch.ops.peft_fast.ia3_linear_cuda_fwd(x2, weight, bias, scale, bool(feedforward), save_z)
    return y.reshape(*x.shape[:-1], out_f)


def supports(x: Tensor, weight: Tensor, bias: Tensor | None, ia3_l: Tensor, feedforward: bool) -> str | None:
    """None when the CUDA kernels can take this call, else the reason (dispatch falls back)."""
    named = {"x": x, "weight": weight, "bias": bias, "ia3_l": ia3_l}
    return cuda_reason(named, x, weight) or adapter_dtype_reason(x, ia3_l, "ia3_l")


dispatch.register("ia3_linear", "cuda", ia3_linear, supports)
