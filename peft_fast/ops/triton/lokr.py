"""Triton backend of `lokr_linear` (the factored form): torch.library custom ops with autograd,
registered with dispatch as the "triton" implementation.

With w1 (a, c), w2 (b, d), x's rows viewed as X (c, d) and dY' = s · row_scale ⊙ dY (a, b):

Forward (saves x):   Y = s · row_scale ⊙ (w1 X w2ᵀ)        lokr_apply, one kernel: X w2ᵀ stays
                                                            in registers, kron(w1, w2) is never built
Backward:            dX = w1ᵀ dY' w2                        lokr_apply on (w1ᵀ, w2ᵀ), row_scale as
                                                            its input scale
                     dw1 = Σ_m dY'_m (X_m w2ᵀ)ᵀ,  dw2 = Σ_m dY'_mᵀ (w1 X_m)    torch (cuBLAS)

Why the weight gradients stay on torch: each is a reduction over all M rows, 2·M·a·b·(c + d)
flops through one intermediate of M·c·b (or M·a·d) elements, the size of x or y: a GEMM with a
reduction dimension of M·b (or M·a), which cuBLAS runs at its peak; a fused kernel would save
that one intermediate's write and read (as many bytes as x once) but would need a split-M
reduction of its own, for at most the time of one pass over x.
Why the forward/dx kernel pays: the unfused form writes and reads the M·c·b intermediate and a
transposed copy of it (three passes over x's size) between two batched GEMMs; the kernel reads
x once and writes y once.

rank_dropout keeps HF peft's meaning: the layer draws the row mask in HF's order and passes it
as row_scale (applied to the output features here). module_dropout skips the op in the layer.
Convolutions (lokr_conv) stay on the torch path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_fast.kernels.lokr_apply import MAX_C_PAD, lokr_apply

from .. import dispatch
from ..lycoris_reference import Form, lokr_form
from . import device_reason


@torch.library.custom_op("peft_fast::lokr_linear_triton_fwd", mutates_args=())
def lokr_linear_triton_fwd(x: Tensor, w1: Tensor, w2: Tensor, scaling: float, row_scale: Optional[Tensor]) -> Tensor:
    """y (M, a·b) in the adapter dtype for 2-D x (M, c·d) in that dtype."""
    return lokr_apply(x, w1, w2, scaling, out_scale=row_scale)


@lokr_linear_triton_fwd.register_fake
def _(x, w1, w2, scaling, row_scale):
    return x.new_empty((x.shape[0], w1.shape[0] * w2.shape[0]), dtype=w1.dtype)


@torch.library.custom_op("peft_fast::lokr_linear_triton_bwd", mutates_args=())
def lokr_linear_triton_bwd(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, scaling: float, row_scale: Optional[Tensor], need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw1, dw2) of lokr_linear_triton_fwd's y; dx is empty when not `need_dx`."""
    (a, c), (b, d) = w1.shape, w2.shape
    m = x.shape[0]
    dx = lokr_apply(dy, w1.t(), w2.t(), scaling, in_scale=row_scale) if need_dx else dy.new_empty((0,))
    dyp = dy * scaling if row_scale is None else dy * (row_scale.to(dy.dtype) * scaling)
    dyp = dyp.view(m, a, b)
    xs = x.view(m, c, d)
    t = (x.reshape(m * c, d) @ w2.t()).view(m, c, b)  # X_m w2ᵀ
    dw1 = torch.einsum("mab,mcb->ac", dyp, t)
    u = torch.matmul(w1, xs)  # w1 X_m: (m, a, d)
    dw2 = torch.einsum("mab,mad->bd", dyp, u)
    return dx, dw1, dw2


@lokr_linear_triton_bwd.register_fake
def _(dy, x, w1, w2, scaling, row_scale, need_dx):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, w1.new_empty(w1.shape), w2.new_empty(w2.shape)


def _setup_context(ctx, inputs, output):
    x, w1, w2, scaling, row_scale = inputs
    ctx.save_for_backward(x, w1, w2, row_scale)
    ctx.scaling = scaling


def _backward(ctx, dy):
    x, w1, w2, row_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.peft_fast.lokr_linear_triton_bwd(dy, x, w1, w2, ctx.scaling, row_scale, need[0])
    return tuple(g if n else None for g, n in zip(grads, need[:3])) + (None, None)


lokr_linear_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def lokr_linear(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    scaling: float,
    row_scale: Tensor | None = None,
    form: Form | None = None,
) -> Tensor:
    """Same contract as `peft_fast.ops.lokr_linear`, on the fused Triton kernel (factored form).

    x may have any leading dims and strides (viewed as 2-D, copied only when needed); it is cast
    to the adapter dtype first, as the reference does."""
    n_in = w1.shape[1] * w2.shape[1]
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features but kron(w1, w2) takes {w1.shape[1]}·{w2.shape[1]} = {n_in}")
    x2 = x.to(w1.dtype).reshape(-1, n_in)
    y = torch.ops.peft_fast.lokr_linear_triton_fwd(x2, w1, w2, float(scaling), row_scale)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def supports(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    scaling: float,
    row_scale: Tensor | None = None,
    form: Form | None = None,
) -> str | None:
    """None when the kernel can take this call, else the reason (dispatch falls back to torch)."""
    why = device_reason({"x": x, "w1": w1, "w2": w2, "row_scale": row_scale})
    if why is not None:
        return why
    if w1.dim() != 2 or w2.dim() != 2:
        return "w1 and w2 must be 2-D"
    if w1.dtype != w2.dtype:
        return "w1 and w2 have different dtypes"
    (a, c), (b, d) = w1.shape, w2.shape
    if max(a, c) > MAX_C_PAD:
        return f"w1 {a} x {c}: the kernel holds at most {MAX_C_PAD} of w1's rows and columns"
    rows = x.numel() // max(1, x.shape[-1])
    if form is None:
        form = lokr_form(rows, (a, c), (b, d))
    if form != "factored":
        return "the ΔW form (by the count, or asked): the torch path builds kron(w1, w2)"
    if max(x.numel(), rows * a * b) >= 2**31:
        return "a tensor of 2**31 or more elements exceeds the kernels' int32 offsets"
    return None


dispatch.register("lokr_linear", "triton", lokr_linear, supports)
