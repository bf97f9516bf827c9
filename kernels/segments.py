"""What the mixed-adapter kernels (sgmv_shrink, sgmv_expand, sgmv_adapter_grad, bgmv_shrink,
bgmv_expand) share: the per-batch token grouping, the stacked-rank table, their host-side
checks, and the `@triton.jit` helpers that turn a segment tile into token indices.

Layout the kernels read, for a 2-D input of M = batch * T tokens (T tokens per batch row,
row b owning tokens b*T .. b*T+T-1):

* `RowGroups` (row_groups.py): the adapted rows sorted by adapter (`row_order`), one segment
  per adapter present (`seg_adapter`), `seg_start[s] .. seg_start[s+1]` its slice of
  `row_order`. T = M // batch size. Tokens are never copied into sorted order: a kernel maps
  the j-th token of a segment to token `row_order[start + j // T] * T + j % T` of x.
* `StackedRanks`: every adapter's A stacked along the rank (a (R_total, K) tensor) and B
  likewise ((N, R_total)); adapter a owns ranks `offset[a] .. offset[a] + rank[a]`. Ranks
  are not padded to the largest: programs whose rank block starts past an adapter's rank
  return at once, and loads are masked at the adapter's real rank.
* Per-adapter fp32 numbers (scales, dropout probabilities) are tensors indexed by adapter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .row_groups import RowGroups


class StackedRanks(NamedTuple):
    """Where each adapter's ranks sit in the stacked rank dimension."""

    rank: torch.Tensor  # (n_adapters,) int32
    offset: torch.Tensor  # (n_adapters,) int32
    max_rank: int  # the largest rank among adapters the batch uses (sizes the grid)


def check_int32(name: str, t: torch.Tensor, n: int | None, device: torch.device) -> None:
    """ValueError/TypeError unless `t` is a 1-D int32 tensor on `device` (of length n if given)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = f"({n},)" if n is not None else "1-D"
        raise ValueError(f"{name} must be a {want} int32 tensor, got {getattr(t, 'shape', t)!r}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_per_adapter(name: str, t: torch.Tensor, n: int, device: torch.device) -> None:
    """ValueError/TypeError unless `t` is an (n,) fp32 tensor on `device`."""
    if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.dtype != torch.float32 or t.device != device:
        raise ValueError(f"{name} must be a ({n},) float32 tensor on {device}, got {getattr(t, 'shape', t)!r}")


def check_segments(segs: RowGroups, ranks: StackedRanks, M: int, device: torch.device) -> int:
    """T, the tokens per batch row of M tokens; ValueError/TypeError when the grouping or rank
    table does not fit M tokens on `device`."""
    check_int32("segments.row_adapter", segs.row_adapter, None, device)
    check_int32("segments.row_order", segs.row_order, None, device)
    check_int32("segments.seg_adapter", segs.seg_adapter, segs.num_segments, device)
    check_int32("segments.seg_start", segs.seg_start, segs.num_segments + 1, device)
    check_int32("ranks.rank", ranks.rank, None, device)
    check_int32("ranks.offset", ranks.offset, ranks.rank.shape[0], device)
    batch = segs.batch_size
    if (batch == 0 and M != 0) or (batch and M % batch):
        raise ValueError(f"segments group {batch} rows, which do not divide the {M} tokens")
    if segs.row_order.shape[0] != segs.num_adapted_rows or segs.num_adapted_rows > batch:
        raise ValueError(
            f"segments order {segs.row_order.shape[0]} rows (their segments hold {segs.num_adapted_rows}) "
            f"of a batch of {batch}"
        )
    if segs.num_segments > 65535:
        raise ValueError(f"at most 65535 segments (adapters) per launch, got {segs.num_segments}")
    return M // batch if batch else 1


def check_rows(row_adapter: torch.Tensor, tokens_per_row: int, M: int, device: torch.device) -> None:
    """ValueError unless `row_adapter` gives one int32 adapter index per row of T tokens."""
    if not isinstance(tokens_per_row, int) or tokens_per_row < 1 or M % tokens_per_row:
        raise ValueError(f"tokens_per_row must be a positive divisor of the {M} tokens, got {tokens_per_row!r}")
    check_int32("row_adapter", row_adapter, M // tokens_per_row, device)


def check_stacked(name: str, stacked: torch.Tensor, inner: int, device: torch.device) -> None:
    """ValueError unless `stacked` is a 2-D (R_total, inner) tensor on `device`."""
    if not isinstance(stacked, torch.Tensor) or stacked.dim() != 2 or stacked.shape[1] != inner:
        raise ValueError(f"{name} must be (R_total, {inner}), got {getattr(stacked, 'shape', stacked)!r}")
    if stacked.device != device:
        raise ValueError(f"{name} must be on {device}, got {stacked.device}")


def check_shrink_args(x: torch.Tensor, a_stacked: torch.Tensor) -> tuple[int, int]:
    """(M, K) of a shrink's x (M, K) and stacked A (R_total, K); ValueError otherwise."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    check_stacked("a_stacked", a_stacked, x.shape[1], x.device)
    return x.shape[0], x.shape[1]


def check_expand_args(out: torch.Tensor, h: torch.Tensor, b_stacked: torch.Tensor, max_rank: int) -> tuple[int, int]:
    """(M, N) of an expand's out (M, N), h (M, >= max_rank) and stacked B (N, R_total);
    ValueError otherwise."""
    if out.dim() != 2:
        raise ValueError(f"out must be 2-D (M, N), got shape {tuple(out.shape)}")
    M, N = out.shape
    if not isinstance(b_stacked, torch.Tensor) or b_stacked.dim() != 2:
        raise ValueError(f"b_stacked must be (N, R_total), got {getattr(b_stacked, 'shape', b_stacked)!r}")
    check_stacked("b_stacked (as its transpose)", b_stacked.t(), N, out.device)
    if h.dim() != 2 or h.shape[0] != M or h.shape[1] < max_rank or h.device != out.device:
        raise ValueError(f"h must be ({M}, >= {max_rank}) on {out.device}, got {tuple(h.shape)} on {h.device}")
    return M, N


@triton.jit
def segment_span(seg_start_ptr, seg, T):
    """(start, n_tokens): segment `seg`'s first index into row_order and its token count."""
    start = tl.load(seg_start_ptr + seg)
    return start, (tl.load(seg_start_ptr + seg + 1) - start) * T


@triton.jit
def segment_tokens(row_order_ptr, start, j0, j_end, T, BLOCK_M: tl.constexpr):
    """(m, valid): indices into x of a segment's tokens j0 .. j0 + BLOCK_M - 1 (the segment
    starting at `start` in row_order), and which of them are below j_end."""
    offs_j = j0 + tl.arange(0, BLOCK_M)
    valid = offs_j < j_end
    row = tl.load(row_order_ptr + start + offs_j // T, mask=valid, other=0)
    return row * T + offs_j % T, valid


@triton.jit
def load_rows(ptr, m, valid, offs_c, stride_m, stride_c, cols):
    """The (m × offs_c) tile of a strided matrix, rows gathered by index, zeros outside."""
    mask = valid[:, None] & (offs_c[None, :] < cols)
    return tl.load(ptr + m[:, None] * stride_m + offs_c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def store_rows(ptr, value, m, valid, offs_c, stride_m, stride_c, cols):
    """Store `value` (cast to ptr's element type) into the gathered rows m, columns offs_c < cols."""
    mask = valid[:, None] & (offs_c[None, :] < cols)
    tl.store(ptr + m[:, None] * stride_m + offs_c[None, :] * stride_c, value.to(ptr.dtype.element_ty), mask=mask)
