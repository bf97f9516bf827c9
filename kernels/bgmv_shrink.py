"""bgmv_shrink: the decode-shaped shrink, one program per token (batched gather
matrix-vector, BGMV, after Punica): `h[t, :r_a] = scale_a · dropout_a(x[t]) · A_aᵀ` with a
the adapter of t's batch row (`row_adapter[t // T]`, -1 = none: the program returns).

Same contract as sgmv_shrink, for batches whose segments are too short for a 16-row
`tl.dot` tile (one token per request, many adapters): each program reduces a
(BLOCK_R × BLOCK_K) tile of its adapter's A against one x vector with fp32 multiply-adds,
operands rounded to A's dtype first, as tl.dot would see them. No sorting is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import bgmv_config, rank_block, rank_cap, tl_dtype
from .dropout import check_keep_bytes, load_keep
from .segments import StackedRanks, check_per_adapter, check_rows, check_shrink_args
from .tiles import load_tile, store_tile


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr, scale_ptr, keep_ptr, row_adapter_ptr, rank_ptr, offset_ptr,
    M, K, T,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr, stride_keep,
    DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0)
    pid_r = tl.program_id(1)
    adapter = tl.load(row_adapter_ptr + tok // T)
    if adapter < 0:
        return
    rank = tl.load(rank_ptr + adapter)
    if pid_r * BLOCK_R >= rank:
        return
    offs_m = tok + tl.arange(0, 1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    a_base = a_ptr + tl.load(offset_ptr + adapter) * stride_ar
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)  # (1, BLOCK_K)
        if DROPOUT:
            x = tl.where(load_keep(keep_ptr, stride_keep, offs_m, offs_k, M, K), x, 0.0)
        a = load_tile(a_base, offs_r, offs_k, stride_ar, stride_ak, rank, K)  # (BLOCK_R, BLOCK_K)
        acc += tl.sum(x.to(DOT_DTYPE).to(tl.float32) * a.to(DOT_DTYPE).to(tl.float32), axis=1)
    acc = acc * tl.load(scale_ptr + adapter)
    store_tile(h_ptr, acc[None, :], offs_m, offs_r, stride_hm, stride_hr, M, rank)


def bgmv_shrink(
    x: torch.Tensor,
    a_stacked: torch.Tensor,
    row_adapter: torch.Tensor,
    tokens_per_row: int,
    ranks: StackedRanks,
    scales: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as `sgmv_shrink` (an fp32 (M, ranks.max_rank) tensor, zero outside each
    token's adapter ranks and on tokens of no adapter), with the grouping given per batch
    row: `row_adapter` (M // tokens_per_row,) int32, -1 for base-only rows."""
    M, K = check_shrink_args(x, a_stacked)
    check_rows(row_adapter, tokens_per_row, M, x.device)
    n = ranks.rank.shape[0]
    check_per_adapter("scales", scales, n, x.device)
    dropout = keep is not None
    if dropout:
        check_keep_bytes(keep, M, K, x.device)
    h = torch.zeros((M, ranks.max_rank), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0 or ranks.max_rank == 0:
        return h
    cfg = bgmv_config(x.device)
    block_r = rank_block(ranks.max_rank, cap=rank_cap(x.device))
    _bgmv_shrink_kernel[(M, triton.cdiv(ranks.max_rank, block_r))](
        x, a_stacked, h, scales, keep if dropout else scales,
        row_adapter, ranks.rank, ranks.offset,
        M, K, tokens_per_row,
        x.stride(0), x.stride(1), a_stacked.stride(0), a_stacked.stride(1), h.stride(0), h.stride(1),
        keep.stride(0) if dropout else 0,
        DROPOUT=dropout, DOT_DTYPE=tl_dtype(a_stacked.dtype), BLOCK_R=block_r, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return h
