"""What the LoHa kernels share: the layout of the r²-wide Khatri-Rao index in tiles.

Column q = i·r + j of an r²-wide factor (i indexes the first factor's rank, j the second's). In a
kernel the rank is padded to RP (a power of two, at least 4) and a chunk of the columns holds
BLOCK_I values of i with all RP values of j: BLOCK_I · RP lanes, at least 16 (tl.dot's minimum),
lanes with i or j >= r masked off."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import on_gpu


def rank_layout(r: int, device: torch.device, gpu_lanes: int = 64) -> tuple[int, int]:
    """(RP, BLOCK_I) for rank r on `device`: r padded to a power of two >= 4, and how many values of
    i one chunk holds (chunks of `gpu_lanes` lanes on GPUs, 16 under the interpreter, at least one i)."""
    rp = max(4, triton.next_power_of_2(r))
    lanes = gpu_lanes if on_gpu(device) else 16
    return rp, max(1, min(rp, lanes // rp))


@triton.jit
def kr_chunk(pid_i, R, RP: tl.constexpr, BLOCK_I: tl.constexpr):
    """(i, j, valid, q) of the BLOCK_I · RP lanes of chunk `pid_i`: each lane's ranks, whether both
    are below R, and its column i·R + j in the unpadded r²-wide layout."""
    lanes = tl.arange(0, BLOCK_I * RP)
    i = pid_i * BLOCK_I + lanes // RP
    j = lanes % RP
    valid = (i < R) & (j < R)
    return i, j, valid, i * R + j
