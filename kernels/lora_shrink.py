"""lora_shrink: `h = scale · dropout(x) · Aᵀ`, an M × r product with fp32 accumulation.

Forward uses it for `h = dropout(x) Aᵀ / (1 - p)` (x: M × K, A: r × K); backward reuses it
for `dh = s · dy · B` by passing `Bᵀ` (a strided view, no copy) as A and p = 0.

Structure: one program per (BLOCK_M rows of x) × (BLOCK_R ranks); it walks K in BLOCK_K
steps, loads the x tile, zeroes dropped elements with the Philox mask of `dropout.py`
(x's dropped copy is never written), casts the tile to the adapter's dtype (A's dtype, as
the reference casts x to lora_A's dtype) and accumulates `tl.dot` in fp32. Ranks below 16
are padded to 16 with masks. h is returned in fp32: backward saves it (M × r) and the
expand kernel casts it to the adapter dtype.

Dropout (see dropout.py): with `keep` given, the mask's keep bytes (1 bit per element) go into
it for backward. With one rank block (r up to the rank block) each program draws its tile's
bytes from Philox, gates x and stores them: one Philox evaluation per 8 elements of x, x read
once. With several rank blocks the bytes are drawn first (`draw_keep_bytes`) and every rank
block reads them, so no counter is evaluated twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, skinny_config, tl_dtype
from .dropout import (
    check_dropout,
    check_keep_bytes,
    draw_keep_bytes,
    groups_of,
    keep_bytes,
    keep_from_bytes,
    load_keep,
    record_draws,
    store_keep,
)
from .tiles import load_tile, store_tile


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr, keep_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr, stride_keep,
    scale, p,
    DROPOUT: tl.constexpr, KEEP_IN: tl.constexpr, KEEP_OUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if DROPOUT and not KEEP_IN:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        if KEEP_IN:  # keep bytes drawn by a pass of their own (several rank blocks)
            x = tl.where(load_keep(keep_ptr, stride_keep, offs_m, offs_k, M, K), x, 0.0)
        elif DROPOUT:
            kb = keep_bytes(seed, offs_m, groups_of(offs_k), K, p)
            x = tl.where(keep_from_bytes(kb, offs_k), x, 0.0)
            if KEEP_OUT:
                store_keep(keep_ptr, stride_keep, kb, offs_m, offs_k, M, K)
        a = load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, R)
        acc = tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * scale
    store_tile(h_ptr, acc, offs_m, offs_r, stride_hm, stride_hr, M, R)


def lora_shrink(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scale · dropout(x) · lora_Aᵀ` as an fp32 (M, r) tensor.

    x: (M, K), any strides; lora_A: (r, K), any strides. The product runs in lora_A's dtype
    with fp32 accumulation. With `dropout_p > 0` the mask comes from `seed` (one-element
    int64 tensor on x's device) and is *not* rescaled here: pass `scale / (1 - p)`. `keep`,
    when given with dropout, is filled with the mask's keep bytes ((M, ceil(K/8)) uint8, see
    dropout.py) for backward.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != x.shape[1]:
        raise ValueError(f"lora_A must be (r, {x.shape[1]}), got shape {tuple(lora_A.shape)}")
    if lora_A.device != x.device:
        raise ValueError(f"lora_A must be on {x.device}, got {lora_A.device}")
    M, K = x.shape
    R = lora_A.shape[0]
    dropout = check_dropout(dropout_p, seed, x.device, M, K)
    store = dropout and keep is not None
    if store:
        check_keep_bytes(keep, M, K, x.device)
    h = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0 or R == 0 or K == 0:
        if store:
            keep.zero_()  # a rank-0 adapter or an empty x: no adapter term to gate
        return h.zero_()
    cfg = skinny_config(x.device, R, lora_A.dtype)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(R, cfg.block_n))
    keep_in = store and grid[1] > 1
    if keep_in:  # several rank blocks: draw the bytes once, every rank block reads them
        keep.copy_(draw_keep_bytes(seed, M, K, dropout_p, x.device))
    elif dropout:
        rows, cols = grid[0] * cfg.block_m, triton.cdiv(K, cfg.block_k) * cfg.block_k
        record_draws("lora_shrink", grid[1] * rows * cols // 8)
    _lora_shrink_kernel[grid](
        x, lora_A, h, seed if dropout else h, keep if store else h,
        M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), h.stride(0), h.stride(1),
        keep.stride(0) if store else 0,
        float(scale), float(dropout_p),
        DROPOUT=dropout, KEEP_IN=keep_in, KEEP_OUT=store and not keep_in,
        DOT_DTYPE=tl_dtype(lora_A.dtype), PRECISION=dot_precision(lora_A.dtype),
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return h
