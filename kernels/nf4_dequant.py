"""nf4_dequant: bitsandbytes' 4-bit weights (NF4 / FP4, optionally double-quantized absmax)
back to floats, bit-identical to `bitsandbytes.functional.dequantize_4bit`.

Layout (peft_fast/quant/formats.py): element i of the row-major weight sits in byte i // 2,
the high nibble for even i; its block is i // blocksize. The block's scale is `absmax[j]`
(fp32), or, double-quantized, `code2[absmax_u8[j]] · absmax2[j // 256] + offset`. The value
is `table[q] · scale` in fp32, rounded once to the output dtype (bf16: round-to-nearest-even
on the bits, since Triton's interpreter truncates when it converts to bf16). The kernel is
compiled without FP fusion, so the nested scale `code2 · absmax2 + offset` is rounded after
the product as bitsandbytes rounds it (not yet run on a GPU: no device this session).

One program writes BLOCK consecutive elements; every load is masked at the ragged end, so
any element count (odd, partial last block) works. The 16-entry table and the 256-entry map
are indexed by offsets (the interpreter cannot chase loaded pointers, and needs none here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import tl_dtype

BLOCK = 1024


@triton.jit
def dequant_4bit_elements(
    packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask, blocksize,
    NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr,
):  # fmt: skip
    """The fp32 values of the weight's elements at flat (row-major) indices `idx` (any shape),
    0 where `mask` is False: `table[q] · scale` with the block's scale expanded from the nested
    absmax where NESTED (launch with enable_fp_fusion=False to round as bitsandbytes does)."""
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    shift = (1 - (idx % 2)) * 4
    q = (byte >> shift.to(tl.int32)) & 0xF
    value = tl.load(table_ptr + q, mask=mask, other=0.0)
    blk = idx // blocksize
    if NESTED:
        a8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + a8, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    n, blocksize,
    NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, OUT_DTYPE: tl.constexpr, BF16_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = dequant_4bit_elements(
        packed_ptr, table_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs, mask, blocksize, NESTED, BLOCKSIZE2
    )
    if BF16_BITS:
        # fp32 -> bf16 rounded to nearest even, done on the bits (stored as int16): the same
        # rounding as torch's `.to(torch.bfloat16)` on every target, interpreter included.
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out_ptr + offs, (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, w.to(OUT_DTYPE), mask=mask)


def dequantize_4bit(
    packed: torch.Tensor,
    table: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """The (out, in) weight in `dtype` from flat uint8 `packed` codes, the 16 fp32 `table`
    values and the blocks' `absmax` (fp32, or uint8 with `absmax2`, `code2`, `offset`)."""
    nested = absmax2 is not None
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed must be a flat uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if nested and (code2 is None or offset is None):
        raise ValueError("a double-quantized absmax needs absmax2, code2 and offset")
    n = shape[0] * shape[1]
    bf16_bits = dtype == torch.bfloat16
    out = torch.empty(shape, dtype=torch.int16 if bf16_bits else dtype, device=packed.device)
    dummy = absmax
    _nf4_dequant_kernel[(triton.cdiv(n, BLOCK),)](
        packed, table.contiguous(), absmax.contiguous(),
        absmax2.contiguous() if nested else dummy, code2.contiguous() if nested else dummy,
        offset.reshape(1) if nested else dummy, out,
        n, blocksize,
        NESTED=nested, BLOCKSIZE2=blocksize2, OUT_DTYPE=tl_dtype(dtype), BF16_BITS=bf16_bits, BLOCK=BLOCK,
        enable_fp_fusion=False,  # no FMA: bitsandbytes rounds code2 · absmax2 before adding the offset
    )  # fmt: skip
    return out.view(torch.bfloat16) if bf16_bits else out
