"""lora_shrink: `h = scale · dropout(x) · Aᵀ`, an M × r product with fp32 accumulation.

Forward uses it for `h = dropout(x) Aᵀ / (1 - p)` (x: M × K, A: r × K); backward reuses it
for `dh = s · dy · B` by passing `Bᵀ` (a strided view, no copy) as A and p = 0.

Structure: one program per (BLOCK_M rows of x) × (BLOCK_R ranks); it walks K in BLOCK_K
steps, loads the x tile, zeroes dropped elements with the Philox mask of `dropout.py`
(x's dropped copy is never written), casts the tile to the adapter's dtype (A's dtype, as
the reference casts x to lora_A's dtype) and accumulates `tl.dot` in fp32. Ranks below 16
are padded to 16 with masks. h is returned in fp32: backward saves it (M × r) and the
expand kernel casts it to the adapter dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, skinny_config, tl_dtype
from .dropout import check_dropout, dropout_keep
from .tiles import load_tile, store_tile


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    scale, p,
    DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        if DROPOUT:
            x = tl.where(dropout_keep(seed, offs_m, offs_k, K, p), x, 0.0)
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
) -> torch.Tensor:
    """`scale · dropout(x) · lora_Aᵀ` as an fp32 (M, r) tensor.

    x: (M, K), any strides; lora_A: (r, K), any strides. The product runs in lora_A's dtype
    with fp32 accumulation. With `dropout_p > 0` the mask comes from `seed` (one-element
    int64 tensor on x's device) and is *not* rescaled here: pass `scale / (1 - p)`.
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
    h = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0 or R == 0:
        return h
    if K == 0:
        return h.zero_()
    cfg = skinny_config(x.device, R, lora_A.dtype)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(R, cfg.block_n))
    _lora_shrink_kernel[grid](
        x, lora_A, h, seed if dropout else h,
        M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), h.stride(0), h.stride(1),
        float(scale), float(dropout_p),
        DROPOUT=dropout, DOT_DTYPE=tl_dtype(lora_A.dtype), PRECISION=dot_precision(lora_A.dtype),
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return h
