"""lora_expand: a matmul with the LoRA expand fused in as extra K steps and an epilogue,

    out = x · Wᵀ  +  alpha · dropout_mask ⊙ (h · Bᵀ)  +  bias

x: M × K, W: N × K (nn.Linear's (out, in) layout, any strides), h: M × r (fp32),
B: N × r, bias: N. The M × N LoRA product is never written: each program accumulates its
BLOCK_M × BLOCK_N tile in one fp32 accumulator: first the expand over r (h cast to B's
dtype, the adapter dtype), scaled by alpha in fp32 and, in backward's dx, gated by the
dropout mask; then the base product over K (operands in the base dtype) on top of it.

Forward: `y = lora_expand(x, W, bias, h, B, alpha=s)` with h = dropout(x)Aᵀ/(1-p).
Backward: `dx = lora_expand(dy, Wᵀ, None, dh, Aᵀ, alpha=1/(1-p), keep)` with dh = s·dy·B:
the dropout mask (read from the keep bytes the forward shrink stored, numbered over x's
M × K; no Philox here) gates the adapter term only, which is exactly
`dy·W + mask ⊙ (dh·A) / (1-p)`.

The cuBLAS composite (ops/triton/lora_composite.py) uses the same kernel as an epilogue pass:
`lora_expand_add_(out, h, B, alpha, keep)` adds `alpha · mask ⊙ (h · Bᵀ)` into an existing
out (cuBLAS's x·Wᵀ + b in forward, dy·W in backward's dx) in place, K = 0 and ACCUMULATE.

Programs are ordered in groups of GROUP_M rows of tiles (Triton's matmul tutorial) so
consecutive programs share W's column tiles in L2. Ragged edges are masked; r below 16 is
padded to 16 by masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, matmul_config, rank_block, tl_dtype
from .dropout import check_keep_bytes, load_keep
from .tiles import check_matmul_operands, grouped_tile, load_tile, store_tile


@triton.jit
def _lora_expand_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, out_ptr, keep_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_hm, stride_hr, stride_bn, stride_br,
    stride_om, stride_on, stride_keep,
    alpha,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr,
    BASE_DTYPE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    # The adapter term first, in the one fp32 accumulator: alpha and the dropout mask apply to the
    # product (never to h before the cast to the adapter dtype, where fp16 could overflow), and the
    # base product then accumulates on top. One accumulator, with the mask applied before the
    # main loop, keeps the dropout variant free of register spills.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            h = load_tile(h_ptr, offs_m, offs_r, stride_hm, stride_hr, M, R)
            b = load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, R, N)
            acc = tl.dot(h.to(LORA_DTYPE), b.to(LORA_DTYPE), acc, input_precision=LORA_PRECISION)
        acc = acc * alpha
        if DROPOUT:
            acc = tl.where(load_keep(keep_ptr, stride_keep, offs_m, offs_n, M, N), acc, 0.0)

    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        w = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N)
        acc = tl.dot(x.to(BASE_DTYPE), w.to(BASE_DTYPE), acc, input_precision=BASE_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if ACCUMULATE:  # out += ...: each program reads and rewrites only its own tile
        acc += load_tile(out_ptr, offs_m, offs_n, stride_om, stride_on, M, N).to(tl.float32)
    store_tile(out_ptr, acc, offs_m, offs_n, stride_om, stride_on, M, N)


def lora_expand(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    alpha: float = 1.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x · weightᵀ + alpha · mask ⊙ (h · lora_Bᵀ) + bias` as a new (M, N) tensor in x's dtype.

    x: (M, K); weight: (N, K), same dtype as x; bias: (N,) or None; h: (M, r) any float
    dtype, cast to lora_B's dtype (the adapter dtype) for its product; lora_B: (N, r).
    h and lora_B are both given or both None. With `keep` (the (M, ceil(N/8)) uint8 keep
    bytes of a dropout mask numbered over the output's M × N, dropout.py) the adapter term is
    gated by that mask (no rescaling here).
    """
    M, K, N = check_matmul_operands(x, weight)
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({N},) of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if (h is None) != (lora_B is None):
        raise ValueError("h and lora_B must both be given or both be None")
    has_lora = h is not None
    R = 0
    if has_lora:
        R = h.shape[1]
        if h.dim() != 2 or h.shape[0] != M or lora_B.shape != (N, R):
            raise ValueError(f"h must be ({M}, r) and lora_B ({N}, r), got {tuple(h.shape)} and {tuple(lora_B.shape)}")
    for name, t in (("bias", bias), ("h", h), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    dropout = keep is not None and has_lora
    if dropout:
        check_keep_bytes(keep, M, N, x.device)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, h, lora_B, out, alpha, keep if dropout else None, accumulate=False)
    return out


def lora_expand_add_(
    out: torch.Tensor,
    h: torch.Tensor,
    lora_B: torch.Tensor,
    alpha: float = 1.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out += alpha · mask ⊙ (h · lora_Bᵀ)` in place; returns out.

    out: (M, N) fp16/bf16/fp32, any strides; h: (M, r) any float dtype, cast to lora_B's dtype
    for the product; lora_B: (N, r). With `keep` (the (M, ceil(N/8)) uint8 keep bytes of a
    dropout mask over out's M × N, dropout.py) the added term is gated by that mask."""
    if out.dim() != 2 or h.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(
            f"out, h and lora_B must be 2-D, got {tuple(out.shape)}, {tuple(h.shape)}, {tuple(lora_B.shape)}"
        )
    M, N = out.shape
    R = h.shape[1]
    if h.shape[0] != M or lora_B.shape != (N, R):
        raise ValueError(f"h must be ({M}, r) and lora_B ({N}, r), got {tuple(h.shape)} and {tuple(lora_B.shape)}")
    for name, t in (("h", h), ("lora_B", lora_B)):
        if t.device != out.device:
            raise ValueError(f"{name} must be on {out.device}, got {t.device}")
    if keep is not None:
        check_keep_bytes(keep, M, N, out.device)
    x = out[:, :0]  # no base product: K = 0
    _launch(x, out.new_empty((N, 0)), None, h, lora_B, out, alpha, keep, accumulate=True)
    return out


def _launch(x, weight, bias, h, lora_B, out, alpha, keep, accumulate: bool) -> None:
    M, K = x.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return
    has_lora = h is not None
    R = h.shape[1] if has_lora else 0
    cfg = matmul_config(out.device, out.dtype)
    lora_dtype = lora_B.dtype if has_lora else out.dtype
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    dummy = out
    dropout = keep is not None
    _lora_expand_kernel[grid](
        x, weight, bias if bias is not None else dummy, h if has_lora else dummy,
        lora_B if has_lora else dummy, out, keep if dropout else dummy,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        h.stride(0) if has_lora else 0, h.stride(1) if has_lora else 0,
        lora_B.stride(0) if has_lora else 0, lora_B.stride(1) if has_lora else 0,
        out.stride(0), out.stride(1), keep.stride(0) if dropout else 0,
        float(alpha),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, DROPOUT=dropout, ACCUMULATE=accumulate,
        BASE_DTYPE=tl_dtype(out.dtype), LORA_DTYPE=tl_dtype(lora_dtype),
        BASE_PRECISION=dot_precision(out.dtype), LORA_PRECISION=dot_precision(lora_dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=rank_block(R, cap=cfg.block_k), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
