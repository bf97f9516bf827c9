"""CUDA C++ backend of `lora_linear_mixed` (a batch mixing adapters), registered with dispatch
as the "cuda" implementation.

The batch's rows come grouped by adapter (`RowGroups`, built by the layers from the host-side
adapter names, or by `group_rows` for a direct call), the adapters' weights stacked by the
layer's `LoraStackCache` (the same grouping and cache the Triton backend reads): one segment
per adapter present, `rows` = the grouping's row_order, and library.py's segmented passes run
every adapter in one launch per kernel. The dropout mask's keep bytes are drawn once per
step, each row with its adapter's p (keep_bytes_cuda), and saved for backward's dx and dA.
The per-segment lists come from host tuples, so a call reads nothing back from the device.

`torch.ops.peft_fast.lora_linear_mixed_cuda_fwd` / `_bwd` are torch.library custom ops (the
segment lists travel as int / float lists), opaque to torch.compile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..autograd import base_grads, new_seed
from ..checks import check_mixed_call, mixed_adapter_reason
from ..mixed_batch import LoraStackCache, RowGroups, group_rows
from .dropout import PER_DRAW
from .library import adapter_dtype_reason, cuda_reason, segmented_backward, segmented_forward


@torch.library.custom_op("peft_fast::lora_linear_mixed_cuda_fwd", mutates_args=())
def lora_linear_mixed_cuda_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    rows: Tensor,
    seg_starts: list[int],
    rank_offsets: list[int],
    ranks: list[int],
    scalings: list[float],
    dropout_ps: list[float],
    seed: Optional[Tensor],
    max_rank: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, keep) for 2-D x: y (M, out) in x's dtype, h = dropout(x)Aᵀ/(1-p) (M, max_rank)
    fp32, keep the keep bytes of x's dropout mask (empty without dropout), segment s being
    rows[seg_starts[s]:seg_starts[s+1]] of x on ranks rank_offsets[s] .. + ranks[s] of the
    stacked A (R_total, in) and B (out, R_total)."""
    return segmented_forward(x, weight, bias, A, B, rows, seg_starts, rank_offsets, ranks, scalings, dropout_ps,
                             seed, max_rank)  # fmt: skip


@lora_linear_mixed_cuda_fwd.register_fake
def _(x, weight, bias, A, B, rows, seg_starts, rank_offsets, ranks, scalings, dropout_ps, seed, max_rank):
    M = x.shape[0]
    dropout = any(p > 0.0 for p in dropout_ps)
    keep = x.new_empty((M, -(-x.shape[1] // PER_DRAW)) if dropout else (0,), dtype=torch.uint8)
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, max_rank), dtype=torch.float32), keep


@torch.library.custom_op("peft_fast::lora_linear_mixed_cuda_bwd", mutates_args=())
def lora_linear_mixed_cuda_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    h: Tensor,
    rows: Tensor,
    seg_starts: list[int],
    rank_offsets: list[int],
    ranks: list[int],
    scalings: list[float],
    dropout_ps: list[float],
    keep: Tensor,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of lora_linear_mixed_cuda_fwd's y, the mask read from its keep bytes: the
    stacked adapters' gradients, each adapter's from its own rows only; dx is an empty tensor
    when not `need_dx`."""
    return segmented_backward(dy, x, weight, A, B, h, rows, seg_starts, rank_offsets, ranks, scalings, dropout_ps,
                              keep, need_dx)  # fmt: skip


@lora_linear_mixed_cuda_bwd.register_fake
def _(dy, x, weight, A, B, h, rows, seg_starts, rank_offsets, ranks, scalings, dropout_ps, keep, need_dx):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, rows, seg_starts, rank_offsets, ranks, scalings, dropout_ps, seed, _ = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], rows, output[2])
    ctx.segments = (seg_starts, rank_offsets, ranks, scalings, dropout_ps)


def _backward(ctx, dy, *_):
    x, weight, A, B, h, rows, keep = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA, dB = torch.ops.peft_fast.lora_linear_mixed_cuda_bwd(
        dy, x, weight, A, B, h, rows, *ctx.segments, keep, need[0]
    )
    dW, db = base_grads(dy, x, need[1], need[2])
    grads = (dx if need[0] else None, dW, db, dA if need[3] else None, dB if need[4] else None)
    return grads + (None,) * 8


lora_linear_mixed_cuda_fwd.register_autograd(_backward, setup_context=_setup_context)


def _per_row(groups: RowGroups, x: Tensor) -> Tensor:
    """The grouping's row_order over x's 2-D rows: for x of more than 2 dims every token of a
    batch row gets that row's adapter (T tokens per batch row, row b owning b*T .. b*T+T-1)."""
    T = x.numel() // max(1, x.shape[0] * x.shape[-1]) if x.dim() > 2 else 1
    if T == 1:
        return groups.row_order
    tokens = torch.arange(T, device=groups.row_order.device, dtype=torch.int32)
    return (groups.row_order[:, None] * T + tokens).reshape(-1)


def lora_linear_mixed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: Tensor,
    training: bool = True,
    *,
    plan: RowGroups | None = None,
    stack: LoraStackCache | None = None,
) -> Tensor:
    """Same contract as `peft_fast.ops.lora_linear_mixed`, on the CUDA SGMV kernels; gradients
    reach x, each adapter's A and B (from its own rows only), and weight/bias when they
    require grad. `plan` and `stack` as in the Triton backend: without them they are built
    for this call (reading row_adapter to the host)."""
    groups = plan if plan is not None else group_rows(row_adapter, x.device)
    in_f, out_f = check_mixed_call(x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, row_adapter, groups)
    if not groups.present:
        return torch.nn.functional.linear(x, weight, bias)
    autograd = torch.is_grad_enabled() and any(t.requires_grad for t in (*lora_As, *lora_Bs))
    st = (stack or LoraStackCache()).get(lora_As, lora_Bs, scalings, dropout_ps, groups.present if autograd else None)
    x2 = x.reshape(-1, in_f)
    T = x2.shape[0] // x.shape[0]
    seg_starts = [s * T for s in groups.seg_starts]
    ps = [float(dropout_ps[a]) if training else 0.0 for a in groups.present]
    seed = new_seed(x.device) if any(p > 0.0 for p in ps) else None
    ranks = [st.ranks[a] for a in groups.present]
    y, _, _ = torch.ops.peft_fast.lora_linear_mixed_cuda_fwd(
        x2, weight, bias, st.A, st.B, _per_row(groups, x), seg_starts, [st.offsets[a] for a in groups.present],
        ranks, [float(scalings[a]) for a in groups.present], ps, seed, max(ranks),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_f)


def supports(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: Tensor,
    training: bool = True,
    **_: object,
) -> str | None:
    """None when the CUDA SGMV kernels can take this call, else the reason (dispatch falls back)."""
    named, adapters_why = mixed_adapter_reason(x, weight, bias, lora_As, lora_Bs)
    why = cuda_reason(named, x, weight) or adapters_why
    if why is not None:
        return why
    if x.dim() < 2:
        return "x has no batch dimension"
    if not isinstance(row_adapter, Tensor) or row_adapter.dtype.is_floating_point or row_adapter.device != x.device:
        return f"row_adapter must be an integer tensor on {x.device}"
    return adapter_dtype_reason(x, lora_As[0], "lora_As")


dispatch.register("lora_linear_mixed", "cuda", lora_linear_mixed, supports)
