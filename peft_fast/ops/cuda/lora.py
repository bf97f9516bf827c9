"""CUDA C++ backend of `lora_linear` (csrc/, built as peft_fast._C), registered with dispatch
as the "cuda" implementation: one adapter is one segment of library.py's segmented passes.

The base product stays on cuBLAS; the adapter path is the shrink kernel (dropout from keep
bytes drawn once per step from a Philox seed, bit-identical to the Triton kernels' for the
same seed, and saved for backward's dx and dA) and an expand-accumulate into the base
output. x may have any leading dims and strides (viewed as 2-D; copied only when its last
dimension is not contiguous).

`torch.ops.peft_fast.lora_linear_cuda_fwd` / `lora_linear_cuda_bwd` take the same arguments
as the Triton backend's `lora_linear_triton_fwd` / `_bwd` and are opaque to torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..autograd import new_seed, register_lora_autograd
from .dropout import PER_DRAW
from .library import adapter_dtype_reason, cuda_reason, segmented_backward, segmented_forward


def _one_segment(M: int, r: int, scaling: float, dropout_p: float) -> tuple[list, list, list, list, list]:
    """(seg_starts, rank_offsets, ranks, scalings, dropout_ps) of M rows on one adapter of rank r."""
    return [0, M], [0], [r], [scaling], [dropout_p]


@torch.library.custom_op("peft_fast::lora_linear_cuda_fwd", mutates_args=())
def lora_linear_cuda_fwd(
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
    r = lora_A.shape[0]
    segs = _one_segment(x.shape[0], r, scaling, dropout_p)
    return segmented_forward(x, weight, bias, lora_A, lora_B, None, *segs, seed, r)


@lora_linear_cuda_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M = x.shape[0]
    keep = x.new_empty((M, -(-x.shape[1] // PER_DRAW)) if dropout_p > 0.0 else (0,), dtype=torch.uint8)
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=torch.float32), keep


@torch.library.custom_op("peft_fast::lora_linear_cuda_bwd", mutates_args=())
def lora_linear_cuda_bwd(
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
    """(dx, dA, dB) of lora_linear_cuda_fwd's y, the mask read from its keep bytes; dx is an
    empty tensor when not `need_dx`."""
    segs = _one_segment(x.shape[0], lora_A.shape[0], scaling, dropout_p)
    return segmented_backward(dy, x, weight, lora_A, lora_B, h, None, *segs, keep, need_dx)


@lora_linear_cuda_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, keep, scaling, dropout_p, need_dx):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


register_lora_autograd(lora_linear_cuda_fwd, torch.ops.peft_fast.lora_linear_cuda_bwd)


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
    """Same contract as `peft_fast.ops.lora_linear`, on the CUDA kernels; gradients reach x,
    lora_A, lora_B, and weight/bias when they require grad."""
    in_f, out_f = weight.shape[1], weight.shape[0]
    p = float(dropout_p) if training else 0.0
    seed = new_seed(x.device) if p > 0.0 else None
    y, _, _ = torch.ops.peft_fast.lora_linear_cuda_fwd(
        x.reshape(-1, in_f), weight, bias, lora_A, lora_B, float(scaling), p, seed
    )
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
    """None when the CUDA kernels can take this call, else the reason (dispatch falls back)."""
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    return cuda_reason(named, x, weight) or adapter_dtype_reason(x, lora_A, "lora_A")


dispatch.register("lora_linear", "cuda", lora_linear, supports)
