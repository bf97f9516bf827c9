"""loha_factor_grad: the gradients of LoHa's two factors on one side of the rank-r² product,
contracted from the r²-wide gradient in registers (never written to memory).

With G = scale · diag(n_scale) · Qᵀ P (N × r², a reduction over the M rows):

    du[n, i] = Σ_j G[n, i·r + j] · v[n, j]        dv[n, j] = Σ_i G[n, i·r + j] · u[n, i]

Output side: Q = dy, P = h, (u, v) = (w1a, w2a), n_scale = row_scale: (du, dv) = (dw1a, dw2a).
Input side: Q = x, P = dh, (u, v) = (w1bᵀ, w2bᵀ): (du, dv) = (dw1bᵀ, dw2bᵀ).

Structure: one program per (BLOCK_N rows of u, v) × (BLOCK_I values of i, all j) × (split of M,
split-K style to fill the GPU). It accumulates its (BLOCK_N × BLOCK_I·RP) tile of G in fp32 over
its rows, then contracts it: du for its i values is complete; dv is its chunk's share. Each
program writes fp32 partials and the launcher sums them with torch (deterministic, no atomics);
the partials are N × r, never N × r².
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, num_sms, on_gpu, skinny_config, tl_dtype
from .lycoris_tiles import kr_chunk, rank_layout
from .tiles import load_tile


@triton.jit
def _loha_factor_grad_kernel(
    p_ptr, q_ptr, u_ptr, v_ptr, ns_ptr, du_ptr, dv_ptr,
    M, N, R, rows_per_split,
    stride_pm, stride_pq, stride_qm, stride_qn, stride_un, stride_ur, stride_vn, stride_vr,
    stride_dus, stride_dun, stride_dur, stride_dvs, stride_dvn, stride_dvr,
    scale,
    HAS_NSCALE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    RP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i, j, valid, q = kr_chunk(pid_i, R, RP, BLOCK_I)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_I * RP), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        qt = load_tile(q_ptr, offs_n, offs_m, stride_qn, stride_qm, N, m_end)
        pmask = (offs_m[:, None] < m_end) & valid[None, :]
        p = tl.load(p_ptr + offs_m[:, None] * stride_pm + q[None, :] * stride_pq, mask=pmask, other=0.0)
        acc = tl.dot(qt.to(DOT_DTYPE), p.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc = acc * scale
    if HAS_NSCALE:
        ns = tl.load(ns_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc * ns[:, None]
    g = tl.reshape(acc, (BLOCK_N, BLOCK_I, RP))
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, RP)
    u = load_tile(u_ptr, offs_n, offs_i, stride_un, stride_ur, N, R).to(tl.float32)  # (BLOCK_N, BLOCK_I)
    v = load_tile(v_ptr, offs_n, offs_j, stride_vn, stride_vr, N, R).to(tl.float32)  # (BLOCK_N, RP)
    du = tl.sum(g * v[:, None, :], axis=2)
    dv = tl.sum(g * u[:, :, None], axis=1)
    nmask = offs_n[:, None] < N
    du_slot = du_ptr + pid_s * stride_dus
    tl.store(
        du_slot + offs_n[:, None] * stride_dun + offs_i[None, :] * stride_dur, du, mask=nmask & (offs_i[None, :] < R)
    )
    dv_slot = dv_ptr + (pid_s * tl.num_programs(1) + pid_i) * stride_dvs
    tl.store(
        dv_slot + offs_n[:, None] * stride_dvn + offs_j[None, :] * stride_dvr, dv, mask=nmask & (offs_j[None, :] < R)
    )


def loha_factor_grad(
    P: torch.Tensor,
    Q: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    n_scale: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(du, dv), each a new contiguous (N, r) tensor in u's dtype: the gradients of u and v through
    G = scale · diag(n_scale) · Qᵀ P, G's column i·r + j standing for u[:, i] · v[:, j].

    P: (M, r²), Q: (M, N), any float dtypes, cast to u's dtype (the adapter dtype) for the product
    (fp32 accumulation); u, v: (N, r); n_scale: (N,) or None. Any strides."""
    if u.dim() != 2 or u.shape != v.shape or P.dim() != 2 or Q.dim() != 2:
        raise ValueError(f"P (M, r²), Q (M, N), u and v (N, r) expected, got {tuple(P.shape)}, {tuple(Q.shape)}, "
                         f"{tuple(u.shape)}, {tuple(v.shape)}")  # fmt: skip
    N, R = u.shape
    if P.shape[0] != Q.shape[0] or P.shape[1] != R * R or Q.shape[1] != N:
        raise ValueError(f"P (M, {R * R}) and Q (M, {N}) do not fit: {tuple(P.shape)} and {tuple(Q.shape)}")
    if u.dtype != v.dtype:
        raise TypeError(f"u and v must share a dtype, got {u.dtype} and {v.dtype}")
    if n_scale is not None and n_scale.shape != (N,):
        raise ValueError(f"n_scale must be ({N},), got {tuple(n_scale.shape)}")
    for name, t in (("P", P), ("u", u), ("v", v), ("n_scale", n_scale)):
        if t is not None and t.device != Q.device:
            raise ValueError(f"{name} must be on {Q.device}, got {t.device}")
    M = Q.shape[0]
    if M == 0 or N == 0 or R == 0:
        return torch.zeros_like(u, memory_format=torch.contiguous_format), torch.zeros_like(
            v, memory_format=torch.contiguous_format
        )
    rp, block_i = rank_layout(R, Q.device)
    cfg = skinny_config(Q.device, block_i * rp, u.dtype)
    # fp32 Q tiles take 64 rows of u, not 128 (twice the bytes a tile; lora_adapter_grad does the same).
    block_n = (128 if u.dtype != torch.float32 else 64) if on_gpu(Q.device) else 32
    # 64 rows a step on GPUs: P's tile is fp32 (h or dh), and 128 rows x 4 stages passed sm_90a's shared memory.
    block_m = min(cfg.block_k, 64)
    chunks = triton.cdiv(R, block_i)
    tiles = triton.cdiv(N, block_n) * chunks
    split = max(1, min(triton.cdiv(2 * num_sms(Q.device), tiles), triton.cdiv(M, 4 * block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(M, split), block_m) * block_m
    split = triton.cdiv(M, rows_per_split)
    du = torch.zeros((split, N, R), dtype=torch.float32, device=Q.device)
    dv = torch.zeros((split * chunks, N, R), dtype=torch.float32, device=Q.device)
    grid = (triton.cdiv(N, block_n), chunks, split)
    _loha_factor_grad_kernel[grid](
        P, Q, u, v, n_scale if n_scale is not None else du, du, dv,
        M, N, R, rows_per_split,
        P.stride(0), P.stride(1), Q.stride(0), Q.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        du.stride(0), du.stride(1), du.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        float(scale),
        HAS_NSCALE=n_scale is not None, DOT_DTYPE=tl_dtype(u.dtype), PRECISION=dot_precision(u.dtype),
        RP=rp, BLOCK_I=block_i, BLOCK_N=block_n, BLOCK_M=block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return du.sum(0).to(u.dtype), dv.sum(0).to(u.dtype)
