"""qlora_matmul: a matmul against a 4-bit (NF4 / FP4, bitsandbytes' layout) weight that is
dequantized tile by tile inside the K loop, with the LoRA expand fused in as lora_expand does:

    out = a · W'  +  alpha · (h · Bᵀ)  +  bias

W is the (N, K) weight stored as 4-bit codes (peft_fast/quant/formats.py); the full
dequantized W is never written anywhere. W' is Wᵀ (forward: a = x (M, K), out (M, N)) or W
itself (`transpose=False`, backward's dx: a = dy (M, N), out (M, K)). Each W tile is
decoded in registers from its packed bytes, its blocks' absmax (or the double-quantized
absmax: code2[u8] · absmax2 + offset) and the 16-entry table, in fp32, then rounded as
bitsandbytes rounds it: to `mid_dtype` first (bitsandbytes' backward dequantizes to the
weight's original dtype, then casts to the gradient's), then to a's dtype for the product.

The LoRA term (h: M × r fp32 from lora_shrink, B: P × r any strides) goes into the fp32
accumulator first, scaled by alpha, and the base product accumulates on top; the bias is
added last. With dropout (backward's dx = dy W + mask ⊙ dh A / (1 - p)), the LoRA term is gated
by the forward's keep bytes (kernels/dropout.py: no Philox here) before the base product
accumulates on top. Programs are grouped GROUP_M tile-rows at a time for L2 reuse; every ragged edge
is masked (any M, N, K; blocks of the 4-bit layout may straddle rows).

Small M (decode, M <= configs.SMALL_M): a split-K variant (SPLIT_K programs per output tile, each
over its slice of the reduction, adding its fp32 partial into an fp32 buffer with atomics)
so a handful of tokens still spreads the packed weight's read over every SM; the first
slice adds the LoRA term and the bias.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .configs import dot_precision, on_gpu, qlora_config, rank_block, tl_dtype
from .dropout import check_keep_bytes, load_keep
from .nf4_dequant import dequant_4bit_elements
from .tiles import grouped_tile, load_tile, store_tile


@triton.jit
def _qlora_matmul_kernel(
    a_ptr, packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    bias_ptr, h_ptr, b_ptr, out_ptr, keep_ptr,
    M, P, Q, R, W_COLS,
    stride_am, stride_aq, stride_hm, stride_hr, stride_bp, stride_br, stride_om, stride_op, stride_keep,
    alpha,
    TRANSPOSE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, SPLIT_K: tl.constexpr,
    MID_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    A_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # out is M × P, the reduction runs over Q; the weight's element (n, k) sits at flat index
    # n · W_COLS + k. TRANSPOSE (forward): P = N, Q = K, tile[q, p] = W[p, q]; else P = K, Q = N.
    pid_m, pid_p = grouped_tile(tl.program_id(0), M, P, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        if pid_k == 0:
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                h = load_tile(h_ptr, offs_m, offs_r, stride_hm, stride_hr, M, R)
                b = load_tile(b_ptr, offs_r, offs_p, stride_br, stride_bp, R, P)
                acc = tl.dot(h.to(LORA_DTYPE), b.to(LORA_DTYPE), acc, input_precision=LORA_PRECISION)
            acc = acc * alpha
            if DROPOUT:  # backward's dx: the adapter term gated by the forward's mask
                acc = tl.where(load_keep(keep_ptr, stride_keep, offs_m, offs_p, M, P), acc, 0.0)

    q_per_split = tl.cdiv(tl.cdiv(Q, SPLIT_K), BLOCK_K) * BLOCK_K
    q_start = pid_k * q_per_split
    q_end = tl.minimum(q_start + q_per_split, Q)
    for q0 in range(q_start, q_end, BLOCK_K):
        offs_q = q0 + tl.arange(0, BLOCK_K)
        a = load_tile(a_ptr, offs_m, offs_q, stride_am, stride_aq, M, q_end)
        mask = (offs_q[:, None] < q_end) & (offs_p[None, :] < P)
        if TRANSPOSE:
            idx = offs_p[None, :] * W_COLS + offs_q[:, None]
        else:
            idx = offs_q[:, None] * W_COLS + offs_p[None, :]
        w = dequant_4bit_elements(
            packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask, BLOCKSIZE,
            NESTED, BLOCKSIZE2,
        )  # fmt: skip
        w = w.to(MID_DTYPE).to(A_DTYPE)
        acc = tl.dot(a.to(A_DTYPE), w, acc, input_precision=A_PRECISION)

    if HAS_BIAS:
        if pid_k == 0:
            bias = tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    if SPLIT_K == 1:
        store_tile(out_ptr, acc, offs_m, offs_p, stride_om, stride_op, M, P)
    else:
        mask_out = (offs_m[:, None] < M) & (offs_p[None, :] < P)
        tl.atomic_add(out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op, acc, mask=mask_out)


def qlora_matmul(
    a: torch.Tensor,
    packed: torch.Tensor,
    table: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    *,
    transpose: bool = True,
    mid_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    alpha: float = 1.0,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """`a · Wᵀ + alpha · h · lora_Bᵀ + bias` (transpose=True, a: (M, K), out (M, N)) or
    `a · W + alpha · h · lora_Bᵀ` (transpose=False, a: (M, N), out (M, K)), in a's dtype, for
    the (N, K) = `shape` weight given as flat uint8 `packed` codes, the 16 fp32 `table` values
    and the blocks' `absmax` (fp32, or uint8 with `absmax2`, `code2`, `offset`).

    W's values are rounded to `mid_dtype` (default a's dtype) and then to a's dtype before the
    product. h: (M, r) any float dtype, cast to lora_B's dtype; lora_B: (P, r), any strides.
    With `keep` (the (M, ceil(P/8)) uint8 keep bytes of a dropout mask over the M × P output,
    kernels/dropout.py: backward's dx, P = K) only the LoRA term is gated by the mask.
    """
    if a.dim() != 2 or a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"a must be a 2-D float16/bfloat16/float32 tensor, got {a.dtype} {tuple(a.shape)}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed must be a flat uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    N, K = shape
    Q, P = (K, N) if transpose else (N, K)
    M = a.shape[0]
    if a.shape[1] != Q:
        raise ValueError(
            f"a must have {Q} columns for a {tuple(shape)} weight (transpose={transpose}), got {a.shape[1]}"
        )
    if packed.numel() != (N * K + 1) // 2:
        raise ValueError(f"packed must hold {(N * K + 1) // 2} bytes for a {tuple(shape)} weight, got {packed.numel()}")
    nested = absmax2 is not None
    if nested and (code2 is None or offset is None):
        raise ValueError("a double-quantized absmax needs absmax2, code2 and offset")
    if bias is not None and bias.shape != (P,):
        raise ValueError(f"bias must be ({P},), got {tuple(bias.shape)}")
    if (h is None) != (lora_B is None):
        raise ValueError("h and lora_B must both be given or both be None")
    has_lora = h is not None
    R = h.shape[1] if has_lora else 0
    if has_lora and (h.dim() != 2 or h.shape[0] != M or lora_B.shape != (P, R)):
        raise ValueError(f"h must be ({M}, r) and lora_B ({P}, r), got {tuple(h.shape)} and {tuple(lora_B.shape)}")
    dropout = keep is not None
    if dropout:
        if not has_lora:
            raise ValueError("keep (the dropout mask's keep bytes) gates the LoRA term: give h and lora_B with it")
        check_keep_bytes(keep, M, P, a.device)
    for name, t in (("packed", packed), ("absmax", absmax), ("bias", bias), ("h", h), ("lora_B", lora_B)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} must be on {a.device}, got {t.device}")
    cfg, split_k = qlora_config(a.device, a.dtype, M)
    if dropout and split_k == 1 and a.dtype == torch.float32 and on_gpu(a.device):
        # The fp32 (FMA) tile with the keep mask spills 24 bytes on sm_90a at BLOCK_K = 32 (static
        # audit, kernels/audit.py); half the K step keeps it at 128 registers, no spill.
        cfg = dataclasses.replace(cfg, block_k=16)
    out_dtype = torch.float32 if split_k > 1 else a.dtype
    alloc = torch.zeros if split_k > 1 else torch.empty
    out = alloc((M, P), dtype=out_dtype, device=a.device)
    if M == 0 or P == 0:
        return out.to(a.dtype)
    lora_dtype = lora_B.dtype if has_lora else a.dtype
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(P, cfg.block_n), split_k)
    dummy = out
    _qlora_matmul_kernel[grid](
        a, packed, table.contiguous(), absmax.contiguous(),
        absmax2.contiguous() if nested else dummy, code2.contiguous() if nested else dummy,
        offset.reshape(1) if nested else dummy,
        bias if bias is not None else dummy, h if has_lora else dummy, lora_B if has_lora else dummy, out,
        keep if dropout else dummy,
        M, P, Q, R, K,
        a.stride(0), a.stride(1),
        h.stride(0) if has_lora else 0, h.stride(1) if has_lora else 0,
        lora_B.stride(0) if has_lora else 0, lora_B.stride(1) if has_lora else 0,
        out.stride(0), out.stride(1), keep.stride(0) if dropout else 0,
        float(alpha),
        TRANSPOSE=transpose, NESTED=nested, BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, DROPOUT=dropout, SPLIT_K=split_k,
        MID_DTYPE=tl_dtype(a.dtype if mid_dtype is None else mid_dtype), A_DTYPE=tl_dtype(a.dtype),
        LORA_DTYPE=tl_dtype(lora_dtype), A_PRECISION=dot_precision(a.dtype), LORA_PRECISION=dot_precision(lora_dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=rank_block(R, cap=cfg.block_k), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False,  # no FMA: bitsandbytes rounds code2 · absmax2 before adding the offset
    )  # fmt: skip
    return out.to(a.dtype) if split_k > 1 else out
