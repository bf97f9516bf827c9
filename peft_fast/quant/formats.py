"""bitsandbytes' 4-bit weight format (NF4 / FP4), readable and writable without bitsandbytes.

The contract is `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` (0.50):

* the weight (out, in) is flattened row-major and cut into blocks of `blocksize` values (the
  last block may be partial); each block keeps an fp32 absmax and one 4-bit code per value,
  an index into the NF4 or FP4 table;
* two codes share a byte, the first value in the high nibble; an odd count pads a zero nibble;
* with double quantization (bitsandbytes' `compress_statistics`) the absmax vector is stored
  as uint8: `offset = absmax.mean()`, then `absmax - offset` is quantized blockwise (blocks of
  256, the signed dynamic map) into `absmax` (uint8) with its own fp32 `absmax2`;
* dequantization: `absmax_j = code2[absmax_u8[j]] · absmax2[j // 256] + offset`, then
  `w = table[q] · absmax_j` in fp32, cast once to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# bitsandbytes.functional.get_4bit_type: NF4 (QLoRA's normal-float quantiles) and FP4 (1 sign,
# 2 exponent, 1 mantissa bit, listed in bit-pattern order), each divided by its largest magnitude.
_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


@cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return data / data.abs().max()


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 values a 4-bit code stands for (bitsandbytes' `get_4bit_type`)."""
    check_quant_type(quant_type)
    return _code_cpu(quant_type).to(device)


@cache
def _pair_table_cpu(quant_type: str) -> torch.Tensor:
    code = _code_cpu(quant_type)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256, 2): the two values one packed byte stands for, high nibble first."""
    check_quant_type(quant_type)
    return _pair_table_cpu(quant_type).to(device)


@cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry signed dynamic map double quantization stores the absmax vector with."""
    return _dynamic_map_cpu().to(device)


def check_quant_type(quant_type: object, where: str = "quant_type") -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{where} must be one of {QUANT_TYPES}, got {quant_type!r}")


