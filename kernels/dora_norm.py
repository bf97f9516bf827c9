"""dora_norm: DoRA's weight norm, `‖W + s·B·A‖` per row of W, from one pass over W.

W: N × K (nn.Linear's (out, in) layout, any strides), A: r × K, B: N × r. Each program owns
BLOCK_N rows: it walks K in BLOCK_K steps, loads the W tile once, forms the matching tile of
B·A with `tl.dot` (operands in the adapter dtype, fp32 accumulation; r below 16 padded by
masks), adds s times it to W in fp32, and accumulates the squares per row in fp32. The
N × K sum `W + s·B·A` never reaches memory; the result is an fp32 (N,) vector.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, on_gpu, rank_block, tl_dtype
from .tiles import load_tile


@triton.jit
def _dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    LORA_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            b = load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, N, R)
            a = load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, R, K)
            ba = tl.dot(b.to(LORA_DTYPE), a.to(LORA_DTYPE), ba, input_precision=PRECISION)
        w = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, N, K).to(tl.float32)
        v = w + scaling * ba
        sq += tl.sum(v * v, axis=1)
    tl.store(out_ptr + offs_n, tl.sqrt(sq), mask=offs_n < N)


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`‖weight + scaling · lora_B · lora_A‖` per row, as a new fp32 (N,) tensor.

    weight: (N, K), lora_A: (r, K), lora_B: (N, r), any strides, on one device; the B·A tile
    product runs in lora_A's dtype with fp32 accumulation."""
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_A.shape[1] != weight.shape[1]:
        raise ValueError(f"weight (N, K) and lora_A (r, K) do not fit: {tuple(weight.shape)}, {tuple(lora_A.shape)}")
    N, K = weight.shape
    R = lora_A.shape[0]
    if tuple(lora_B.shape) != (N, R):
        raise ValueError(f"lora_B must be ({N}, {R}), got {tuple(lora_B.shape)}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != weight.device:
            raise ValueError(f"{name} must be on {weight.device}, got {t.device}")
    out = torch.empty((N,), dtype=torch.float32, device=weight.device)
    if N == 0:
        return out
    gpu = on_gpu(weight.device)
    # 64 rows: the B·A tile product is a tensor-core MMA (HGMMA on sm_90a) on GPUs.
    block_n, block_k = (64, 64) if gpu else (16, 32)
    grid = (triton.cdiv(N, block_n),)
    _dora_norm_kernel[grid](
        weight, lora_A, lora_B, out,
        N, K, R,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        float(scaling),
        LORA_DTYPE=tl_dtype(lora_A.dtype), PRECISION=dot_precision(lora_A.dtype),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=rank_block(R, cap=64 if gpu else 16),
        num_warps=4 if gpu else 1, num_stages=3 if gpu else 1,
    )  # fmt: skip
    return out
