"""Dropout mask from a Philox seed: the one definition every LoRA kernel uses.

The mask. An element (m, k) of the logical 2-D input x (M × K, whatever x's strides are) is
kept when 16 bits drawn for it from Philox-4x32-10 (Triton's `tl.randint4x`, key = seed) are
at least `p · 65536`: counter `m · ceil(K/8) + k // 8`, word `(k % 8) // 2` of the four the
counter gives, its low half for even k, high half for odd k. p is applied in steps of 1/65536
(the kept fraction is `1 - ceil(p · 65536) / 65536`, within 1.5e-5 of 1 - p). Counters are
int32: M * K must stay below 2**31 (launchers check). csrc/philox.h draws the same bits.

Its cost: one Philox evaluation per training step for every 8 elements of x (1/8 per element).
A counter's four words give exactly the 8 keep bits of elements 8g .. 8g+7 of a row, so the
mask packs into one byte per counter: the *keep bytes*, a (M, ceil(K/8)) uint8 tensor, byte
(m, g) bit j = keep(m, 8g + j) (`keep_bytes`, the same packing as csrc's `dropout_keep8`).
The forward shrink draws them once, gates x with them and stores them (M·K/8 bytes, 1/16 of a
bf16 x); backward's dx epilogue and dA read them (`load_keep`) instead of drawing again.
Chosen with the roofline model (kernels/roofline.py, `dropout_cost`; H100 model, ~1e12 Philox
evaluations/s, 3.0 TB/s, at x = 8192 × 4096): regenerating the 16-bit mask in the three passes
costs 3/8 evaluation per element (12.6 M evaluations, ~13 µs per step), over the issue's 1/4
budget; 8-bit uniforms regenerated three times (3/16, ~6 µs) would quantize p to steps of
1/256; the keep bytes cost 1/8 evaluation per element (4.2 M, ~4 µs) plus M·K/8 bytes written
once and read twice (12 MiB, ~4 µs as a separate pass, less where it overlaps the kernels' own
traffic), keep p's 1/65536 steps and hold M·K/8 bytes from forward to backward.
When the shrink's grid has several rank blocks (r above its rank block), and for mixed-adapter
batches (each row with its adapter's p), `draw_keep_bytes` draws the bytes in a pass of their
own first and the kernels read them, so every counter is evaluated once per step whatever the
rank. Launchers report each draw to `count_philox` (a debug hook counting evaluations from their
grids and blocks, padding lanes included: exactly 1/8 per element when x fills the tiles, at
most 1/4 once M and K reach a tile; tests count them at `tl.randint4x` too). The CUDA C++
kernels (csrc/) draw the same keep bytes once per step (csrc/keep_bytes.cu, one evaluation
per byte, reported to `record_draws` by peft_fast/ops/cuda/dropout.py) and read them likewise.

`dropout_mask` is a small debug launcher that materializes the mask (as bools) for tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

MAX_ELEMENTS = 2**31 - 1
# The elements one Philox evaluation (one keep byte) serves.
PER_DRAW = 8
_draw_log: list[tuple[str, int]] | None = None


@contextlib.contextmanager
def count_philox() -> Iterator[list[tuple[str, int]]]:
    """Debug hook: a list that collects `(kernel, Philox evaluations)` for every dropout launch
    in the block, counted from each launch's grid and block sizes (padding lanes included)."""
    global _draw_log
    outer, _draw_log = _draw_log, []
    try:
        yield _draw_log
    finally:
        _draw_log = outer


def record_draws(kernel: str, evaluations: int) -> None:
    """Report that a launch of `kernel` evaluates Philox `evaluations` times (see count_philox)."""
    if _draw_log is not None:
        _draw_log.append((kernel, int(evaluations)))


def keep_bytes_shape(M: int, K: int) -> tuple[int, int]:
    """Shape of the keep bytes of an M × K input: one byte per 8 elements of a row."""
    return M, triton.cdiv(K, PER_DRAW)


@triton.jit
def _half_pair(w, threshold):
    """Bits 0 and 1: whether the low / high 16 bits of word w reach `threshold`."""
    lo = ((w & 0xFFFF).to(tl.float32) >= threshold).to(tl.int32)
    hi = ((w >> 16).to(tl.float32) >= threshold).to(tl.int32)
    return lo | (hi << 1)


