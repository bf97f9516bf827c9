"""Dropout mask from a Philox seed: the one definition every LoRA kernel uses.

An element (m, k) of the logical 2-D input x (M × K, whatever x's strides are) is kept when
16 bits drawn for it from Philox-4x32-10 (Triton's `tl.randint4x`, key = seed) are at least
`p · 65536`: counter `m · ceil(K/8) + k // 8`, word `(k % 8) // 2` of the four the counter
gives, its low half for even k, high half for odd k. One Philox evaluation serves 8 elements,
where `tl.rand` per element spent one per element: the forward shrink, the backward dx
epilogue and the dA reduction each regenerate the mask, so a training step costs 3/8 of an
evaluation per element of x (it cost 3). p is applied in steps of 1/65536 (the kept fraction
is `1 - ceil(p · 65536) / 65536`, within 1.5e-5 of 1 - p). All three passes call
`dropout_keep` with the same seed and numbering, so backward regenerates the forward's mask
exactly; the mask is never stored. Counters are int32: M * K must stay below 2**31
(launchers check). csrc/philox.h draws the same bits for the CUDA C++ kernels.

`dropout_mask` is a small debug launcher that materializes the mask for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ELEMENTS = 2**31 - 1


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, p):
    """Keep-mask (True = kept) of the (offs_m × offs_k) tile of an M × K input.

    offs_k must come in aligned runs of 8 (k0 + arange(BLOCK) with k0 and BLOCK multiples of 8,
    as every tile here is). One Philox-4x32-10 evaluation serves 8 elements of a row: counter
    `m * ceil(K / 8) + k // 8`, output word `(k % 8) // 2`, its low 16 bits for even k and its
    high 16 bits for odd k; the element is kept when those 16 bits `u` satisfy
    `u >= p * 65536` (p is applied in steps of 1/65536)."""
    BM: tl.constexpr = offs_m.shape[0]
    BK: tl.constexpr = offs_k.shape[0]
    G: tl.constexpr = BK // 8
    groups = tl.min(tl.reshape(offs_k, (G, 8)), axis=1) // 8
    counter = offs_m[:, None] * ((K + 7) // 8) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    j = offs_k % 8
    word = tl.where(
        j[None, :] < 4,
        tl.where(j[None, :] < 2, _spread(r0, BM, G), _spread(r1, BM, G)),
        tl.where(j[None, :] < 6, _spread(r2, BM, G), _spread(r3, BM, G)),
    )
    bits = tl.where((j % 2)[None, :] == 0, word & 0xFFFF, word >> 16)
    return bits.to(tl.float32) >= p * 65536.0


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
