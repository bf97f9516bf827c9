"""dora_dx: DoRA's input gradient as one matmul over W, the norm a constant (as HF peft),

    dx = dy W + mask ⊙ [((scale − 1) ⊙ dy) W + dh A] / (1 − p)      with dropout
    dx = (scale ⊙ dy) W + dh A                                     without

dy: M × N, W: N × K (read through any strides), scale = m / norm: N (fp32), dh = s·(scale ⊙ dy)B:
M × r (fp32, from lora_shrink), A: r × K. Each program owns a BLOCK_M × BLOCK_K tile of dx and
walks N: the dy and W tiles are loaded once per step and feed both accumulators (dy·W and
((scale − 1) ⊙ dy)·W) with dropout, one without; the adapter term dh·A starts the second
accumulator (the only one without dropout). The mask, read from the keep bytes the forward
shrink wrote (1 bit per element, no Philox here), gates the second accumulator in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, matmul_config, rank_block, tl_dtype
from .dropout import check_dropout_keep, load_keep
from .tiles import grouped_tile, load_tile, store_tile


@triton.jit
def _dora_dx_kernel(
    dy_ptr, w_ptr, scale_ptr, dh_ptr, a_ptr, dx_ptr, keep_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dhm, stride_dhr, stride_ar, stride_ak,
    stride_dxm, stride_dxk, stride_keep,
    p,
    DROPOUT: tl.constexpr, BASE_DTYPE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

    acc_adapter = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        dh = load_tile(dh_ptr, offs_m, offs_r, stride_dhm, stride_dhr, M, R)
        a = load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, R, K)
        acc_adapter = tl.dot(dh.to(LORA_DTYPE), a.to(LORA_DTYPE), acc_adapter, input_precision=LORA_PRECISION)

    if DROPOUT:
        acc_base = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, M, N)
            w = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, N, K).to(BASE_DTYPE)
            c = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=1.0) - 1.0
            acc_base = tl.dot(dy.to(BASE_DTYPE), w, acc_base, input_precision=BASE_PRECISION)
            dyc = (dy.to(tl.float32) * c[None, :]).to(BASE_DTYPE)
            acc_adapter = tl.dot(dyc, w, acc_adapter, input_precision=BASE_PRECISION)
        keep = load_keep(keep_ptr, stride_keep, offs_m, offs_k, M, K)
        dx = acc_base + tl.where(keep, acc_adapter, 0.0) / (1.0 - p)
    else:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, M, N)
            w = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, N, K).to(BASE_DTYPE)
            scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
            dys = (dy.to(tl.float32) * scale[None, :]).to(BASE_DTYPE)
            acc_adapter = tl.dot(dys, w, acc_adapter, input_precision=BASE_PRECISION)
        dx = acc_adapter
    store_tile(dx_ptr, dx, offs_m, offs_k, stride_dxm, stride_dxk, M, K)


def dora_dx(
    dy: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    dh: torch.Tensor,
    lora_A: torch.Tensor,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """dx of DoRA's forward (see the module docstring) as a new (M, K) tensor in dy's dtype.

    dy: (M, N); weight: (N, K) of dy's dtype; scale: (N,) fp32; dh: (M, r) any float dtype, cast
    to lora_A's dtype for its product; lora_A: (r, K). With `dropout_p > 0` the forward's mask, given
    as its keep bytes `keep` ((M, ceil(K/8)) uint8), gates the scaled and adapter terms, rescaled by 1/(1 − p)."""
    if dy.dim() != 2 or weight.dim() != 2 or weight.shape[0] != dy.shape[1]:
        raise ValueError(f"dy (M, N) and weight (N, K) do not fit: {tuple(dy.shape)} and {tuple(weight.shape)}")
    if weight.dtype != dy.dtype:
        raise TypeError(f"weight must have dy's dtype {dy.dtype}, got {weight.dtype}")
    M, N = dy.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    if tuple(lora_A.shape) != (R, K) or tuple(dh.shape) != (M, R):
        raise ValueError(f"dh must be ({M}, r) and lora_A (r, {K}), got {tuple(dh.shape)} and {tuple(lora_A.shape)}")
    if tuple(scale.shape) != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be an fp32 ({N},) tensor, got {tuple(scale.shape)} {scale.dtype}")
    for name, t in (("weight", weight), ("scale", scale), ("dh", dh), ("lora_A", lora_A)):
        if t.device != dy.device:
            raise ValueError(f"{name} must be on {dy.device}, got {t.device}")
    dropout = check_dropout_keep(dropout_p, keep, dy.device, M, K)
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0 or K == 0:
        return dx
    cfg = matmul_config(dy.device, dy.dtype)
    # Tiles of dx: BLOCK_M × BLOCK_K outputs (the config's M × N tile), reducing over N in block_k steps.
    block_m, block_out, block_red = cfg.block_m, cfg.block_n, cfg.block_k
    if dropout:  # two accumulators: half the output columns per tile keeps it free of spills
        block_out = max(32, block_out // 2)
        if dy.dtype == torch.float32:  # fp32 on FMA: twice the operand registers, half the rows too
            block_m = max(32, block_m // 2)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(K, block_out),)
    _dora_dx_kernel[grid](
        dy, weight, scale, dh, lora_A, dx, keep if dropout else dx,
        M, N, K, R,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
        dh.stride(0), dh.stride(1), lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        keep.stride(0) if dropout else 0,
        float(dropout_p),
        DROPOUT=dropout, BASE_DTYPE=tl_dtype(dy.dtype), LORA_DTYPE=tl_dtype(lora_A.dtype),
        BASE_PRECISION=dot_precision(dy.dtype), LORA_PRECISION=dot_precision(lora_A.dtype),
        BLOCK_M=block_m, BLOCK_N=block_red, BLOCK_K=block_out,
        BLOCK_R=rank_block(R, cap=block_red), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return dx
