"""lokr_apply: `kron(w1, w2)` applied to each row as LoKr's two small matmuls in one kernel,

    Y_m = scale · out_scale ⊙ (w1 · (in_scale ⊙ X_m) · w2ᵀ)

with X_m = x[m] viewed as (c, d) and Y_m = y[m] viewed as (a, b); w1 (a, c), w2 (b, d). This is
`x · kron(w1, w2)ᵀ` (times the scales) without the (a·b) × (c·d) Kronecker product, and without
the intermediate X_m w2ᵀ in memory: it stays in registers between the two products.

Forward: `y = s · row_scale ⊙ (w1 X w2ᵀ)` (out_scale = row_scale, rank dropout).
Backward: `dx = w1ᵀ (s · row_scale ⊙ dY) w2`, the same kernel with (w1ᵀ, w2ᵀ) as strided views
and in_scale = row_scale.

Structure: one program per (row m) × (BLOCK_B columns of Y): it walks d in BLOCK_D steps,
accumulating T = X_m w2ᵀ (C_PAD × BLOCK_B, all of c, padded to a power of two) in fp32, casts
it to the adapter dtype once, then walks a in BLOCK_A steps writing w1[a-block] · T. Both
products are tl.dot with fp32 accumulation; x is cast to the adapter dtype (w1's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, on_gpu, tl_dtype
from .tiles import load_tile

# Largest c (w1's columns, padded to a power of two) one program holds: T is C_PAD × BLOCK_B fp32.
MAX_C_PAD = 128


@triton.jit
def _lokr_apply_kernel(
    x_ptr, w1_ptr, w2_ptr, is_ptr, os_ptr, y_ptr,
    A, B, C, D,
    stride_xm, stride_xk, stride_w1a, stride_w1c, stride_w2b, stride_w2d, stride_ym, stride_yn,
    scale,
    HAS_INSCALE: tl.constexpr, HAS_OUTSCALE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    offs_c = tl.arange(0, C_PAD)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    x_row = x_ptr + m * stride_xm
    t = tl.zeros((C_PAD, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = (offs_c[:, None] < C) & (offs_d[None, :] < D)
        k = offs_c[:, None] * D + offs_d[None, :]  # x's feature index of X[c, d]
        xt = tl.load(x_row + k * stride_xk, mask=mask, other=0.0)
        if HAS_INSCALE:
            xt = xt.to(tl.float32) * tl.load(is_ptr + k, mask=mask, other=0.0).to(tl.float32)
        w2t = load_tile(w2_ptr, offs_d, offs_b, stride_w2d, stride_w2b, D, B)  # (BLOCK_D, BLOCK_B)
        t = tl.dot(xt.to(DOT_DTYPE), w2t.to(DOT_DTYPE), t, input_precision=PRECISION)
    t = t.to(DOT_DTYPE)
    y_row = y_ptr + m * stride_ym
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        w1 = load_tile(w1_ptr, offs_a, offs_c, stride_w1a, stride_w1c, A, C)  # (BLOCK_A, C_PAD)
        y = tl.dot(w1.to(DOT_DTYPE), t, input_precision=PRECISION) * scale
        n = offs_a[:, None] * B + offs_b[None, :]  # y's feature index of Y[a, b]
        mask = (offs_a[:, None] < A) & (offs_b[None, :] < B)
        if HAS_OUTSCALE:
            y = y * tl.load(os_ptr + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + n * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


def lokr_blocks(c: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(C_PAD, BLOCK_A, BLOCK_B, BLOCK_D) for w1 with c columns on `device` (blocks of 64 on GPUs,
    32 for fp32, whose FMA products spilled at 64 (static audit), 16 under the interpreter; every
    side at least 16, tl.dot's minimum)."""
    c_pad = max(16, triton.next_power_of_2(c))
    block = (32 if dtype == torch.float32 else 64) if on_gpu(device) else 16
    return c_pad, block, block, block


def lokr_apply(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    scale: float = 1.0,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scale · out_scale ⊙ (x · kron(w1, w2)ᵀ)` with x's features times `in_scale`, as a new
    (M, a·b) tensor in w1's dtype (the adapter dtype; x is cast to it, fp32 accumulation).

    x: (M, c·d); w1: (a, c) with c <= MAX_C_PAD; w2: (b, d); in_scale: (c·d,) or None;
    out_scale: (a·b,) or None. Any strides."""
    if x.dim() != 2 or w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(f"x (M, c·d), w1 (a, c) and w2 (b, d) must be 2-D, got {tuple(x.shape)}, "
                         f"{tuple(w1.shape)}, {tuple(w2.shape)}")  # fmt: skip
    (a, c), (b, d) = w1.shape, w2.shape
    if x.shape[1] != c * d:
        raise ValueError(f"x has {x.shape[1]} features but kron(w1, w2) takes {c}·{d} = {c * d}")
    if c > MAX_C_PAD:
        raise ValueError(f"w1 may have at most {MAX_C_PAD} columns (one program holds all of them), got {c}")
    if w1.dtype != w2.dtype:
        raise TypeError(f"w1 and w2 must share a dtype, got {w1.dtype} and {w2.dtype}")
    for name, t, n in (("in_scale", in_scale, c * d), ("out_scale", out_scale, a * b)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must be ({n},), got {tuple(t.shape)}")
    for name, t in (("w1", w1), ("w2", w2), ("in_scale", in_scale), ("out_scale", out_scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    M = x.shape[0]
    y = torch.empty((M, a * b), dtype=w1.dtype, device=x.device)
    if M == 0 or a * b == 0:
        return y
    if c * d == 0:
        return y.zero_()
    c_pad, block_a, block_b, block_d = lokr_blocks(c, x.device, w1.dtype)
    grid = (M, triton.cdiv(b, block_b))
    _lokr_apply_kernel[grid](
        x, w1, w2, in_scale if in_scale is not None else y, out_scale if out_scale is not None else y, y,
        a, b, c, d,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), y.stride(0), y.stride(1),
        float(scale),
        HAS_INSCALE=in_scale is not None, HAS_OUTSCALE=out_scale is not None,
        DOT_DTYPE=tl_dtype(w1.dtype), PRECISION=dot_precision(w1.dtype),
        C_PAD=c_pad, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d,
        num_warps=4, num_stages=2 if on_gpu(x.device) else 1,
    )  # fmt: skip
    return y
