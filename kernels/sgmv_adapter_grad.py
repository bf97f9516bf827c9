"""sgmv_adapter_grad: every adapter's weight gradient from its own tokens only, one launch,

    out[offset_a + i, n] = scale_a · Σ_{t in segment of a} P[t, i] · dropout_a(Q[t, n])

for i < r_a. P: M × max_rank (h or dh), Q: M × N; out: (R_total, N), the stacked layout.
dA_stacked = sgmv_adapter_grad(dh, x, 1/(1-p_a), the forward's keep bytes of x);
dB_stackedᵀ = sgmv_adapter_grad(h, dy, s_a).

Structure: grid (rank blocks, column blocks, segments × splits). Each segment is one
adapter; its tokens are split across `split` programs (split-K style, as lora_adapter_grad)
so that a popular adapter's long segment still fills the GPU; each writes an fp32 partial
and the launcher sums the partials with torch (deterministic, no atomics). Rank blocks past
an adapter's rank return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, num_sms, on_gpu, rank_block, rank_cap, sgmv_config, tl_dtype
from .dropout import check_keep_bytes, load_keep
from .row_groups import RowGroups
from .segments import (
    StackedRanks,
    check_per_adapter,
    check_segments,
    load_rows,
    segment_span,
    segment_tokens,
)


@triton.jit
def _sgmv_adapter_grad_kernel(
    p_ptr, q_ptr, out_ptr, scale_ptr, keep_ptr,
    row_order_ptr, seg_adapter_ptr, seg_start_ptr, rank_ptr, offset_ptr,
    M, N, T, tokens_per_split, split,
    stride_pm, stride_pr, stride_qm, stride_qn, stride_os, stride_or, stride_on, stride_keep,
    DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2) // split
    pid_s = tl.program_id(2) % split
    adapter = tl.load(seg_adapter_ptr + seg)
    rank = tl.load(rank_ptr + adapter)
    if pid_r * BLOCK_R >= rank:
        return
    start, n_tokens = segment_span(seg_start_ptr, seg, T)
    j_start = pid_s * tokens_per_split
    if j_start >= n_tokens:
        return
    j_end = tl.minimum(j_start + tokens_per_split, n_tokens)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_M):
        m, valid = segment_tokens(row_order_ptr, start, j0, j_end, T, BLOCK_M)
        pt = tl.trans(load_rows(p_ptr, m, valid, offs_r, stride_pm, stride_pr, rank))
        q = load_rows(q_ptr, m, valid, offs_n, stride_qm, stride_qn, N)
        if DROPOUT:
            q = tl.where(load_keep(keep_ptr, stride_keep, m, offs_n, M, N), q, 0.0)
        acc = tl.dot(pt.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + adapter)
    rows = tl.load(offset_ptr + adapter) + offs_r
    mask = (offs_r[:, None] < rank) & (offs_n[None, :] < N)
    tl.store(out_ptr + pid_s * stride_os + rows[:, None] * stride_or + offs_n[None, :] * stride_on, acc, mask=mask)


def sgmv_adapter_grad(
    P: torch.Tensor,
    Q: torch.Tensor,
    r_total: int,
    segs: RowGroups,
    ranks: StackedRanks,
    scales: torch.Tensor,
    dtype: torch.dtype,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """A new (r_total, N) tensor of `dtype` whose rows `offset_a .. offset_a + r_a` hold
    `scales[a] · P_aᵀ · dropout(Q_a)` over adapter a's tokens; rows of adapters with no
    segment are zero.

    P: (M, ≥ max_rank), Q: (M, N), any strides and float dtypes, cast to `dtype` for the
    product (fp32 accumulation). With `keep` (the (M, ceil(N/8)) uint8 keep bytes of Q's
    dropout mask, dropout.py) Q's dropped elements are zeroed (no rescaling here).
    """
    if P.dim() != 2 or Q.dim() != 2 or P.shape[0] != Q.shape[0] or P.shape[1] < ranks.max_rank:
        raise ValueError(f"P (M, >= {ranks.max_rank}) and Q (M, N) do not fit: {tuple(P.shape)} and {tuple(Q.shape)}")
    if P.device != Q.device:
        raise ValueError(f"P and Q must share a device, got {P.device} and {Q.device}")
    M, N = Q.shape
    T = check_segments(segs, ranks, M, Q.device)
    n = ranks.rank.shape[0]
    check_per_adapter("scales", scales, n, Q.device)
    dropout = keep is not None
    if dropout:
        check_keep_bytes(keep, M, N, Q.device)
    if M == 0 or N == 0 or ranks.max_rank == 0 or segs.num_segments == 0:
        return torch.zeros((r_total, N), dtype=dtype, device=Q.device)
    cfg = sgmv_config(Q.device, segs.max_seg_rows * T, ranks.max_rank, dtype)
    block_r = rank_block(ranks.max_rank, cap=rank_cap(Q.device))
    block_n = cfg.block_n
    block_m = max(cfg.block_k, 16) if on_gpu(Q.device) else 16
    tiles = triton.cdiv(ranks.max_rank, block_r) * triton.cdiv(N, block_n) * segs.num_segments
    max_tokens = segs.max_seg_rows * T
    # About two waves of programs, each with at least a few BLOCK_M steps.
    split = max(1, min(triton.cdiv(2 * num_sms(Q.device), tiles), triton.cdiv(max_tokens, 4 * block_m)))
    tokens_per_split = triton.cdiv(triton.cdiv(max_tokens, split), block_m) * block_m
    split = triton.cdiv(max_tokens, tokens_per_split)
    partial = torch.zeros((split, r_total, N), dtype=torch.float32, device=Q.device)
    grid = (triton.cdiv(ranks.max_rank, block_r), triton.cdiv(N, block_n), segs.num_segments * split)
    _sgmv_adapter_grad_kernel[grid](
        P, Q, partial, scales, keep if dropout else scales,
        segs.row_order, segs.seg_adapter, segs.seg_start, ranks.rank, ranks.offset,
        M, N, T, tokens_per_split, split,
        P.stride(0), P.stride(1), Q.stride(0), Q.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), keep.stride(0) if dropout else 0,
        DROPOUT=dropout, DOT_DTYPE=tl_dtype(dtype), PRECISION=dot_precision(dtype),
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_M=block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    out = partial[0] if split == 1 else partial.sum(0)
    return out.to(dtype)
