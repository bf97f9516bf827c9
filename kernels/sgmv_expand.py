"""sgmv_expand: `out[t] += scale_a · mask_a ⊙ (h[t, :r_a] · B_aᵀ)` for every token t of every
segment, adapter a being the segment's, in one launch, in place.

out: M × N (the base product, computed before by cuBLAS); h: M × max_rank (fp32, from
sgmv_shrink); B: all adapters' B stacked along the rank, (N, R_total), adapter a's columns
at `ranks.offset[a]`. Forward: `y += s_a · h B_aᵀ`. Backward's dx reuses it with h = dh,
B = the stacked Aᵀ view (K, R_total), scale 1/(1-p_a) and the dropout mask of x (numbered
over out's M × N = x's M × K, read from the forward's keep bytes) gating the adapter term:
`dx = dy W + mask ⊙ (dh A_a) / (1 - p_a)`.

Structure: grid (token tiles of the longest segment, column blocks, segments). A program
returns at once past its segment's end; it walks its adapter's real rank in BLOCK_R steps
(h cast to B's dtype, fp32 `tl.dot`), never past it, then reads, adds and writes its
gathered out tile. Rows of no segment are untouched.
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
    check_expand_args,
    check_per_adapter,
    check_segments,
    load_rows,
    segment_span,
    segment_tokens,
    store_rows,
)
from .tiles import load_tile


@triton.jit
def _sgmv_expand_kernel(
    out_ptr, h_ptr, b_ptr, scale_ptr, keep_ptr,
    row_order_ptr, seg_adapter_ptr, seg_start_ptr, rank_ptr, offset_ptr,
    M, N, T,
    stride_om, stride_on, stride_hm, stride_hr, stride_bn, stride_br, stride_keep,
    DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2)
    start, n_tokens = segment_span(seg_start_ptr, seg, T)
    if pid_m * BLOCK_M >= n_tokens:
        return
    m, valid = segment_tokens(row_order_ptr, start, pid_m * BLOCK_M, n_tokens, T, BLOCK_M)
    adapter = tl.load(seg_adapter_ptr + seg)
    rank = tl.load(rank_ptr + adapter)
    b_base = b_ptr + tl.load(offset_ptr + adapter) * stride_br
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h = load_rows(h_ptr, m, valid, offs_r, stride_hm, stride_hr, rank)
        b = load_tile(b_base, offs_r, offs_n, stride_br, stride_bn, rank, N)
        acc = tl.dot(h.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + adapter)
    if DROPOUT:
        acc = tl.where(load_keep(keep_ptr, stride_keep, m, offs_n, M, N), acc, 0.0)
    out = load_rows(out_ptr, m, valid, offs_n, stride_om, stride_on, N)
    store_rows(out_ptr, out.to(tl.float32) + acc, m, valid, offs_n, stride_om, stride_on, N)


def sgmv_expand(
    out: torch.Tensor,
    h: torch.Tensor,
    b_stacked: torch.Tensor,
    segs: RowGroups,
    ranks: StackedRanks,
    scales: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add `scales[a] · mask ⊙ (h[t, :r_a] · B_aᵀ)` into `out` (M, N) in place for every
    token t of a segment of adapter a, and return `out`; other rows are left as they are.

    h: (M, ≥ max_rank) any float dtype, cast to b_stacked's dtype for its product;
    b_stacked: (N, R_total) any strides. With `keep` (the (M, ceil(N/8)) uint8 keep bytes of a
    dropout mask over out's M × N, dropout.py) the adapter term is gated by it (no rescaling).
    """
    M, N = check_expand_args(out, h, b_stacked, ranks.max_rank)
    T = check_segments(segs, ranks, M, out.device)
    n = ranks.rank.shape[0]
    check_per_adapter("scales", scales, n, out.device)
    dropout = keep is not None
    if dropout:
        check_keep_bytes(keep, M, N, out.device)
    if M == 0 or N == 0 or ranks.max_rank == 0 or segs.num_segments == 0:
        return out
    cfg = sgmv_config(out.device, segs.max_seg_rows * T, ranks.max_rank, b_stacked.dtype)
    block_r = rank_block(ranks.max_rank, cap=rank_cap(out.device))
    grid = (triton.cdiv(segs.max_seg_rows * T, cfg.block_m), triton.cdiv(N, cfg.block_n), segs.num_segments)
    _sgmv_expand_kernel[grid](
        out, h, b_stacked, scales, keep if dropout else scales,
        segs.row_order, segs.seg_adapter, segs.seg_start, ranks.rank, ranks.offset,
        M, N, T,
        out.stride(0), out.stride(1), h.stride(0), h.stride(1), b_stacked.stride(0), b_stacked.stride(1),
        keep.stride(0) if dropout else 0,
        DROPOUT=dropout, DOT_DTYPE=tl_dtype(b_stacked.dtype), PRECISION=dot_precision(b_stacked.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
