"""loha_expand: `y = scale · n_scale ⊙ (h · KR(u, v)ᵀ)`, the expand of LoHa's rank-r² product,
whose r²-wide factor is built tile by tile in registers and never written to memory.

    y[m, n] = scale · n_scale[n] · Σ_{i,j} h[m, i·r + j] · u[n, i] · v[n, j]

Forward: `y = s · row_scale ⊙ (h (w1a • w2a)ᵀ)` with u = w1a, v = w2a, n_scale = row_scale
(rank dropout). Backward: `dx = dh (w1b • w2b)` with u = w1bᵀ, v = w2bᵀ.

Structure: programs over (BLOCK_M × BLOCK_N) output tiles in GROUP_M groups (L2 reuse of the
factor rows); each walks the r² columns in chunks of BLOCK_I values of i (all j, see
lycoris_tiles.py): the h tile (fp32, cast to the adapter dtype) and the factor tile
`u[n, i] · v[n, j]` formed in fp32 as the outer product of a (BLOCK_I × BLOCK_N) and the
(RP × BLOCK_N) tile of v, loaded once, cast to the adapter dtype for tl.dot, fp32 accumulation.
The result is written in the adapter dtype (u's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .configs import MatmulConfig, dot_precision, matmul_config, tl_dtype
from .lycoris_tiles import kr_chunk, rank_layout
from .tiles import grouped_tile, load_tile, store_tile


@triton.jit
def _loha_expand_kernel(
    h_ptr, u_ptr, v_ptr, ns_ptr, y_ptr,
    M, N, R,
    stride_hm, stride_hq, stride_un, stride_ur, stride_vn, stride_vr, stride_ym, stride_yn,
    scale,
    HAS_NSCALE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    RP: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_j = tl.arange(0, RP)
    v = load_tile(v_ptr, offs_j, offs_n, stride_vr, stride_vn, R, N).to(tl.float32)  # (RP, BLOCK_N)
    for c in range(0, tl.cdiv(R, BLOCK_I)):
        i, j, valid, q = kr_chunk(c, R, RP, BLOCK_I)
        hmask = (offs_m[:, None] < M) & valid[None, :]
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + q[None, :] * stride_hq, mask=hmask, other=0.0)
        offs_i = c * BLOCK_I + tl.arange(0, BLOCK_I)
        u = load_tile(u_ptr, offs_i, offs_n, stride_ur, stride_un, R, N).to(tl.float32)  # (BLOCK_I, BLOCK_N)
        f = tl.reshape(u[:, None, :] * v[None, :, :], (BLOCK_I * RP, BLOCK_N))
        acc = tl.dot(h.to(DOT_DTYPE), f.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * scale
    if HAS_NSCALE:
        ns = tl.load(ns_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc * ns[None, :]
    store_tile(y_ptr, acc, offs_m, offs_n, stride_ym, stride_yn, M, N)


# r² columns a step for fp32: the chunk is tl.dot's K, held whole in registers by FMA products;
# 64 and 32 spilled (static audit).
FP32_LANES = 16


def expand_config(device: torch.device, dtype: torch.dtype) -> MatmulConfig:
    """The fused matmuls' blocks (configs.py), narrowed where the factor tile, built in registers,
    made them spill (static audit): 64 columns on sm_80 (mma.sync keeps both operands in registers);
    for fp32 (FMA products, operands in registers) 64 x 64 tiles on 4 warps, 2 stages, walking r²
    in chunks of FP32_LANES instead of 64 (see `loha_expand`)."""
    cfg = matmul_config(device, dtype)
    if configs.gpu_family(device) == "interpreter":
        return cfg
    if dtype == torch.float32:
        return MatmulConfig(64, 64, cfg.block_k, cfg.group_m, num_warps=4, num_stages=2)
    if configs.gpu_family(device) == "sm80":
        return MatmulConfig(cfg.block_m, 64, cfg.block_k, cfg.group_m, cfg.num_warps, cfg.num_stages)
    return cfg


def loha_expand(
    h: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    n_scale: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """`scale · n_scale ⊙ (h · KR(u, v)ᵀ)` as a new (M, N) tensor in u's dtype (the adapter dtype).

    h: (M, r²), any float dtype (cast to the adapter dtype for the product, fp32 accumulation);
    u, v: (N, r) of one dtype; n_scale: (N,) or None. Any strides."""
    if u.dim() != 2 or u.shape != v.shape or h.dim() != 2 or h.shape[1] != u.shape[1] ** 2:
        raise ValueError(f"h (M, r²), u and v (N, r) do not fit: {tuple(h.shape)}, {tuple(u.shape)}, {tuple(v.shape)}")
    if u.dtype != v.dtype:
        raise TypeError(f"u and v must share a dtype, got {u.dtype} and {v.dtype}")
    if n_scale is not None and n_scale.shape != (u.shape[0],):
        raise ValueError(f"n_scale must be ({u.shape[0]},), got {tuple(n_scale.shape)}")
    for name, t in (("u", u), ("v", v), ("n_scale", n_scale)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{name} must be on {h.device}, got {t.device}")
    M = h.shape[0]
    N, R = u.shape
    y = torch.empty((M, N), dtype=u.dtype, device=h.device)
    if M == 0 or N == 0:
        return y
    if R == 0:
        return y.zero_()
    rp, block_i = rank_layout(R, h.device, FP32_LANES if u.dtype == torch.float32 else 64)
    cfg = expand_config(h.device, u.dtype)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _loha_expand_kernel[grid](
        h, u, v, n_scale if n_scale is not None else y, y,
        M, N, R,
        h.stride(0), h.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1), y.stride(0), y.stride(1),
        float(scale),
        HAS_NSCALE=n_scale is not None, DOT_DTYPE=tl_dtype(u.dtype), PRECISION=dot_precision(u.dtype),
        RP=rp, BLOCK_I=block_i, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
