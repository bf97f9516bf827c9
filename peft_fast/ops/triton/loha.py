"""Triton backend of `loha_linear` (the factored form): torch.library custom ops with autograd,
registered with dispatch as the "triton" implementation. ΔW and the r²-wide Khatri-Rao factors
are never written to memory: the kernels build the factors' tiles in registers.

With up = s · diag(row_scale) (w1a • w2a) (out × r²) and down = (w1b • w2b)ᵀ (r² × in):

Forward (saves x and h, M × r² fp32):
    h = x downᵀ                                       loha_shrink  (u, v = w1bᵀ, w2bᵀ)
    y = h upᵀ                                         loha_expand  (u, v = w1a, w2a; row_scale, s)
Backward:
    dh = dy up                                        loha_shrink  (u, v = w1a, w2a; row_scale, s)
    dw1a, dw2a from upᵀ's gradient dyᵀ h              loha_factor_grad (contracted in registers)
    dw1b, dw2b from down's gradient dhᵀ x             loha_factor_grad
    dx = dh down                                      loha_expand  (u, v = w1bᵀ, w2bᵀ)

Why these kernels pay (per call, M rows, in → out, rank r): the unfused factored form writes and
reads the factors up and down ((in + out) · r² elements) and, in backward, the r²-wide gradients
dyᵀh and dhᵀx (again (in + out) · r²) and their Khatri-Rao contractions: six small launches in
forward and about twelve in backward, each a pass over memory; the kernels above are two launches
forward and four backward with nothing r²-wide in memory but h and dh (M × r²). The count that
chooses this form at all (vs building ΔW) is `lycoris_reference.loha_form`; when it picks ΔW this
backend declines and the torch path builds ΔW (cuBLAS does the M × in × out product).

rank_dropout keeps HF peft's meaning: the layer draws the row mask with torch's generator in
HF's order (so a seeded step matches HF) and passes it as row_scale, which the kernels apply
to the output features. module_dropout skips the op in the layer. Convolutions (loha_conv)
stay on the torch path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_fast.kernels.loha_expand import loha_expand
from peft_fast.kernels.loha_factor_grad import loha_factor_grad
from peft_fast.kernels.loha_shrink import loha_shrink

from .. import dispatch
from ..lycoris_reference import Form, loha_form
from . import device_reason

# Largest rank the kernels take (r padded to a power of two; one chunk holds all of j).
MAX_RANK = 64


@torch.library.custom_op("peft_fast::loha_linear_triton_fwd", mutates_args=())
def loha_linear_triton_fwd(
    x: Tensor, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scaling: float, row_scale: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """(y, h) for 2-D x in the adapter dtype: y (M, out) in that dtype, h = x downᵀ (M, r²) fp32."""
    h = loha_shrink(x, w1b.t(), w2b.t())
    return loha_expand(h, w1a, w2a, row_scale, scaling), h


@loha_linear_triton_fwd.register_fake
def _(x, w1a, w1b, w2a, w2b, scaling, row_scale):
    r = w1a.shape[1]
    return x.new_empty((x.shape[0], w1a.shape[0]), dtype=w1a.dtype), x.new_empty(
        (x.shape[0], r * r), dtype=torch.float32
    )


@torch.library.custom_op("peft_fast::loha_linear_triton_bwd", mutates_args=())
def loha_linear_triton_bwd(
    dy: Tensor,
    x: Tensor,
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    h: Tensor,
    scaling: float,
    row_scale: Optional[Tensor],
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1a, dw1b, dw2a, dw2b) of loha_linear_triton_fwd's y; dx is empty when not `need_dx`."""
    dh = loha_shrink(dy, w1a, w2a, row_scale, scaling)
    dw1a, dw2a = loha_factor_grad(h, dy, w1a, w2a, row_scale, scaling)
    dw1b_t, dw2b_t = loha_factor_grad(dh, x, w1b.t(), w2b.t())
    dx = loha_expand(dh, w1b.t(), w2b.t()) if need_dx else dy.new_empty((0,))
    return dx, dw1a, dw1b_t.t().contiguous(), dw2a, dw2b_t.t().contiguous()


@loha_linear_triton_bwd.register_fake
def _(dy, x, w1a, w1b, w2a, w2b, h, scaling, row_scale, need_dx):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, w1a.new_empty(w1a.shape), w1b.new_empty(w1b.shape), w2a.new_empty(w2a.shape), w2b.new_empty(w2b.shape)


def _setup_context(ctx, inputs, output):
    x, w1a, w1b, w2a, w2b, scaling, row_scale = inputs
    ctx.save_for_backward(x, w1a, w1b, w2a, w2b, output[1], row_scale)
    ctx.scaling = scaling


def _backward(ctx, dy, _dh):
    x, w1a, w1b, w2a, w2b, h, row_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.peft_fast.loha_linear_triton_bwd(dy, x, w1a, w1b, w2a, w2b, h, ctx.scaling, row_scale, need[0])
    return tuple(g if n else None for g, n in zip(grads, need[:5])) + (None, None)


loha_linear_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def loha_linear(
    x: Tensor,
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    scaling: float,
    row_scale: Tensor | None = None,
    form: Form | None = None,
) -> Tensor:
    """Same contract as `peft_fast.ops.loha_linear`, on the fused Triton kernels (factored form).

    x may have any leading dims and strides (viewed as 2-D, copied only when its strides do not
    allow a view); it is cast to the adapter dtype first, as the reference does."""
    n_out, n_in = w1a.shape[0], w1b.shape[1]
    x2 = x.to(w1a.dtype).reshape(-1, n_in)
    y, _ = torch.ops.peft_fast.loha_linear_triton_fwd(x2, w1a, w1b, w2a, w2b, float(scaling), row_scale)
    return y.reshape(*x.shape[:-1], n_out)


def supports(
    x: Tensor,
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    scaling: float,
    row_scale: Tensor | None = None,
    form: Form | None = None,
) -> str | None:
    """None when the kernels can take this call, else the reason (dispatch falls back to torch)."""
    why = device_reason({"x": x, "w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b, "row_scale": row_scale})
    if why is not None:
        return why
    if len({w1a.dtype, w1b.dtype, w2a.dtype, w2b.dtype}) != 1:
        return "the four LoHa factors have different dtypes"
    n_out, rank = w1a.shape
    n_in = w1b.shape[1]
    if rank > MAX_RANK:
        return f"rank {rank} is above the kernels' {MAX_RANK}"
    rows = x.numel() // max(1, n_in)
    if form is None:
        form = loha_form(rows, n_in, n_out, rank)
    if form != "factored":
        return "the ΔW form (by the count, or asked): the torch path builds ΔW"
    if max(x.numel(), rows * n_out, rows * rank * rank) >= 2**31:
        return "a tensor of 2**31 or more elements exceeds the kernels' int32 offsets"
    return None


dispatch.register("loha_linear", "triton", loha_linear, supports)
