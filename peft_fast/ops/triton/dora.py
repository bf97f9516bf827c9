"""Triton backend of the DoRA ops: `dora_weight_norm` (kernels/dora_norm.py) and `dora_linear`
(torch.library custom ops with autograd), registered with dispatch as the "triton" implementations.

`dora_linear` has two paths, chosen by name with `set_dora_path` / `use_dora_path`:

* "fused": y and u from one matmul kernel (kernels/dora_linear.py: the magnitude scale in the
  epilogue; with dropout, x·Wᵀ and dropout(x)·Wᵀ in two accumulators of the same pass over W),
  dx from kernels/dora_dx.py (the same two-accumulator pass over W);
* "composite": the base products from torch (cuBLAS), then one elementwise kernel for the combine
  (kernels/dora_epilogue.py); backward in torch. With dropout it runs dropout(x)·Wᵀ as a second
  matmul on a materialized dropped copy (what HF peft does), with the same mask.

"auto" is "composite" until a GPU measurement says the fused kernels win (DESIGN: "auto" never
slower than the unfused torch composition). Both paths share the rest:

    h  = dropout(x) Aᵀ / (1 − p)            lora_shrink (fp32, saved for backward)
    dh = s · (scale ⊙ dy) B                 lora_shrink with (scale ⊙ B)ᵀ
    dB = s · scale ⊙ dyᵀ h                  lora_adapter_grad, rows scaled by scale
    dA = dhᵀ dropout(x) / (1 − p)           lora_adapter_grad (mask read from the keep bytes)
    dm = Σ_m dy ⊙ u / norm                  torch (u = x'Wᵀ + s·hBᵀ, saved by the forward)

scale = m / norm with the norm a constant (HF peft detaches it). The dropout seed is drawn from
torch's generator on x's device, as for LoRA, and Philox runs once per step: the forward shrink
writes the mask's keep bytes (1 bit per element of x, kernels/dropout.py), and everything else
(the fused forward's second accumulator, the composite's dropped copy, dA, dx) reads them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from peft_fast.kernels.dora_dx import dora_dx
from peft_fast.kernels.dora_epilogue import dora_epilogue
from peft_fast.kernels.dora_linear import dora_linear as dora_linear_kernel
from peft_fast.kernels.dora_norm import dora_norm
from peft_fast.kernels.dropout import MAX_ELEMENTS, unpack_keep_bytes
from peft_fast.kernels.lora_adapter_grad import lora_adapter_grad
from peft_fast.kernels.lora_shrink import lora_shrink

from .. import dispatch
from ..autograd import base_grads, new_seed
from ..checks import size_reason
from . import device_reason
from .lora import new_keep

DORA_PATHS = ("auto", "composite", "fused")
_state = threading.local()


def set_dora_path(name: str) -> None:
    """Choose the Triton DoRA path for this thread: "auto" (composite until measured), "composite" or "fused"."""
    if name not in DORA_PATHS:
        raise ValueError(f"DoRA path must be one of {list(DORA_PATHS)}, got {name!r}")
    _state.path = name


def get_dora_path() -> str:
    """The DoRA path "auto" resolves to, or the one chosen by name."""
    name = getattr(_state, "path", "auto")
    return "composite" if name == "auto" else name


@contextlib.contextmanager
def use_dora_path(name: str) -> Iterator[None]:
    """Run a block with another DoRA path."""
    old = getattr(_state, "path", "auto")
    set_dora_path(name)
    try:
        yield
    finally:
        _state.path = old


def _dropped(x: Tensor, keep: Tensor, p: float) -> Tensor:
    """dropout(x) with the mask held in `keep`'s keep bytes, materialized (the composite path only)."""
    return (x * unpack_keep_bytes(keep, x.shape[1])).div_(1.0 - p).to(x.dtype)


@torch.library.custom_op("peft_fast::dora_linear_triton_fwd", mutates_args=())
def dora_linear_triton_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    fused: bool,
    save_u: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, u, keep) for 2-D x: y (M, out) and u = x'Wᵀ + s·hBᵀ (M, out) in x's dtype (an empty
    tensor unless `save_u`: only the magnitude's gradient reads it), h (M, r) fp32, keep the
    dropout mask's keep bytes (empty without dropout)."""
    scale = magnitude.float() / norm.float()
    keep = new_keep(x, dropout_p)
    kept = keep if dropout_p > 0.0 else None
    h = lora_shrink(x, lora_A, 1.0 / (1.0 - dropout_p), dropout_p, seed, kept)
    if fused:
        y, u = dora_linear_kernel(x, weight, bias, h, lora_B, scale, scaling, dropout_p, kept, store_u=save_u)
    else:
        base = x @ weight.t()
        v = _dropped(x, keep, dropout_p) @ weight.t() if dropout_p > 0.0 else None
        lora = h.to(lora_B.dtype) @ lora_B.t()
        y, u = dora_epilogue(base, v, lora, scale, bias, scaling, store_u=save_u)
    return y, h, (u if u is not None else x.new_empty((0,))), keep


@dora_linear_triton_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, fused, save_u):
    M, N = x.shape[0], weight.shape[0]
    h = x.new_empty((M, lora_A.shape[0]), dtype=torch.float32)
    u = x.new_empty((M, N)) if save_u else x.new_empty((0,))
    return x.new_empty((M, N)), h, u, new_keep(x, dropout_p)


