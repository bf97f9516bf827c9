"""lora_grad_dy: both LoRA gradients that read dy, from one pass over dy,

    dh = scale · dy · B        (M × r, fp32: backward's shrink of dy)
    dB = scale · dyᵀ · h       (N × r, the adapter dtype)

dy: M × N, B: N × r (lora_B), h: M × r (the forward's fp32 h = dropout(x)Aᵀ/(1-p)).

Structure: one program per (BLOCK_M rows of dy) × (BLOCK_R ranks). It walks N in BLOCK_N
steps; each dy tile, loaded once, feeds both products: `dh += dy_tile · B_tile` in an fp32
accumulator held over the walk, and `hᵀ · dy_tile` (r × BLOCK_N), atomically added into an
fp32 dB. The cuBLAS composite (ops/triton/lora_composite.py) uses it where the fused path
reads dy twice (lora_shrink for dh, lora_adapter_grad for dB). dy is read once when r fits one
rank block (64 on GPUs), else once per rank block. dB's fp32 sums arrive in an order that
varies from run to run (atomics): its last bits are not bit-reproducible; dh is.
Operands are cast to the adapter dtype (B's), accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, skinny_config, tl_dtype
from .tiles import load_tile, store_tile


@triton.jit
def _lora_grad_dy_kernel(
    dy_ptr, b_ptr, h_ptr, dh_ptr, db_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr, stride_dhm, stride_dhr,
    stride_dbn, stride_dbr,
    scale,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ht = load_tile(h_ptr, offs_r, offs_m, stride_hr, stride_hm, R, M).to(DOT_DTYPE)
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, M, N).to(DOT_DTYPE)
        b = load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, N, R)
        dh = tl.dot(dy, b.to(DOT_DTYPE), dh, input_precision=PRECISION)
        db = tl.dot(ht, dy, input_precision=PRECISION) * scale  # (BLOCK_R, BLOCK_N)
        mask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
        tl.atomic_add(db_ptr + offs_r[:, None] * stride_dbr + offs_n[None, :] * stride_dbn, db, mask=mask)
    store_tile(dh_ptr, dh * scale, offs_m, offs_r, stride_dhm, stride_dhr, M, R)


def lora_grad_dy(
    dy: torch.Tensor, lora_B: torch.Tensor, h: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dB): `scale · dy · lora_B` as fp32 (M, r) and `scale · dyᵀ · h` as a new (N, r)
    tensor of lora_B's dtype, from one pass over dy.

    dy: (M, N), lora_B: (N, r), h: (M, r); any strides and float dtypes, cast to lora_B's dtype
    for the products (fp32 accumulation)."""
    if dy.dim() != 2 or lora_B.dim() != 2 or h.dim() != 2:
        raise ValueError(
            f"dy, lora_B and h must be 2-D, got {tuple(dy.shape)}, {tuple(lora_B.shape)}, {tuple(h.shape)}"
        )
    M, N = dy.shape
    R = lora_B.shape[1]
    if lora_B.shape[0] != N or h.shape != (M, R):
        raise ValueError(f"lora_B must be ({N}, r) and h ({M}, r), got {tuple(lora_B.shape)} and {tuple(h.shape)}")
    for name, t in (("lora_B", lora_B), ("h", h)):
        if t.device != dy.device:
            raise ValueError(f"{name} must be on {dy.device}, got {t.device}")
    dh = torch.zeros((M, R), dtype=torch.float32, device=dy.device)
    db = torch.zeros((N, R), dtype=torch.float32, device=dy.device)
    if M and N and R:
        cfg = skinny_config(dy.device, R, lora_B.dtype)
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(R, cfg.block_n))
        _lora_grad_dy_kernel[grid](
            dy, lora_B, h, dh, db,
            M, N, R,
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), h.stride(0), h.stride(1),
            dh.stride(0), dh.stride(1), db.stride(0), db.stride(1),
            float(scale),
            DOT_DTYPE=tl_dtype(lora_B.dtype), PRECISION=dot_precision(lora_B.dtype),
            BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_n, BLOCK_N=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dh, db.to(lora_B.dtype)
