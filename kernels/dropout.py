"""Dropout mask from a Philox seed: the one definition every LoRA kernel uses.

An element (m, k) of the logical 2-D input x (M × K, row-major numbering `m * K + k`,
whatever x's strides are) is kept when `tl.rand(seed, m * K + k) >= p`. The forward shrink,
the backward dx epilogue and the dA reduction all call `dropout_keep` with the same seed and
numbering, so backward regenerates the forward's mask exactly; the mask is never stored.
Numbering is int32: M * K must stay below 2**31 (launchers check).

`dropout_mask` is a small debug launcher that materializes the mask for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ELEMENTS = 2**31 - 1


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, p):
    """Keep-mask (True = kept) of the (offs_m × offs_k) tile of an M × K input."""
    return tl.rand(seed, offs_m[:, None] * K + offs_k[None, :]) >= p


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
