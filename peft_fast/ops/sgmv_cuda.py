"""CUDA C++ backend of `lora_linear_mixed` (a batch mixing adapters), registered with dispatch
as the "cuda" implementation.

Rows are grouped by adapter on the host side of the launch: a stable argsort of the
per-row adapter ids gives `rows` (x's row indices, adapter by adapter, rows without an
adapter left out) and one segment per adapter; the adapters' weights are stacked (A along
ranks, B along its rank columns, each adapter at its rank offset) and cuda_ops' segmented
LoRA ops run every adapter in one launch per kernel. Building the segments reads the
per-adapter row counts back to the host (one synchronisation, as the reference's
`nonzero` does).

`segments_of(row_adapter, ranks)` is the one place that turns the public op's
`row_adapter` into the kernels' launcher arguments; an SGMV op with another front end
(pre-sorted segments, say) only needs to produce the same lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import dispatch
from .checks import check_lora_args, mixed_adapter_reason
from .cuda_ops import adapter_dtype_reason, cuda_reason, new_seed


@dataclass(frozen=True)
class Segments:
    """Launcher arguments of the segmented kernels for one mixed batch."""

    rows: Tensor  # int32 row indices of x, grouped by adapter
    seg_starts: list[int]  # len(adapters) + 1 positions into rows
    rank_offsets: list[int]  # each adapter's first row in the stacked A
    ranks: list[int]


def segments_of(row_adapter: Tensor, ranks: Sequence[int], n_rows: int) -> Segments:
    """Group the rows of a 2-D x (n_rows of them) by `row_adapter` (one id per row, -1 for none).
    ValueError naming row_adapter when an id is outside [-1, len(ranks))."""
    n = len(ranks)
    if row_adapter.shape != (n_rows,):
        raise ValueError(f"row_adapter must have one entry per row ({n_rows},), got {tuple(row_adapter.shape)}")
    ids = row_adapter.to(torch.int64)
    if n_rows:
        lo, hi = (int(v) for v in ids.aminmax())
        if lo < -1 or hi >= n:
            raise ValueError(f"row_adapter entries must be in [-1, {n}), got min {lo}, max {hi}")
    counts = torch.bincount(ids + 1, minlength=n + 1).tolist()
    order = torch.argsort(ids, stable=True)[counts[0] :].to(torch.int32)
    starts = [0]
    for c in counts[1:]:
        starts.append(starts[-1] + c)
    offsets = [0]
    for r in ranks[:-1]:
        offsets.append(offsets[-1] + r)
    return Segments(order.contiguous(), starts, offsets, list(ranks))


def _per_row(row_adapter: Tensor, x: Tensor) -> Tensor:
    """row_adapter indexes dim 0 of x; for x of more than 2 dims every token of a batch row
    gets that row's adapter."""
    if row_adapter.dim() != 1 or row_adapter.shape[0] != x.shape[0]:
        raise ValueError(
            f"row_adapter must be 1-D with x.shape[0] = {x.shape[0]} entries, got {tuple(row_adapter.shape)}"
        )
    tokens = x.numel() // max(1, x.shape[0] * x.shape[-1]) if x.dim() > 2 else 1
    return row_adapter.repeat_interleave(tokens) if tokens != 1 else row_adapter


def lora_linear_mixed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: Tensor,
    training: bool = True,
    *,
    plan: object = None,
    stack: object = None,
) -> Tensor:
    """Same contract as `peft_fast.ops.lora_linear_mixed`, on the CUDA SGMV kernels; gradients
    reach x and every adapter's A and B (zero for adapters without rows).

    The `plan` and `stack` hints of the Triton backend are not used yet: this path builds its
    segments from `row_adapter` on each call (one device-to-host read of the row counts) and
    stacks the weights each call."""
    n = len(lora_As)
    if n == 0 or not (len(lora_Bs) == len(scalings) == len(dropout_ps) == n):
        raise ValueError(
            f"lora_As, lora_Bs, scalings and dropout_ps must have one entry per adapter (>= 1), got "
            f"{len(lora_As)}, {len(lora_Bs)}, {len(scalings)}, {len(dropout_ps)}"
        )
    ranks = [
        check_lora_args(x, weight, bias, A, B, s, p, names=(f"lora_As[{k}]", f"lora_Bs[{k}]"))
        for k, (A, B, s, p) in enumerate(zip(lora_As, lora_Bs, scalings, dropout_ps))
    ]
    if len({A.dtype for A in lora_As}) != 1:
        raise TypeError(f"lora_As must share one dtype, got {sorted({str(A.dtype) for A in lora_As})}")
    in_f, out_f = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, in_f)
    segs = segments_of(_per_row(row_adapter, x), ranks, x2.shape[0])
    ps = [float(p) if training else 0.0 for p in dropout_ps]
    seed = new_seed(x.device) if any(p > 0.0 for p in ps) else None
    A = torch.cat(list(lora_As), 0)
    B = torch.cat(list(lora_Bs), 1)
    y, _ = torch.ops.peft_fast.cuda_lora_fwd(
        x2, weight, bias, A, B, segs.rows, segs.seg_starts, segs.rank_offsets, segs.ranks,
        [float(s) for s in scalings], ps, seed, max(ranks),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_f)


def supports(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: Tensor,
    training: bool = True,
    *,
    plan: object = None,
    stack: object = None,
) -> str | None:
    """None when the CUDA SGMV kernels can take this call, else the reason (dispatch falls back)."""
    named, adapters_why = mixed_adapter_reason(x, weight, bias, lora_As, lora_Bs)
    why = cuda_reason(named, x, weight) or adapters_why
    if why is not None:
        return why
    if not isinstance(row_adapter, Tensor) or row_adapter.dtype.is_floating_point or row_adapter.device != x.device:
        return f"row_adapter must be an integer tensor on {x.device}"
    return adapter_dtype_reason(x, lora_As[0], "lora_As")


dispatch.register("lora_linear_mixed", "cuda", lora_linear_mixed, supports)
