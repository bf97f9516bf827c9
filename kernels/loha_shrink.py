"""loha_shrink: `h = scale · x · KR(u, v)`, the M × r² product with LoHa's Khatri-Rao factor,
whose r²-wide factor is built tile by tile in registers and never written to memory.

    h[m, i·r + j] = scale · Σ_k x[m, k] · k_scale[k] · u[k, i] · v[k, j]

Forward: `h = x (w1b • w2b)ᵀ` with u = w1bᵀ, v = w2bᵀ (strided views, no copy).
Backward: `dh = s · (dy ⊙ row_scale) (w1a • w2a)` with u = w1a, v = w2a, k_scale = row_scale.

Structure: one program per (BLOCK_M rows) × (BLOCK_I values of i, all j): the rank is padded
to RP (a power of two) and a chunk of the r² columns is BLOCK_I · RP wide (at least 16, tl.dot's
minimum). It walks K in BLOCK_K steps: the x tile, and the factor tile `u[k, i] · v[k, j]`
formed in fp32 as the outer product of a (BLOCK_K × BLOCK_I) and a (BLOCK_K × RP) load, both
cast to the adapter dtype (u's) for tl.dot, fp32 accumulation. h is returned in fp32 (backward
saves it). fp32 operands run on 8 warps on GPUs (FMA products with the factor tile in registers
spilled on 4, static audit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, on_gpu, skinny_config, tl_dtype
from .lycoris_tiles import kr_chunk, rank_layout
from .tiles import load_tile


@triton.jit
def _loha_shrink_kernel(
    x_ptr, u_ptr, v_ptr, ks_ptr, h_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_uk, stride_ur, stride_vk, stride_vr, stride_hm, stride_hq,
    scale,
    HAS_KSCALE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    RP: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i, j, valid, q = kr_chunk(pid_i, R, RP, BLOCK_I)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, RP)
    acc = tl.zeros((BLOCK_M, BLOCK_I * RP), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        u = load_tile(u_ptr, offs_k, offs_i, stride_uk, stride_ur, K, R).to(tl.float32)  # (BLOCK_K, BLOCK_I)
        v = load_tile(v_ptr, offs_k, offs_j, stride_vk, stride_vr, K, R).to(tl.float32)  # (BLOCK_K, RP)
        f = tl.reshape(u[:, :, None] * v[:, None, :], (BLOCK_K, BLOCK_I * RP))
        if HAS_KSCALE:
            ks = tl.load(ks_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            f = f * ks[:, None]
        acc = tl.dot(x.to(DOT_DTYPE), f.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * scale
    mask = (offs_m[:, None] < M) & valid[None, :]
    tl.store(h_ptr + offs_m[:, None] * stride_hm + q[None, :] * stride_hq, acc, mask=mask)


def loha_shrink(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """`scale · x · diag(k_scale) · KR(u, v)` as a new fp32 (M, r²) tensor: column i·r + j is
    `Σ_k x[m, k] k_scale[k] u[k, i] v[k, j]`.

    x: (M, K); u, v: (K, r) of one dtype (the adapter dtype: x and the factor tile are cast to
    it, fp32 accumulation); k_scale: (K,) or None. Any strides."""
    if x.dim() != 2 or u.dim() != 2 or u.shape != v.shape or u.shape[0] != x.shape[1]:
        raise ValueError(f"x (M, K), u and v (K, r) do not fit: {tuple(x.shape)}, {tuple(u.shape)}, {tuple(v.shape)}")
    if u.dtype != v.dtype:
        raise TypeError(f"u and v must share a dtype, got {u.dtype} and {v.dtype}")
    if k_scale is not None and k_scale.shape != (x.shape[1],):
        raise ValueError(f"k_scale must be ({x.shape[1]},), got {tuple(k_scale.shape)}")
    for name, t in (("u", u), ("v", v), ("k_scale", k_scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    M, K = x.shape
    R = u.shape[1]
    h = torch.empty((M, R * R), dtype=torch.float32, device=x.device)
    if M == 0 or R == 0:
        return h
    if K == 0:
        return h.zero_()
    rp, block_i = rank_layout(R, x.device)
    cfg = skinny_config(x.device, block_i * rp, u.dtype)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(R, block_i))
    _loha_shrink_kernel[grid](
        x, u, v, k_scale if k_scale is not None else h, h,
        M, K, R,
        x.stride(0), x.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1), h.stride(0), h.stride(1),
        float(scale),
        HAS_KSCALE=k_scale is not None, DOT_DTYPE=tl_dtype(u.dtype), PRECISION=dot_precision(u.dtype),
        RP=rp, BLOCK_I=block_i, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
        num_warps=8 if u.dtype == torch.float32 and on_gpu(x.device) else cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return h
