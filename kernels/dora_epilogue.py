"""dora_epilogue: DoRA's combine for the composite path (base products from torch / cuBLAS),

    y = base + b + (scale − 1) ⊙ v + scale ⊙ s · lora,     u = v + s · lora

base = x Wᵀ and v = x'Wᵀ (v is base itself without dropout), lora = x'AᵀBᵀ, all M × N (any
strides and float dtypes); scale = m / ‖W + s·B·A‖: N (fp32); bias: N. One elementwise pass,
fp32 arithmetic, y in base's dtype and u (the magnitude's gradient input) in base's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import on_gpu
from .tiles import load_tile, store_tile


@triton.jit
def _dora_epilogue_kernel(
    base_ptr, v_ptr, lora_ptr, scale_ptr, bias_ptr, y_ptr, u_ptr,
    M, N,
    stride_bm, stride_bn, stride_vm, stride_vn, stride_lm, stride_ln, stride_ym, stride_yn, stride_um, stride_un,
    scaling,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = load_tile(base_ptr, offs_m, offs_n, stride_bm, stride_bn, M, N).to(tl.float32)
    if HAS_V:
        v = load_tile(v_ptr, offs_m, offs_n, stride_vm, stride_vn, M, N).to(tl.float32)
    else:
        v = base
    lora = load_tile(lora_ptr, offs_m, offs_n, stride_lm, stride_ln, M, N).to(tl.float32) * scaling
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    y = base + (scale - 1.0) * v + scale * lora
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, y, offs_m, offs_n, stride_ym, stride_yn, M, N)
    if STORE_U:
        store_tile(u_ptr, v + lora, offs_m, offs_n, stride_um, stride_un, M, N)


def dora_epilogue(
    base: torch.Tensor,
    v: torch.Tensor | None,
    lora: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    store_u: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, u) as new (M, N) tensors in base's dtype (see the module docstring); v None means
    v = base (no dropout); u is None unless `store_u`."""
    if base.dim() != 2:
        raise ValueError(f"base must be (M, N), got {tuple(base.shape)}")
    M, N = base.shape
    for name, t in (("v", v), ("lora", lora)):
        if t is not None and tuple(t.shape) != (M, N):
            raise ValueError(f"{name} must be ({M}, {N}), got {tuple(t.shape)}")
    if tuple(scale.shape) != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be an fp32 ({N},) tensor, got {tuple(scale.shape)} {scale.dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    for name, t in (("v", v), ("lora", lora), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != base.device:
            raise ValueError(f"{name} must be on {base.device}, got {t.device}")
    y = torch.empty((M, N), dtype=base.dtype, device=base.device)
    u = torch.empty((M, N), dtype=base.dtype, device=base.device) if store_u else None
    if M == 0 or N == 0:
        return y, u
    block_m, block_n = (32, 128) if on_gpu(base.device) else (16, 32)
    v_arg, u_arg = (v if v is not None else base), (u if u is not None else y)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _dora_epilogue_kernel[grid](
        base, v_arg, lora, scale, bias if bias is not None else y, y, u_arg,
        M, N,
        base.stride(0), base.stride(1), v_arg.stride(0), v_arg.stride(1), lora.stride(0), lora.stride(1),
        y.stride(0), y.stride(1), u_arg.stride(0), u_arg.stride(1),
        float(scaling),
        HAS_V=v is not None, HAS_BIAS=bias is not None, STORE_U=store_u,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if on_gpu(base.device) else 1,
    )  # fmt: skip
    return y, u
