"""dora_linear: DoRA's forward as one matmul, the magnitude scale applied in its epilogue,

    y = x Wᵀ + b + (m/‖W + s·B·A‖ − 1) ⊙ x'Wᵀ + m/‖W + s·B·A‖ ⊙ s · h Bᵀ,   x' = dropout(x)

x: M × K, W: N × K (any strides), h = x'Aᵀ: M × r (fp32, from lora_shrink with the same mask),
B: N × r, scale = m / norm: N (fp32), bias: N. Each program owns a BLOCK_M × BLOCK_N tile:

* without dropout (eval, or p = 0): one fp32 accumulator starts as s · h Bᵀ, the base product
  accumulates on top, and the epilogue writes `scale ⊙ acc + b` (and acc itself as u, the
  magnitude's gradient input, when asked);
* with dropout: two accumulators, both starting from s · h Bᵀ (the second times (1 − p)); each
  K step loads the x and W tiles once and accumulates x·Wᵀ into the first and
  (mask ⊙ x)·Wᵀ into the second (the mask read from the keep bytes lora_shrink wrote,
  `dropout.load_keep`: 1 bit per element, no Philox here). After the loop the second holds
  (1 − p) · (x'Wᵀ + s·hBᵀ), so the epilogue writes `acc1 + (scale − 1) ⊙ acc2 / (1 − p) + b`
  (x'Wᵀ is never a second matmul or a second pass over W) and u = acc2 / (1 − p).

The mask is drawn once per step, by the forward shrink (one Philox evaluation per 8 elements
of x, dropout.py); every output-column tile here reads the same keep bytes.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .configs import dot_precision, matmul_config, rank_block, tl_dtype
from .dropout import check_dropout_keep, load_keep
from .tiles import check_matmul_operands, grouped_tile, load_tile, store_tile


@triton.jit
def _dora_linear_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, scale_ptr, y_ptr, u_ptr, keep_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr, stride_bn, stride_br,
    stride_ym, stride_yn, stride_um, stride_un, stride_keep,
    scaling, p,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, STORE_U: tl.constexpr,
    BASE_DTYPE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h = load_tile(h_ptr, offs_m, offs_r, stride_hm, stride_hr, M, R)
        b = load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, R, N)
        acc = tl.dot(h.to(LORA_DTYPE), b.to(LORA_DTYPE), acc, input_precision=LORA_PRECISION)
    acc = acc * scaling
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)

    if DROPOUT:
        acc_drop = acc * (1.0 - p)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K).to(BASE_DTYPE)
            w = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N).to(BASE_DTYPE)
            acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
            x_kept = tl.where(load_keep(keep_ptr, stride_keep, offs_m, offs_k, M, K), x, 0.0).to(BASE_DTYPE)
            acc_drop = tl.dot(x_kept, w, acc_drop, input_precision=BASE_PRECISION)
        u = acc_drop / (1.0 - p)
        y = acc + (scale - 1.0)[None, :] * u
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
            w = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N)
            acc = tl.dot(x.to(BASE_DTYPE), w.to(BASE_DTYPE), acc, input_precision=BASE_PRECISION)
        u = acc
        y = scale[None, :] * acc

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        y += bias.to(tl.float32)[None, :]
    store_tile(y_ptr, y, offs_m, offs_n, stride_ym, stride_yn, M, N)
    if STORE_U:
        store_tile(u_ptr, u, offs_m, offs_n, stride_um, stride_un, M, N)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
    store_u: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, u) of DoRA's forward (see the module docstring) as new (M, N) tensors in x's dtype;
    u = x'Wᵀ + s·hBᵀ is None unless `store_u`.

    x: (M, K); weight: (N, K) of x's dtype; bias: (N,) or None; h: (M, r) = dropout(x)Aᵀ/(1-p),
    any float dtype (cast to lora_B's dtype for its product); lora_B: (N, r); scale: (N,) fp32,
    m / ‖W + s·B·A‖. With `dropout_p > 0`, `keep` holds the mask's keep bytes over x's M × K
    ((M, ceil(K/8)) uint8, the ones lora_shrink wrote while computing h)."""
    M, K, N = check_matmul_operands(x, weight)
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({N},) of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    R = h.shape[1] if h.dim() == 2 else -1
    if h.dim() != 2 or h.shape[0] != M or tuple(lora_B.shape) != (N, R):
        raise ValueError(f"h must be ({M}, r) and lora_B ({N}, r), got {tuple(h.shape)} and {tuple(lora_B.shape)}")
    if tuple(scale.shape) != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be an fp32 ({N},) tensor, got {tuple(scale.shape)} {scale.dtype}")
    for name, t in (("bias", bias), ("h", h), ("lora_B", lora_B), ("scale", scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    dropout = check_dropout_keep(dropout_p, keep, x.device, M, K)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u = torch.empty((M, N), dtype=x.dtype, device=x.device) if store_u else None
    if M == 0 or N == 0:
        return y, u
    cfg = matmul_config(x.device, x.dtype)
    if dropout:  # two accumulators and the Philox mask: half the columns per tile keeps it free of spills
        cfg = dataclasses.replace(cfg, block_n=max(32, cfg.block_n // 2))
        if x.dtype == torch.float32:  # fp32 runs on FMA with twice the operand registers: half the rows too
            cfg = dataclasses.replace(
                cfg, block_m=max(32, cfg.block_m // 2), block_n=32, num_warps=max(8, cfg.num_warps)
            )
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    u_arg = u if u is not None else y
    _dora_linear_kernel[grid](
        x, weight, bias if bias is not None else y, h, lora_B, scale, y, u_arg, keep if dropout else y,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        h.stride(0), h.stride(1), lora_B.stride(0), lora_B.stride(1),
        y.stride(0), y.stride(1), u_arg.stride(0), u_arg.stride(1), keep.stride(0) if dropout else 0,
        float(scaling), float(dropout_p),
        HAS_BIAS=bias is not None, DROPOUT=dropout, STORE_U=store_u,
        BASE_DTYPE=tl_dtype(x.dtype), LORA_DTYPE=tl_dtype(lora_B.dtype),
        BASE_PRECISION=dot_precision(x.dtype), LORA_PRECISION=dot_precision(lora_B.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=rank_block(R, cap=cfg.block_k), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y, u