@triton.jit
def keep_bytes(seed, offs_m, offs_g, K, p):
    """(BM, BG) int32 keep bytes of rows offs_m and 8-element groups offs_g of an M × K input:
    one Philox-4x32-10 evaluation per byte (counter `m * ceil(K / 8) + g`), bit j = element
    8g + j kept, i.e. its 16 bits (word j // 2, low half for even j) are >= p * 65536."""
    counter = offs_m[:, None] * ((K + 7) // 8) + offs_g[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    t = p * 65536.0
    return _half_pair(r0, t) | (_half_pair(r1, t) << 2) | (_half_pair(r2, t) << 4) | (_half_pair(r3, t) << 6)


@triton.jit
def groups_of(offs_k):
    """The 8-element groups (k // 8) of offs_k, which comes in aligned runs of 8 (k0 +
    arange(BLOCK) with k0 and BLOCK multiples of 8, as every tile here is)."""
    G: tl.constexpr = offs_k.shape[0] // 8
    return tl.min(tl.reshape(offs_k, (G, 8)), axis=1) // 8


@triton.jit
def keep_from_bytes(kb, offs_k):
    """(BM, BK) keep tile (True = kept) from the (BM, BK // 8) keep bytes of its groups."""
    BM: tl.constexpr = kb.shape[0]
    G: tl.constexpr = kb.shape[1]
    return ((_spread(kb, BM, G) >> (offs_k % 8)[None, :]) & 1) != 0


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, p):
    """Keep-mask (True = kept) of the (offs_m × offs_k) tile of an M × K input, drawn from
    Philox: one evaluation per 8 elements (offs_k in aligned runs of 8)."""
    return keep_from_bytes(keep_bytes(seed, offs_m, groups_of(offs_k), K, p), offs_k)


