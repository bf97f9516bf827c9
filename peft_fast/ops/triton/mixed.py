"""Triton backend of `lora_linear_mixed`: a batch whose rows use different LoRA adapters
(or none), registered with dispatch as the "triton" implementation.

Forward, with a = the adapter of each token's batch row, s_a its scaling, p_a its dropout:
    y = x Wᵀ + b                                  cuBLAS (F.linear): the base product is the
                                                  same for every row, nothing to fuse per adapter
    keep bytes of x's mask, each row's p_a    dropout.draw_keep_bytes: Philox once per 8
                                                  elements of x, 1 bit per element stored
    h = dropout_a(x) A_aᵀ / (1 - p_a)             sgmv_shrink | bgmv_shrink, fp32 (M × max r)
    y += s_a · h B_aᵀ                             sgmv_expand | bgmv_expand, in place
Backward (saves x, h and the keep bytes; never a byte mask or the dropped x; no Philox):
    dh = s_a · dy B_a                             shrink with the stacked Bᵀ view
    dB_a = s_a · dy_aᵀ h_a, dA_a = dh_aᵀ dropout_a(x_a)/(1-p_a)
                                                  sgmv_adapter_grad, each adapter over its
                                                  own tokens, mask from the keep bytes
    dx = dy W + mask_a ⊙ (dh A_a)/(1-p_a)         torch mm + expand with the stacked Aᵀ view
    dW = dyᵀ x, db = Σ dy                         torch, only when W / b require grad

Two paths, chosen per batch by `choose_path`: SGMV (tokens grouped into one segment per
adapter, `tl.dot` tiles of BLOCK_M tokens: prefill, popular adapters) and BGMV (one program
per token: decode with many adapters, where segments are shorter than a 16-row tile).
Adapter weights come stacked along the rank (`ops.mixed_batch.LoraStackCache`): one launch
serves every adapter and rank, with no padding to the largest rank.

`torch.ops.peft_fast.lora_linear_mixed_triton_fwd` / `_bwd` are torch.library custom ops:
the grouping (`RowGroups`) travels as its int32 tensors plus its host tuples as int lists,
so torch.compile sees no graph break here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_fast.kernels.bgmv_expand import bgmv_expand
from peft_fast.kernels.bgmv_shrink import bgmv_shrink
from peft_fast.kernels.dropout import MAX_ELEMENTS, draw_keep_bytes, keep_bytes_shape
from peft_fast.kernels.segments import StackedRanks
from peft_fast.kernels.sgmv_adapter_grad import sgmv_adapter_grad
from peft_fast.kernels.sgmv_expand import sgmv_expand
from peft_fast.kernels.sgmv_shrink import sgmv_shrink

from .. import dispatch
from ..autograd import base_grads, new_seed
from ..checks import check_mixed_call, mixed_adapter_reason, size_reason
from ..mixed_batch import LoraStackCache, RowGroups, group_rows
from . import device_reason

PATHS = ("sgmv", "bgmv")
# BGMV when rows are single tokens and segments average fewer rows than a tl.dot tile.
BGMV_MAX_MEAN_SEGMENT = 16


def choose_path(groups: RowGroups, tokens_per_row: int) -> str:
    """ "bgmv" for decode-shaped batches (one token per row, segments averaging fewer than
    BGMV_MAX_MEAN_SEGMENT rows), "sgmv" otherwise. Depends on the batch only."""
    if tokens_per_row == 1 and groups.num_adapted_rows < BGMV_MAX_MEAN_SEGMENT * groups.num_segments:
        return "bgmv"
    return "sgmv"


class _Launch:
    """The kernels of one call, given the op's arguments: the grouping, the stacked ranks, the
    per-adapter numbers ((4, n): scaling, p, 1/(1-p), 1), the keep bytes of x's dropout mask
    (None without dropout) and the path."""

    def __init__(self, groups: RowGroups, ints: Tensor, numbers: Tensor, max_rank: int, keep, path: str, M: int):
        self.groups, self.keep, self.path = groups, keep, path
        self.T = M // groups.batch_size
        self.ranks = StackedRanks(ints[0], ints[1], max_rank)
        self.scaling = numbers[0]
        self.keep_scale = numbers[2] if keep is not None else numbers[3]

    def shrink(self, x: Tensor, a_stacked: Tensor, scales: Tensor, dropout: bool) -> Tensor:
        keep = self.keep if dropout else None
        if self.path == "bgmv":
            return bgmv_shrink(x, a_stacked, self.groups.row_adapter, self.T, self.ranks, scales, keep)
        return sgmv_shrink(x, a_stacked, self.groups, self.ranks, scales, keep)

    def expand(self, out: Tensor, h: Tensor, b_stacked: Tensor, scales: Tensor, dropout: bool) -> Tensor:
        keep = self.keep if dropout else None
        if self.path == "bgmv":
            return bgmv_expand(out, h, b_stacked, self.groups.row_adapter, self.T, self.ranks, scales, keep)
        return sgmv_expand(out, h, b_stacked, self.groups, self.ranks, scales, keep)


def draw_mixed_keep(x: Tensor, row_adapter: Tensor, ps: Tensor, seed: Tensor) -> Tensor:
    """The keep bytes of 2-D x's dropout mask, each token drawn with its row's adapter's p
    (`ps[row_adapter[row]]`; p = 0 on base-only rows, which no kernel reads)."""
    M, K = x.shape
    adapter = row_adapter.long()
    row_p = torch.where(adapter >= 0, ps[adapter.clamp(min=0)], 0.0).to(torch.float32)
    return draw_keep_bytes(seed, M, K, 0.0, x.device, row_p.repeat_interleave(M // max(1, row_adapter.shape[0])))


@torch.library.custom_op("peft_fast::lora_linear_mixed_triton_fwd", mutates_args=())
def lora_linear_mixed_triton_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    row_adapter: Tensor,
    row_order: Tensor,
    seg_adapter: Tensor,
    seg_start: Tensor,
    present: list[int],
    seg_rows: list[int],
    ints: Tensor,
    numbers: Tensor,
    max_rank: int,
    seed: Optional[Tensor],
    path: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, keep) for 2-D x (M, in) whose rows are grouped by the `RowGroups` given field by
    field: y (M, out) in x's dtype, h = dropout_a(x) A_aᵀ / (1 - p_a) (M, max_rank) fp32, keep
    the keep bytes of x's dropout mask (empty without a seed). A, B: the stacked adapters; ints
    (2, n) rank/offset, numbers (4, n) as `StackedLora`'s."""
    groups = RowGroups(row_adapter, row_order, seg_adapter, seg_start, tuple(present), tuple(seg_rows))
    keep = (
        draw_mixed_keep(x, row_adapter, numbers[1], seed) if seed is not None else x.new_empty((0,), dtype=torch.uint8)
    )
    launch = _Launch(groups, ints, numbers, max_rank, keep if seed is not None else None, path, x.shape[0])
    y = F.linear(x, weight, bias)
    h = launch.shrink(x, A, launch.keep_scale, dropout=True)
    launch.expand(y, h, B, launch.scaling, dropout=False)
    return y, h, keep


