"""lora_adapter_grad: the LoRA weight gradients, reductions over the M rows,

    out = scale · Pᵀ · dropout(Q)        P: M × r,  Q: M × N,  out: r × N

dA = dhᵀ · dropout(x) / (1 - p)   (P = dh, Q = x, mask read from the forward's keep bytes)
dB = s · dyᵀ · h                  (P = h, Q = dy, no dropout; `transpose=True` returns the
                                   r × N product in dB's (N, r) layout)

Structure: one program per (BLOCK_R ranks) × (BLOCK_N columns) × (split of M). Rank-sized
outputs are small, so M is split across `split` programs (split-K style) to fill the GPU;
each writes an fp32 partial and the launcher sums the partials with torch (deterministic,
no atomics). Operands are cast to the adapter dtype, accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, num_sms, on_gpu, skinny_config, tl_dtype
from .dropout import check_keep_bytes, load_keep
from .tiles import load_tile, store_tile


@triton.jit
def _lora_adapter_grad_kernel(
    p_ptr, q_ptr, out_ptr, keep_ptr,
    M, N, R, rows_per_split,
    stride_pm, stride_pr, stride_qm, stride_qn, stride_os, stride_or, stride_on, stride_keep,
    scale,
    DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        pt = load_tile(p_ptr, offs_r, offs_m, stride_pr, stride_pm, R, m_end)
        q = load_tile(q_ptr, offs_m, offs_n, stride_qm, stride_qn, m_end, N)
        if DROPOUT:
            q = tl.where(load_keep(keep_ptr, stride_keep, offs_m, offs_n, m_end, N), q, 0.0)
        acc = tl.dot(pt.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision=PRECISION)
    store_tile(out_ptr + pid_s * stride_os, acc * scale, offs_r, offs_n, stride_or, stride_on, R, N)


def lora_adapter_grad(
    P: torch.Tensor,
    Q: torch.Tensor,
    dtype: torch.dtype,
    scale: float = 1.0,
    keep: torch.Tensor | None = None,
    transpose: bool = False,
) -> torch.Tensor:
    """`scale · Pᵀ · dropout(Q)` as a new contiguous (r, N) tensor of `dtype`; (N, r) holding
    the transpose when `transpose`.

    P: (M, r), Q: (M, N), any strides and float dtypes; both are cast to `dtype` for the
    product (fp32 accumulation). With `keep` (the (M, ceil(N/8)) uint8 keep bytes of a dropout
    mask over Q's M × N, dropout.py) Q's elements are gated by that mask (no rescaling here:
    fold 1/(1-p) into `scale`).
    """
    if P.dim() != 2 or Q.dim() != 2 or P.shape[0] != Q.shape[0]:
        raise ValueError(f"P (M, r) and Q (M, N) do not fit: {tuple(P.shape)} and {tuple(Q.shape)}")
    if P.device != Q.device:
        raise ValueError(f"P and Q must share a device, got {P.device} and {Q.device}")
    M, R = P.shape
    N = Q.shape[1]
    dropout = keep is not None
    if dropout:
        check_keep_bytes(keep, M, N, Q.device)
    if M == 0 or R == 0 or N == 0:
        return torch.zeros((N, R) if transpose else (R, N), dtype=dtype, device=Q.device)
    cfg = skinny_config(Q.device, R, dtype)
    block_r = cfg.block_n
    # fp32 Q tiles and masked (dropout) tiles take 64 columns, not 128: the 128-column variants
    # spill on sm_90a (fp32 by 100s of bytes; bf16/fp16 reading the keep bytes by 8).
    block_n = (128 if dtype != torch.float32 and not dropout else 64) if on_gpu(Q.device) else 32
    block_m = cfg.block_k
    tiles = triton.cdiv(R, block_r) * triton.cdiv(N, block_n)
    # Enough programs for about two waves, each with at least a few BLOCK_M steps.
    split = max(1, min(triton.cdiv(2 * num_sms(Q.device), tiles), triton.cdiv(M, 4 * block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(M, split), block_m) * block_m
    split = triton.cdiv(M, rows_per_split)
    partial = torch.empty((split, R, N), dtype=torch.float32, device=Q.device)
    grid = (triton.cdiv(R, block_r), triton.cdiv(N, block_n), split)
    _lora_adapter_grad_kernel[grid](
        P, Q, partial, keep if dropout else partial,
        M, N, R, rows_per_split,
        P.stride(0), P.stride(1), Q.stride(0), Q.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), keep.stride(0) if dropout else 0,
        float(scale),
        DROPOUT=dropout, DOT_DTYPE=tl_dtype(dtype), PRECISION=dot_precision(dtype),
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_M=block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    out = partial[0] if split == 1 else partial.sum(0)
    return (out.t() if transpose else out).contiguous().to(dtype)
