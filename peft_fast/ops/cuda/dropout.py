"""The CUDA backend's dropout launch plan: how many Philox evaluations a training step makes.

csrc/keep_bytes.cu draws the step's keep bytes once (one Philox evaluation per byte of a
segment with p > 0; threads past a segment's rows or past ceil(K/8) bytes return before
drawing; p = 0 segments write 0xff without drawing), and the shrink, dx and dA kernels read
them. This module needs no GPU and no built library, so tests check the plan on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

# Elements of x one Philox evaluation (one keep byte) serves.
PER_DRAW = 8


def keep_bytes_evaluations(seg_starts: Sequence[int], dropout_ps: Sequence[float], K: int) -> int:
    """Philox evaluations of one keep_bytes_cuda launch over the segments (positions
    seg_starts[s] .. seg_starts[s+1], probability dropout_ps[s]) of an input with K columns:
    ceil(K/8) per row of each segment with p > 0. The shrink, dx and dA kernels add none."""
    if len(seg_starts) != len(dropout_ps) + 1:
        raise ValueError(f"seg_starts must have len(dropout_ps) + 1 = {len(dropout_ps) + 1} entries, got {seg_starts}")
    if K < 0:
        raise ValueError(f"K must be >= 0, got {K}")
    groups = -(-K // PER_DRAW)
    return sum((end - start) * groups for start, end, p in zip(seg_starts, seg_starts[1:], dropout_ps) if p > 0.0)


def report_keep_draws(seg_starts: Sequence[int], dropout_ps: Sequence[float], K: int) -> None:
    """Report a keep_bytes_cuda launch's evaluations to kernels/dropout.py's debug hook
    (`count_philox`), as "keep_bytes_cuda"."""
    try:
        from peft_fast.kernels.dropout import record_draws
    except ImportError:  # no Triton: the hook's collector (count_philox) cannot be open either
        return
    record_draws("keep_bytes_cuda", keep_bytes_evaluations(seg_starts, dropout_ps, K))