@torch.library.custom_op("peft_fast::dora_linear_triton_bwd", mutates_args=())
def dora_linear_triton_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    norm: Tensor,
    h: Tensor,
    u: Tensor,
    keep: Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    fused: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dmagnitude) of dora_linear_triton_fwd's y; dx is empty when not `need_dx`."""
    adapter_dtype = lora_A.dtype
    scale = magnitude.float() / norm.float()
    if u.numel():
        dmag = ((dy.float() * u.float()).sum(0) / norm.float()).to(magnitude.dtype)
    else:  # the forward saved no u: the magnitude needed no gradient
        dmag = torch.zeros_like(magnitude)
    scaled_B = (lora_B.float() * scale[:, None]).to(adapter_dtype)
    dh = lora_shrink(dy, scaled_B.t(), scaling)
    dB = (lora_adapter_grad(h, dy, torch.float32, scaling, transpose=True) * scale[:, None]).to(adapter_dtype)
    kept = keep if dropout_p > 0.0 else None
    dA = lora_adapter_grad(dh, x, adapter_dtype, 1.0 / (1.0 - dropout_p), kept)
    if not need_dx:
        dx = dy.new_empty((0,))
    elif fused:
        dx = dora_dx(dy, weight, scale, dh, lora_A, dropout_p, kept)
    else:
        adapter = dh.to(adapter_dtype) @ lora_A
        if dropout_p > 0.0:
            mask = unpack_keep_bytes(keep, x.shape[1])
            inner = (dy.float() * (scale - 1.0)).to(dy.dtype) @ weight + adapter.to(dy.dtype)
            dx = (dy @ weight + (inner * mask).div_(1.0 - dropout_p)).to(dy.dtype)
        else:
            dx = ((dy.float() * scale).to(dy.dtype) @ weight + adapter.to(dy.dtype)).to(dy.dtype)
    return dx, dA, dB, dmag


@dora_linear_triton_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, norm, h, u, keep, scaling, dropout_p, need_dx, fused):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), magnitude.new_empty(magnitude.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, fused, _ = inputs
    _, h, u, keep = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, norm, h, u, keep)
    ctx.scaling, ctx.dropout_p, ctx.fused = scaling, dropout_p, fused


def _backward(ctx, dy, _dh, _du, _keep):
    x, weight, lora_A, lora_B, magnitude, norm, h, u, keep = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA, dB, dmag = torch.ops.peft_fast.dora_linear_triton_bwd(
        dy, x, weight, lora_A, lora_B, magnitude, norm, h, u, keep, ctx.scaling, ctx.dropout_p, need[0], ctx.fused
    )
    _, db = base_grads(dy, x, False, need[2])
    return (
        dx if need[0] else None,
        None,
        db,
        dA if need[3] else None,
        dB if need[4] else None,
        dmag if need[5] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


dora_linear_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    norm: Tensor,
) -> Tensor:
    """Same contract as `peft_fast.ops.dora_linear`, on Triton kernels (the path `get_dora_path` names)."""
    in_f, out_f = weight.shape[1], weight.shape[0]
    p = float(dropout_p) if training else 0.0
    x2 = x.reshape(-1, in_f)
    seed = new_seed(x.device) if p > 0.0 else None
    fused = get_dora_path() == "fused"
    save_u = torch.is_grad_enabled() and magnitude.requires_grad
    y, _, _, _ = torch.ops.peft_fast.dora_linear_triton_fwd(
        x2, weight, bias, lora_A, lora_B, magnitude, norm.detach(), float(scaling), p, seed, fused, save_u
    )
    return y.reshape(*x.shape[:-1], out_f)


def supports(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    norm: Tensor,
) -> str | None:
    """None when the Triton kernels can take this call, else the reason (dispatch falls back)."""
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}
    why = device_reason({**named, "norm": norm})
    if why is not None:
        return why
    if weight.requires_grad:
        return "the base weight requires grad (the kernels treat it as frozen); the torch path trains it"
    if dropout_p > 0.0 and training and x.numel() > MAX_ELEMENTS:
        return f"dropout on {x.numel()} elements exceeds the kernels' int32 mask numbering"
    return size_reason(x, weight)


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """`ops.dora_weight_norm` on the one-pass kernel."""
    return dora_norm(weight, lora_A.detach(), lora_B.detach(), scaling)


def _norm_supports(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> str | None:
    why = device_reason({"weight": weight, "lora_A": lora_A, "lora_B": lora_B})
    if why is not None:
        return why
    if lora_A.dtype != lora_B.dtype:
        return f"lora_A and lora_B have different dtypes ({lora_A.dtype}, {lora_B.dtype})"
    return None


dispatch.register("dora_linear", "triton", dora_linear, supports)
dispatch.register("dora_weight_norm", "triton", dora_weight_norm, _norm_supports)
