"""xlora_shrink: X-LoRA's stacked shrink with the per-token expert scaling in its epilogue,

    raw[m, j] = Σ_k x[m, k] · A[j, k]              (M × R, all experts' ranks stacked, R = Σ r_i)
    out[m, j] = raw[m, j] · c[m, expert(j)]        (each rank slice times its expert's coefficient)

x: M × K; A: (R, K), any strides; c: M × n_experts; `expert`: R int32, the expert owning each
stacked rank (unpadded ranks: a rank block may span several experts). Forward uses it for
`hs = (x Aᵀ) ⊙ G` (then `lora_expand` with the stacked B adds `hs Bᵀ` to the base product);
backward for `dh = (dy B) ⊙ G` by passing the stacked Bᵀ (a strided view) as A, keeping `raw`
(the gradient w.r.t. hs) for the coefficients' gradient.

Structure: lora_shrink's (one program per BLOCK_M rows × BLOCK_R ranks, K walked in BLOCK_K
steps, operands cast to A's dtype, fp32 `tl.dot`), plus the epilogue. With `skip_zero`, a
program whose coefficients are all zero (top-k left none of its ranks' experts to any of its
tokens) does not walk K at all and writes zeros: dropped experts cost no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, skinny_config, tl_dtype
from .tiles import load_tile, store_tile

RANK_BLOCK_CAP = 32


@triton.jit
def _xlora_shrink_kernel(
    x_ptr, a_ptr, c_ptr, expert_ptr, out_ptr, raw_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_cm, stride_cn, stride_om, stride_or,
    STORE_RAW: tl.constexpr, SKIP_ZERO: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    expert = tl.load(expert_ptr + offs_r, mask=offs_r < R, other=0)
    g_ptrs = c_ptr + offs_m[:, None] * stride_cm + expert[None, :] * stride_cn
    in_tile = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    k_end = K
    if SKIP_ZERO:
        g = tl.load(g_ptrs, mask=in_tile, other=0.0).to(tl.float32)
        k_end = tl.where(tl.max(tl.max(tl.abs(g), axis=1), axis=0) > 0.0, K, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        a = load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, K, R)
        acc = tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if STORE_RAW:
        store_tile(raw_ptr, acc, offs_m, offs_r, stride_om, stride_or, M, R)
    # The epilogue reloads the coefficients (a BLOCK_M × BLOCK_R gather) rather than keep them live over K.
    g = tl.load(g_ptrs, mask=in_tile, other=0.0).to(tl.float32)
    store_tile(out_ptr, acc * g, offs_m, offs_r, stride_om, stride_or, M, R)


def xlora_shrink(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    coeff: torch.Tensor,
    expert_of_rank: torch.Tensor,
    store_raw: bool = False,
    skip_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`(x lora_Aᵀ) ⊙ G`, `x lora_Aᵀ` or None) as fp32 (M, R) tensors, G[m, j] = coeff[m, expert_of_rank[j]].

    x: (M, K), lora_A: (R, K), any strides; coeff: (M, n) float, any strides; expert_of_rank:
    (R,) int32 contiguous, values in [0, n). The product runs in lora_A's dtype with fp32
    accumulation. `store_raw` also returns the unscaled product (None otherwise);
    `skip_zero` skips the work of tiles whose coefficients are all zero (only valid without
    `store_raw`: their raw product is not computed)."""
    if x.dim() != 2 or lora_A.dim() != 2 or lora_A.shape[1] != x.shape[1]:
        raise ValueError(f"x (M, K) and lora_A (R, K) do not fit: {tuple(x.shape)} and {tuple(lora_A.shape)}")
    M, K = x.shape
    R = lora_A.shape[0]
    if coeff.dim() != 2 or coeff.shape[0] != M:
        raise ValueError(f"coeff must be ({M}, n_experts), got {tuple(coeff.shape)}")
    if expert_of_rank.shape != (R,) or expert_of_rank.dtype != torch.int32 or not expert_of_rank.is_contiguous():
        raise ValueError(f"expert_of_rank must be a contiguous ({R},) int32 tensor, got {expert_of_rank.shape}")
    if store_raw and skip_zero:
        raise ValueError("skip_zero leaves the raw product of skipped tiles uncomputed; it excludes store_raw")
    for name, t in (("lora_A", lora_A), ("coeff", coeff), ("expert_of_rank", expert_of_rank)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    out = torch.empty((M, R), dtype=torch.float32, device=x.device)
    raw = torch.empty_like(out) if store_raw else None
    if M == 0 or R == 0:
        return out, raw
    if K == 0:
        return out.zero_(), (raw.zero_() if raw is not None else None)
    # Rank blocks of at most 32 (the stacked rank is large, its slices small): the accumulator
    # and the coefficient tile stay in registers without spilling (see the static audit).
    cfg = skinny_config(x.device, min(R, RANK_BLOCK_CAP), lora_A.dtype)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(R, cfg.block_n))
    _xlora_shrink_kernel[grid](
        x, lora_A, coeff, expert_of_rank, out, raw if raw is not None else out,
        M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), coeff.stride(0), coeff.stride(1),
        out.stride(0), out.stride(1),
        STORE_RAW=store_raw, SKIP_ZERO=skip_zero, DOT_DTYPE=tl_dtype(lora_A.dtype),
        PRECISION=dot_precision(lora_A.dtype),
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, raw