@dataclass
class QuantState4bit:
    """One 4-bit weight: the packed codes and what it takes to turn them back into floats.

    `packed` holds ceil(out·in / 2) bytes (any storage dtype, read as uint8). Without double
    quantization `absmax` is fp32, one per block; with it, `absmax` is uint8 and `absmax2`,
    `code2`, `offset` describe how to expand it. `dtype` is the dtype the weight had when it
    was quantized (bitsandbytes dequantizes to it by default)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def packed_bytes(self) -> torch.Tensor:
        """The packed codes as a flat uint8 tensor (a view where the storage dtype differs)."""
        p = self.packed if self.packed.is_contiguous() else self.packed.contiguous()
        return p.view(torch.uint8).reshape(-1)

    def check(self, where: str = "weight") -> None:
        """Raise ValueError naming `where` and the field when the state is missing or inconsistent."""
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"{where}: quant state shape must be (out_features, in_features), got {self.shape}")
        check_quant_type(self.quant_type, f"{where}: quant state quant_type")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"{where}: quant state blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: quant state dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        nbytes = self.packed.numel() * self.packed.element_size()
        if nbytes != (self.numel + 1) // 2:
            raise ValueError(
                f"{where}: packed weight has {nbytes} bytes; a {tuple(self.shape)} 4-bit weight needs "
                f"{(self.numel + 1) // 2}"
            )
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"{where}: quant state absmax has {self.absmax.numel()} entries; expected {self.n_blocks} "
                f"(one per block of {self.blocksize})"
            )
        if not self.nested:
            if self.absmax.dtype != torch.float32:
                raise ValueError(f"{where}: quant state absmax must be float32, got {self.absmax.dtype}")
            return
        if self.absmax.dtype != torch.uint8:
            raise ValueError(f"{where}: double-quantized absmax must be uint8, got {self.absmax.dtype}")
        if self.blocksize2 != NESTED_BLOCKSIZE:
            raise ValueError(f"{where}: quant state state2.blocksize must be {NESTED_BLOCKSIZE}, got {self.blocksize2}")
        if self.code2 is None or self.code2.numel() != 256 or self.code2.dtype != torch.float32:
            raise ValueError(f"{where}: quant state state2.code must be 256 float32 values")
        if self.offset is None or self.offset.numel() != 1:
            raise ValueError(f"{where}: quant state offset must be one value when absmax is double-quantized")
        assert self.absmax2 is not None
        if self.absmax2.numel() != -(-self.n_blocks // self.blocksize2) or self.absmax2.dtype != torch.float32:
            raise ValueError(
                f"{where}: quant state state2.absmax must hold {-(-self.n_blocks // self.blocksize2)} float32 values, "
                f"got {self.absmax2.numel()} {self.absmax2.dtype}"
            )


def dequantize_absmax(state: QuantState4bit) -> torch.Tensor:
    """The fp32 absmax of every block (expanding double quantization where used)."""
    if not state.nested:
        return state.absmax
    assert state.absmax2 is not None and state.code2 is not None and state.offset is not None
    n = state.absmax.numel()
    absmax2 = state.absmax2.repeat_interleave(state.blocksize2)[:n]
    return state.code2[state.absmax.long()] * absmax2 + state.offset


def dequantize_4bit(state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) weight in `dtype` (default: the dtype it was quantized from), bit-identical
    to `bitsandbytes.functional.dequantize_4bit`."""
    packed = state.packed_bytes()
    n, bs = state.numel, state.blocksize
    values = torch.index_select(_pair_table(state.quant_type, packed.device), 0, packed.int()).view(-1)[:n]
    absmax = dequantize_absmax(state)
    full = n - n % bs
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    out[:full] = (values[:full].view(-1, bs) * absmax[: full // bs, None]).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[-1]
    return out.view(state.shape).to(state.dtype if dtype is None else dtype)


def _quantize_blockwise_dynamic(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the dynamic map, as bitsandbytes' CPU `quantize_blockwise`
    does it: per block, the map entry nearest to `v / absmax` (ties to the lower entry), reading
    the map's first entry as -1. bitsandbytes finds the entry with an approximate search
    (BinSearch's Direct2) that now and then returns a neighbour that is not the nearest; this
    one always returns the nearest, so a few uint8 absmax values can differ by one step."""
    code = dynamic_map(values.device).clone()
    code[0] = -1.0
    n = values.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(values.float(), (0, blocks * blocksize - n))
    absmax = padded.view(blocks, blocksize).abs().max(dim=1).values
    normed = (padded.view(blocks, blocksize) / absmax[:, None]).reshape(-1)[:n]
    idx = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 254)
    right_closer = (normed - code[idx + 1]).abs() < (normed - code[idx]).abs()
    return (idx + right_closer.long()).to(torch.uint8), absmax


def quantize_4bit(
    weight: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> QuantState4bit:
    """Quantize a 2-D float weight (out, in) to 4 bits, writing the same bytes and statistics
    as `bitsandbytes.functional.quantize_4bit` (its CPU path) for the same arguments."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a 2-D float16/bfloat16/float32 tensor, got {getattr(weight, 'shape', weight)}")
    check_quant_type(quant_type)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    code = code_4bit(quant_type, weight.device)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().max(dim=-1).values
    scaled = torch.clamp(flat[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if n % blocksize:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
    packed = ((q8[0::2] << 4) | q8[1::2]).unsqueeze(1)
    if packed.numel() % torch.empty(0, dtype=quant_storage).element_size():
        raise ValueError(
            f"quant_storage {quant_storage} cannot hold {packed.numel()} packed bytes (not a multiple of its size)"
        )
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    state = QuantState4bit(packed, absmax, tuple(weight.shape), weight.dtype, blocksize, quant_type)
    if compress_statistics:
        offset = absmax.mean()
        state.absmax, state.absmax2 = _quantize_blockwise_dynamic(absmax - offset, NESTED_BLOCKSIZE)
        state.offset = offset
        state.code2 = dynamic_map(weight.device)
    return state
