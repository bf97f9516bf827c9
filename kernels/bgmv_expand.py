"""bgmv_expand: the decode-shaped expand, one program per (token, column block):
`out[t] += scale_a · mask_a ⊙ (h[t, :r_a] · B_aᵀ)` in place, with a = `row_adapter[t // T]`
(-1 = none: the program returns). Same contract as sgmv_expand, for batches whose
segments are too short for a 16-row `tl.dot` tile; fp32 multiply-adds over the adapter's
real rank, operands rounded to B's dtype first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import bgmv_config, rank_block, rank_cap, tl_dtype
from .dropout import check_keep_bytes, load_keep
from .segments import StackedRanks, check_expand_args, check_per_adapter, check_rows
from .tiles import load_tile, store_tile


@triton.jit
def _bgmv_expand_kernel(
    out_ptr, h_ptr, b_ptr, scale_ptr, keep_ptr, row_adapter_ptr, rank_ptr, offset_ptr,
    M, N, T,
    stride_om, stride_on, stride_hm, stride_hr, stride_bn, stride_br, stride_keep,
    DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter = tl.load(row_adapter_ptr + tok // T)
    if adapter < 0:
        return
    rank = tl.load(rank_ptr + adapter)
    offs_m = tok + tl.arange(0, 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_base = b_ptr + tl.load(offset_ptr + adapter) * stride_br
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h = load_tile(h_ptr, offs_r, offs_m, stride_hr, stride_hm, rank, M)  # (BLOCK_R, 1)
        b = load_tile(b_base, offs_r, offs_n, stride_br, stride_bn, rank, N)  # (BLOCK_R, BLOCK_N)
        acc += tl.sum(h.to(DOT_DTYPE).to(tl.float32) * b.to(DOT_DTYPE).to(tl.float32), axis=0)
    delta = acc[None, :] * tl.load(scale_ptr + adapter)
    if DROPOUT:
        delta = tl.where(load_keep(keep_ptr, stride_keep, offs_m, offs_n, M, N), delta, 0.0)
    out = load_tile(out_ptr, offs_m, offs_n, stride_om, stride_on, M, N)
    store_tile(out_ptr, out.to(tl.float32) + delta, offs_m, offs_n, stride_om, stride_on, M, N)


def bgmv_expand(
    out: torch.Tensor,
    h: torch.Tensor,
    b_stacked: torch.Tensor,
    row_adapter: torch.Tensor,
    tokens_per_row: int,
    ranks: StackedRanks,
    scales: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as `sgmv_expand` (adds into `out` in place and returns it), with the
    grouping given per batch row: `row_adapter` (M // tokens_per_row,) int32, -1 = none."""
    M, N = check_expand_args(out, h, b_stacked, ranks.max_rank)
    check_rows(row_adapter, tokens_per_row, M, out.device)
    n = ranks.rank.shape[0]
    check_per_adapter("scales", scales, n, out.device)
    dropout = keep is not None
    if dropout:
        check_keep_bytes(keep, M, N, out.device)
    if M == 0 or N == 0 or ranks.max_rank == 0:
        return out
    cfg = bgmv_config(out.device)
    block_r = rank_block(ranks.max_rank, cap=rank_cap(out.device))
    _bgmv_expand_kernel[(M, triton.cdiv(N, cfg.block_n))](
        out, h, b_stacked, scales, keep if dropout else scales,
        row_adapter, ranks.rank, ranks.offset,
        M, N, tokens_per_row,
        out.stride(0), out.stride(1), h.stride(0), h.stride(1), b_stacked.stride(0), b_stacked.stride(1),
        keep.stride(0) if dropout else 0,
        DROPOUT=dropout, DOT_DTYPE=tl_dtype(b_stacked.dtype), BLOCK_N=cfg.block_n, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
