"""Block sizes for the LoRA/IA³ kernels: a small table per GPU family.

Every launcher asks `matmul_config` / `skinny_config` for its blocks. The choice depends
only on the device and the problem's dimensions, never on timing, so the forward's choice
is reproducible in backward and across runs.

Provenance: the sm_90 / sm_80 rows start from Triton's matmul tutorial configs for
bf16/fp16 on Hopper/Ampere; they are NOT yet tuned on this project's GPUs (no measurement
in bench/results/ backs them). The interpreter row uses small blocks so that tests on tiny
odd shapes run through every masked edge quickly on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and launch options of one matmul-shaped kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# (family, is_fp32) -> config of the big fused matmuls (base product + expand / IA³ scaling).
_MATMUL: dict[tuple[str, bool], MatmulConfig] = {
    # 128 × 128, not the tutorial's 128 × 256: the dropout variant holds two fp32 accumulators.
    ("sm90", False): MatmulConfig(128, 128, 64, 8, num_warps=8, num_stages=4),
    # fp32 products run on FMA (no fp32 tensor-core path at "ieee" precision): 128 × 64, since
    # 128 × 128 spilled in the IA³ backward (static audit).
    ("sm90", True): MatmulConfig(128, 64, 32, 8, num_warps=8, num_stages=3),
    # 8 warps, not 4: with 4 the 128 × 128 fp32 accumulator alone takes 128 registers a thread,
    # and the dropout-masked dx variant spilled (static audit, kernels/audit.py).
    ("sm80", False): MatmulConfig(128, 128, 32, 8, num_warps=8, num_stages=4),
    ("sm80", True): MatmulConfig(64, 128, 32, 8, num_warps=4, num_stages=3),
    ("default", False): MatmulConfig(64, 64, 32, 8, num_warps=4, num_stages=2),
    ("default", True): MatmulConfig(64, 64, 32, 8, num_warps=4, num_stages=2),
    ("interpreter", False): MatmulConfig(32, 32, 32, 2, num_warps=1, num_stages=1),
    ("interpreter", True): MatmulConfig(32, 32, 32, 2, num_warps=1, num_stages=1),
}


def gpu_family(device: torch.device) -> str:
    """ "sm90", "sm80", "default" for a CUDA device; "interpreter" for a CPU tensor."""
    if device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if major >= 8:
        return "sm80"
    return "default"


def on_gpu(device: torch.device) -> bool:
    """Whether launches on `device` use a GPU family's blocks (False: the interpreter's).
    Launchers ask this, never `device.type`, so the static audit can compile GPU variants."""
    return gpu_family(device) != "interpreter"


def rank_cap(device: torch.device) -> int:
    """The largest rank block a launcher uses on `device`: 64 on GPUs, 16 under the interpreter."""
    return 64 if on_gpu(device) else 16


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for a CPU tensor (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def matmul_config(device: torch.device, dtype: torch.dtype) -> MatmulConfig:
    """Blocks for the fused base-product kernels on `device` with operands of `dtype`."""
    return _MATMUL[(gpu_family(device), dtype == torch.float32)]


def rank_block(r: int, cap: int = 64) -> int:
    """Block size along the LoRA rank: a power of two, at least 16 (tl.dot's minimum),
    at most `cap`; ranks above `cap` loop or take several programs."""
    b = 16
    while b < r and b < cap:
        b *= 2
    return b


def skinny_config(device: torch.device, r: int, dtype: torch.dtype = torch.bfloat16) -> MatmulConfig:
    """Blocks for the rank-sized products (shrink, adapter gradients): block_n is along r.
    fp32 operands take half the K block: twice the bytes per element would otherwise put the
    adapter gradient's pipelined tiles over sm_90's shared memory and make it spill."""
    fam = gpu_family(device)
    br = rank_block(r, cap=16 if fam == "interpreter" else 64)
    if fam == "interpreter":
        return MatmulConfig(32, br, 32, 1, num_warps=1, num_stages=1)
    wide = dtype != torch.float32
    if fam == "sm90":
        return MatmulConfig(64, br, 128 if wide else 32, 1, num_warps=4, num_stages=4 if wide else 3)
    return MatmulConfig(64, br, 64 if wide else 32, 1, num_warps=4, num_stages=3)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: fp32 follows torch's TF32 switch
    (off by default, so fp32 products are exact IEEE like torch's); other dtypes ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def tl_dtype(dtype: torch.dtype):  # -> triton.language.dtype
    """The triton.language dtype for a torch floating dtype; TypeError for others."""
    import triton.language as tl

    try:
        return getattr(tl, TL_DTYPES[dtype])
    except KeyError:
        raise TypeError(f"dtype must be one of {list(TL_DTYPES)}, got {dtype}") from None


def sgmv_config(
    device: torch.device, max_seg_tokens: int, max_rank: int, dtype: torch.dtype = torch.bfloat16
) -> MatmulConfig:
    """Blocks for the segment kernels (sgmv_shrink / sgmv_expand / sgmv_adapter_grad):
    block_m along a segment's tokens (smaller for short segments, so that tiles are not
    mostly masked), block_n along the rank (shrink) or the output columns (expand).
    Untuned starting points (no GPU measurement backs them yet)."""
    fam = gpu_family(device)
    if fam == "interpreter":
        return MatmulConfig(16, 32, 32, 1, num_warps=1, num_stages=1)
    block_m = 16 if max_seg_tokens <= 16 else 32 if max_seg_tokens <= 64 else 64
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: half the columns and K block (no spills)
        return MatmulConfig(block_m, 64, 32, 1, num_warps=4, num_stages=3)
    return MatmulConfig(block_m, 128, 64, 1, num_warps=4, num_stages=3 if fam == "sm80" else 4)


def bgmv_config(device: torch.device) -> MatmulConfig:
    """Blocks for the one-token-per-program kernels (bgmv_shrink / bgmv_expand): block_k
    along the input (shrink), block_n along the output (expand). Untuned starting points."""
    if gpu_family(device) == "interpreter":
        return MatmulConfig(1, 32, 32, 1, num_warps=1, num_stages=1)
    return MatmulConfig(1, 256, 256, 1, num_warps=4, num_stages=2)


SMALL_M = 16  # at most this many rows: the 4-bit matmul's split-K decode variant
# (family, fp32) -> blocks of the 4-bit matmul: the W tile is decoded in registers (byte, nibble,
# table and absmax gathers), so its tiles are smaller than the plain matmul's (_MATMUL). Chosen
# with the static audit (kernels/audit.py): no spills, shared memory in bounds, HGMMA on sm_90a.
_QLORA: dict[tuple[str, bool], MatmulConfig] = {
    ("gpu", False): MatmulConfig(128, 128, 32, 8, num_warps=8, num_stages=3),
    ("gpu", True): MatmulConfig(64, 64, 32, 8, num_warps=8, num_stages=2),  # fp32 runs on FMA
    ("gpu-small-m", False): MatmulConfig(16, 64, 64, 1, num_warps=4, num_stages=3),
    ("gpu-small-m", True): MatmulConfig(16, 32, 32, 1, num_warps=4, num_stages=2),
    ("interpreter", False): MatmulConfig(32, 32, 32, 2, num_warps=1, num_stages=1),
    ("interpreter-small-m", False): MatmulConfig(16, 32, 32, 1, num_warps=1, num_stages=1),
}
SPLIT_K = {"gpu": 8, "interpreter": 2}  # programs per output tile along K when M <= SMALL_M


def qlora_config(device: torch.device, dtype: torch.dtype, m: int) -> tuple[MatmulConfig, int]:
    """(blocks, split-K factor) of the 4-bit matmul (kernels/qlora_matmul.py) for an M-row
    product in `dtype` on `device`: split-K (> 1) for M <= SMALL_M, the decode case."""
    where = "gpu" if on_gpu(device) else "interpreter"
    small = m <= SMALL_M
    fp32 = dtype == torch.float32 and where == "gpu"
    return _QLORA[(where + ("-small-m" if small else ""), fp32)], SPLIT_K[where] if small else 1
