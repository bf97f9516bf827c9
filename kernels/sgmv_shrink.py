"""sgmv_shrink: `h[t, :r_a] = scale_a · dropout_a(x[t]) · A_aᵀ` for every token t of every
segment, adapter a being the segment's, in one launch (segmented gather matrix-vector,
SGMV, after Punica / S-LoRA).

x: M × K; A: all adapters' A stacked along the rank, (R_total, K) (see segments.py);
h: M × max_rank fp32. Forward uses it for `h = dropout(x) A_aᵀ / (1 - p_a)`; backward for
`dh = s_a · dy · B_a` by passing the stacked Bᵀ (a strided view, no copy) and no dropout.

Structure: grid (token tiles of the longest segment, rank blocks, segments). A program
loads its segment's adapter, returns at once when its rank block starts past that
adapter's rank or its token tile past the segment's end, then walks K like lora_shrink:
gathered x tile (rows by index, x is never copied into sorted order), Philox mask with
the adapter's p (dropout.py; never stored), cast to A's dtype, fp32 `tl.dot`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, rank_block, rank_cap, sgmv_config, tl_dtype
from .dropout import check_keep_bytes, load_keep
from .row_groups import RowGroups
from .segments import (
    StackedRanks,
    check_per_adapter,
    check_segments,
    check_shrink_args,
    load_rows,
    segment_span,
    segment_tokens,
    store_rows,
)
from .tiles import load_tile


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr, scale_ptr, keep_ptr,
    row_order_ptr, seg_adapter_ptr, seg_start_ptr, rank_ptr, offset_ptr,
    M, K, T,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr, stride_keep,
    DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    seg = tl.program_id(2)
    adapter = tl.load(seg_adapter_ptr + seg)
    rank = tl.load(rank_ptr + adapter)
    if pid_r * BLOCK_R >= rank:
        return
    start, n_tokens = segment_span(seg_start_ptr, seg, T)
    if pid_m * BLOCK_M >= n_tokens:
        return
    m, valid = segment_tokens(row_order_ptr, start, pid_m * BLOCK_M, n_tokens, T, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    a_base = a_ptr + tl.load(offset_ptr + adapter) * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_rows(x_ptr, m, valid, offs_k, stride_xm, stride_xk, K)
        if DROPOUT:
            x = tl.where(load_keep(keep_ptr, stride_keep, m, offs_k, M, K), x, 0.0)
        a = load_tile(a_base, offs_k, offs_r, stride_ak, stride_ar, K, rank)
        acc = tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + adapter)
    store_rows(h_ptr, acc, m, valid, offs_r, stride_hm, stride_hr, rank)


def sgmv_shrink(
    x: torch.Tensor,
    a_stacked: torch.Tensor,
    segs: RowGroups,
    ranks: StackedRanks,
    scales: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """An fp32 (M, ranks.max_rank) tensor h with `h[t, :r_a] = scales[a] · dropout(x[t]) ·
    A_aᵀ` for every token t of a segment of adapter a; every other entry is zero.

    x: (M, K) any strides; a_stacked: (R_total, K) any strides, adapter a's rows at
    `ranks.offset[a]`; scales: (n_adapters,) fp32. With `keep` (the (M, ceil(K/8)) uint8 keep
    bytes of x's dropout mask, drawn with each token's adapter's p: dropout.draw_keep_bytes)
    x's dropped elements are zeroed (no rescaling here: fold 1/(1-p_a) into scales).
    """
    M, K = check_shrink_args(x, a_stacked)
    T = check_segments(segs, ranks, M, x.device)
    n = ranks.rank.shape[0]
    check_per_adapter("scales", scales, n, x.device)
    dropout = keep is not None
    if dropout:
        check_keep_bytes(keep, M, K, x.device)
    h = torch.zeros((M, ranks.max_rank), dtype=torch.float32, device=x.device)
    if M == 0 or ranks.max_rank == 0 or K == 0 or segs.num_segments == 0:
        return h
    cfg = sgmv_config(x.device, segs.max_seg_rows * T, ranks.max_rank, a_stacked.dtype)
    block_r = rank_block(ranks.max_rank, cap=rank_cap(x.device))
    grid = (triton.cdiv(segs.max_seg_rows * T, cfg.block_m), triton.cdiv(ranks.max_rank, block_r), segs.num_segments)
    _sgmv_shrink_kernel[grid](
        x, a_stacked, h, scales, keep if dropout else scales,
        segs.row_order, segs.seg_adapter, segs.seg_start, ranks.rank, ranks.offset,
        M, K, T,
        x.stride(0), x.stride(1), a_stacked.stride(0), a_stacked.stride(1), h.stride(0), h.stride(1),
        keep.stride(0) if dropout else 0,
        DROPOUT=dropout, DOT_DTYPE=tl_dtype(a_stacked.dtype), PRECISION=dot_precision(a_stacked.dtype),
        BLOCK_M=cfg.block_m, BLOCK_R=block_r, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return h