@lora_linear_mixed_triton_fwd.register_fake
def _(x, weight, bias, A, B, row_adapter, row_order, seg_adapter, seg_start, present, seg_rows, ints, numbers,
      max_rank, seed, path):  # fmt: skip
    M = x.shape[0]
    keep = x.new_empty(keep_bytes_shape(*x.shape) if seed is not None else (0,), dtype=torch.uint8)
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, max_rank), dtype=torch.float32), keep


@torch.library.custom_op("peft_fast::lora_linear_mixed_triton_bwd", mutates_args=())
def lora_linear_mixed_triton_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    h: Tensor,
    row_adapter: Tensor,
    row_order: Tensor,
    seg_adapter: Tensor,
    seg_start: Tensor,
    present: list[int],
    seg_rows: list[int],
    ints: Tensor,
    numbers: Tensor,
    keep: Optional[Tensor],
    path: str,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of lora_linear_mixed_triton_fwd's y, the dropout mask read from its keep
    bytes (None without dropout); dA, dB are the stacked adapters' gradients (each adapter's
    from its own rows only); dx is an empty tensor when not `need_dx`."""
    groups = RowGroups(row_adapter, row_order, seg_adapter, seg_start, tuple(present), tuple(seg_rows))
    launch = _Launch(groups, ints, numbers, h.shape[1], keep, path, x.shape[0])
    r_total = A.shape[0]
    dh = launch.shrink(dy, B.t(), launch.scaling, dropout=False)
    dB = sgmv_adapter_grad(h, dy, r_total, groups, launch.ranks, launch.scaling, B.dtype).t().contiguous()
    dA = sgmv_adapter_grad(dh, x, r_total, groups, launch.ranks, launch.keep_scale, A.dtype, keep)
    dx = launch.expand(dy.mm(weight), dh, A.t(), launch.keep_scale, dropout=True) if need_dx else dy.new_empty((0,))
    return dx, dA, dB


@lora_linear_mixed_triton_bwd.register_fake
def _(dy, x, weight, A, B, h, row_adapter, row_order, seg_adapter, seg_start, present, seg_rows, ints, numbers,
      keep, path, need_dx):  # fmt: skip
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty((0,))
    return dx, A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _, A, B, *grouping, ints, numbers, _, seed, path = inputs
    keep = output[2] if seed is not None else None
    ctx.save_for_backward(x, weight, A, B, output[1], *grouping[:4], ints, numbers, keep)
    ctx.host = (grouping[4], grouping[5], path)


def _backward(ctx, dy, *_):
    x, weight, A, B, h, row_adapter, row_order, seg_adapter, seg_start, ints, numbers, keep = ctx.saved_tensors
    present, seg_rows, path = ctx.host
    need = ctx.needs_input_grad
    dx, dA, dB = torch.ops.peft_fast.lora_linear_mixed_triton_bwd(
        dy, x, weight, A, B, h, row_adapter, row_order, seg_adapter, seg_start, present, seg_rows, ints, numbers,
        keep, path, need[0],
    )  # fmt: skip
    dW, db = base_grads(dy, x, need[1], need[2])
    grads = (dx if need[0] else None, dW, db, dA if need[3] else None, dB if need[4] else None)
    return grads + (None,) * 11


lora_linear_mixed_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def tokens_per_row(x: Tensor) -> int:
    """Tokens per batch row of x (batch, ..., in): the product of its middle dimensions."""
    T = 1
    for d in x.shape[1:-1]:
        T *= d
    return T


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
    path: str | None = None,
) -> Tensor:
    """Same contract as `peft_fast.ops.lora_linear_mixed`, on the SGMV/BGMV Triton kernels.

    x: (batch, ..., in) with row i (dim 0) on adapter `row_adapter[i]` (-1 = base only);
    all its tokens (the middle dims) use that adapter. `plan` (the batch's `RowGroups`) and
    `stack` (the layer's stacked-weight cache) are optional: without them they are built for
    this call (reading row_adapter to the host). `path` forces "sgmv" or "bgmv" (default:
    `choose_path`). Gradients reach x, each adapter's A and B (from its own rows only), and
    weight/bias when they require grad.
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    groups = plan if plan is not None else group_rows(row_adapter, x.device)
    in_f, out_f = check_mixed_call(x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, row_adapter, groups)
    if not groups.present:
        return F.linear(x, weight, bias)
    autograd = torch.is_grad_enabled() and any(t.requires_grad for t in (*lora_As, *lora_Bs))
    st = (stack or LoraStackCache()).get(lora_As, lora_Bs, scalings, dropout_ps, groups.present if autograd else None)
    T = tokens_per_row(x)
    seed = new_seed(x.device) if training and any(dropout_ps[a] > 0.0 for a in groups.present) else None
    max_rank = max(st.ranks[a] for a in groups.present)
    y, _, _ = torch.ops.peft_fast.lora_linear_mixed_triton_fwd(
        x.reshape(-1, in_f), weight, bias, st.A, st.B, *groups[:4], list(groups.present), list(groups.seg_rows),
        st.ints, st.numbers, max_rank, seed, path or choose_path(groups, T),
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
    """None when the Triton kernels can take this call, else the reason (dispatch falls back)."""
    named, adapters_why = mixed_adapter_reason(x, weight, bias, lora_As, lora_Bs)
    why = device_reason(named) or adapters_why
    if why is not None:
        return why
    if x.dim() < 2:
        return "x has no batch dimension"
    if isinstance(row_adapter, Tensor) and row_adapter.device.type not in ("cpu", x.device.type):
        return f"row_adapter is on {row_adapter.device}"
    if training and any(p > 0.0 for p in dropout_ps) and x.numel() > MAX_ELEMENTS:
        return f"dropout on {x.numel()} elements exceeds the kernels' int32 mask numbering"
    return size_reason(x, weight)


dispatch.register("lora_linear_mixed", "triton", lora_linear_mixed, supports)