@triton.jit
def load_keep(kb_ptr, stride_kb, offs_m, offs_k, M, K):
    """Keep-mask tile (offs_m × offs_k) read from stored keep bytes (M, ceil(K/8)), row stride
    `stride_kb`: no Philox. Outside the M × K input it reads False."""
    offs_g = groups_of(offs_k)
    mask = (offs_m[:, None] < M) & (offs_g[None, :] < (K + 7) // 8)
    kb = tl.load(kb_ptr + offs_m[:, None] * stride_kb + offs_g[None, :], mask=mask, other=0)
    return keep_from_bytes(kb.to(tl.int32), offs_k)


@triton.jit
def store_keep(kb_ptr, stride_kb, kb, offs_m, offs_k, M, K):
    """Store the keep bytes `kb` of the (offs_m × offs_k) tile into (M, ceil(K/8)) keep bytes."""
    offs_g = groups_of(offs_k)
    mask = (offs_m[:, None] < M) & (offs_g[None, :] < (K + 7) // 8)
    tl.store(kb_ptr + offs_m[:, None] * stride_kb + offs_g[None, :], kb.to(tl.uint8), mask=mask)


@triton.jit
def _spread(r, BM: tl.constexpr, G: tl.constexpr):
    """(BM, G) -> (BM, 8 G): each group's value repeated over its 8 elements."""
    return tl.reshape(tl.broadcast_to(r[:, :, None], (BM, G, 8)), (BM, G * 8))


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = dropout_keep(seed, offs_m, offs_k, K, p)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


@triton.jit
def _keep_bytes_kernel(
    seed_ptr, row_p_ptr, out_ptr, M, K, G, p, ROW_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    if ROW_P:  # each row's own p (mixed-adapter batches: its adapter's)
        kb = keep_bytes(tl.load(seed_ptr), offs_m, offs_g, K, tl.load(row_p_ptr + offs_m, mask=offs_m < M)[:, None])
    else:
        kb = keep_bytes(tl.load(seed_ptr), offs_m, offs_g, K, p)
    mask = (offs_m[:, None] < M) & (offs_g[None, :] < G)
    tl.store(out_ptr + offs_m[:, None] * G + offs_g[None, :], kb.to(tl.uint8), mask=mask)


def check_seed(seed: torch.Tensor, device: torch.device) -> None:
    """ValueError unless `seed` is a one-element int64 tensor on `device`."""
    if not isinstance(seed, torch.Tensor) or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"seed must be a one-element int64 tensor, got {seed!r}")
    if seed.device != device:
        raise ValueError(f"seed must be on {device}, got {seed.device}")


def check_numbering(M: int, K: int) -> None:
    """ValueError when an M × K input is too large for the int32 dropout numbering."""
    if M * K > MAX_ELEMENTS:
        raise ValueError(f"dropout needs M * K < 2**31 for its int32 numbering, got M={M}, K={K}")


def check_dropout(dropout_p: float, seed: torch.Tensor | None, device: torch.device, M: int, K: int) -> bool:
    """Whether a launcher applies dropout; ValueError when p is outside [0, 1) or dropout
    lacks a valid seed or exceeds the int32 numbering of an M × K input."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return False
    if seed is None:
        raise ValueError("seed is required when dropout_p > 0")
    check_seed(seed, device)
    check_numbering(M, K)
    return True


def dropout_mask(seed: torch.Tensor, M: int, K: int, p: float, device: torch.device | str) -> torch.Tensor:
    """The (M, K) bool keep-mask the LoRA kernels apply to x for this seed and p."""
    device = torch.device(device)
    check_seed(seed, device)
    check_numbering(M, K)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _dropout_mask_kernel[grid](seed, out, M, K, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def draw_keep_bytes(
    seed: torch.Tensor, M: int, K: int, p: float, device: torch.device | str, row_p: torch.Tensor | None = None
) -> torch.Tensor:
    """The (M, ceil(K/8)) uint8 keep bytes of an M × K input for this seed and p (bit j of
    byte (m, g): element (m, 8g + j) kept), one Philox evaluation per byte. `row_p`, an (M,)
    fp32 tensor of probabilities in [0, 1) on `device`, gives each row its own p instead."""
    device = torch.device(device)
    check_seed(seed, device)
    check_numbering(M, K)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if row_p is not None and (row_p.shape != (M,) or row_p.dtype != torch.float32 or row_p.device != device):
        raise ValueError(f"row_p must be an ({M},) float32 tensor on {device}, got {tuple(row_p.shape)} {row_p.dtype}")
    out = torch.empty(keep_bytes_shape(M, K), dtype=torch.uint8, device=device)
    G = out.shape[1]
    if M and G:
        block_m, block_g = 32, min(32, max(16, triton.next_power_of_2(G)))
        grid = (triton.cdiv(M, block_m), triton.cdiv(G, block_g))
        record_draws("keep_bytes", grid[0] * block_m * grid[1] * block_g)
        _keep_bytes_kernel[grid](
            seed, row_p if row_p is not None else out, out, M, K, G, p,
            ROW_P=row_p is not None, BLOCK_M=block_m, BLOCK_G=block_g,
        )  # fmt: skip
    return out


def check_keep_bytes(keep: torch.Tensor, M: int, K: int, device: torch.device) -> None:
    """ValueError unless `keep` is the (M, ceil(K/8)) uint8 keep bytes of an M × K input on
    `device`, with unit column stride."""
    shape = keep_bytes_shape(M, K)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.uint8 or tuple(keep.shape) != shape:
        got = f"{tuple(keep.shape)} {keep.dtype}" if isinstance(keep, torch.Tensor) else repr(keep)
        raise ValueError(f"keep must be uint8 keep bytes of shape {shape}, got {got}")
    if keep.device != device:
        raise ValueError(f"keep must be on {device}, got {keep.device}")
    if shape[1] > 1 and keep.stride(1) != 1:
        raise ValueError(f"keep must have unit column stride, got strides {keep.stride()}")


def check_dropout_keep(dropout_p: float, keep: torch.Tensor | None, device: torch.device, M: int, K: int) -> bool:
    """Whether the launch applies dropout; ValueError when p is outside [0, 1) or dropout comes
    without valid keep bytes of the M × K input."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return False
    if keep is None:
        raise ValueError("keep (the dropout mask's keep bytes) is required when dropout_p > 0")
    check_keep_bytes(keep, M, K, device)
    return True


def unpack_keep_bytes(keep: torch.Tensor, K: int) -> torch.Tensor:
    """The (M, K) bool keep-mask held in keep bytes (M, ceil(K/8)), in torch (no Philox): for
    composite paths that apply the mask to a materialized tensor."""
    if keep.dtype != torch.uint8 or keep.dim() != 2 or keep.shape[1] != triton.cdiv(K, PER_DRAW):
        raise ValueError(f"keep must be (M, {triton.cdiv(K, PER_DRAW)}) uint8 keep bytes, got {tuple(keep.shape)}")
    bits = torch.arange(PER_DRAW, dtype=torch.uint8, device=keep.device)
    return ((keep[:, :, None] >> bits) & 1).reshape(keep.shape[0], -1)[:, :K].bool()
