"""What mixed-adapter batches need besides the kernels, backend-neutral (torch only):

* `MixedPlan`: one batch's rows grouped by adapter (sorted order, segments, counts), built
  once per batch on the host (`plan_mixed_batch`) and reused by every layer of that forward
  (`tuners.base.MixedBatch.plan_for` caches it per adapter list);
* `LoraStackCache`: a layer's adapters' weights stacked along the rank in the layout the
  SGMV/BGMV kernels read (A: (R_total, in), B: (out, R_total)), kept between calls and
  rebuilt when an adapter is added, deleted, reloaded or its weights change.

Memory cost of the stack cache (inference): one extra copy of every adapter of the layer,
Σ_a r_a · (in + out) elements of the adapter dtype, plus 5 small per-adapter vectors.
For 64 rank-16 adapters on a 4096 → 4096 layer in bf16 that is 64·16·8192·2 B = 16 MiB per
layer. In training (adapters that require grad, grad enabled) nothing is cached: the
stack is a `torch.cat` inside autograd of the adapters present in the batch only, so each
adapter's own nn.Parameter gets its gradient (absent adapters get none, as in the reference),
and it lives as long as the autograd graph (same size as those adapters' weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MixedPlan", "plan_mixed_batch", "StackedLora", "LoraStackCache", "check_mixed_args"]


@dataclass(frozen=True)
class MixedPlan:
    """One batch's grouping of rows by adapter, on one device.

    Promises: `row_order` lists the rows with an adapter (>= 0), sorted by adapter, stable;
    segment s covers `row_order[seg_start[s]:seg_start[s+1]]`, all of adapter
    `seg_adapter[s] == present[s]`; `present` is ascending; base-only rows (-1) are in no
    segment. Device tensors are int32; the host tuples let launchers size grids without a
    device sync."""

    row_adapter: Tensor  # (batch,) int32: adapter index per row, -1 = base only
    row_order: Tensor  # (n_adapted,) int32
    seg_adapter: Tensor  # (S,) int32
    seg_start: Tensor  # (S + 1,) int32
    present: tuple[int, ...]
    seg_rows: tuple[int, ...]
    batch_size: int

    @property
    def num_segments(self) -> int:
        return len(self.present)

    @property
    def max_seg_rows(self) -> int:
        return max(self.seg_rows, default=0)

    @property
    def num_adapted_rows(self) -> int:
        return sum(self.seg_rows)


def plan_mixed_batch(row_adapter: Tensor, device: torch.device | str | None = None) -> MixedPlan:
    """The `MixedPlan` of `row_adapter` ((batch,) integer adapter index per row, -1 = none),
    with its tensors on `device` (row_adapter's by default). Computed on the host: costs a
    device sync only when row_adapter lives on a GPU (layers pass a plan built from the
    host-side names instead)."""
    if not isinstance(row_adapter, Tensor) or row_adapter.dim() != 1:
        raise ValueError(
            f"row_adapter must be a 1-D tensor (one adapter index per row), got {getattr(row_adapter, 'shape', row_adapter)!r}"  # noqa: E501
        )
    if row_adapter.is_floating_point() or row_adapter.is_complex() or row_adapter.dtype == torch.bool:
        raise TypeError(f"row_adapter must hold integers, got {row_adapter.dtype}")
    device = torch.device(device) if device is not None else row_adapter.device
    ra = row_adapter.detach().to("cpu", torch.int64)
    if ra.numel() and int(ra.min()) < -1:
        raise ValueError(f"row_adapter entries must be >= -1 (-1 = base only), got {int(ra.min())}")
    order = torch.argsort(ra, stable=True)
    adapted = ra[order] >= 0
    row_order = order[adapted]
    present, counts = torch.unique_consecutive(ra[order][adapted], return_counts=True)
    seg_start = torch.zeros(present.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=seg_start[1:])
    packed = torch.cat([ra, row_order, present, seg_start]).to(device=device, dtype=torch.int32)
    b, n, s = ra.numel(), row_order.numel(), present.numel()
    return MixedPlan(
        row_adapter=packed[:b],
        row_order=packed[b : b + n],
        seg_adapter=packed[b + n : b + n + s],
        seg_start=packed[b + n + s :],
        present=tuple(present.tolist()),
        seg_rows=tuple(counts.tolist()),
        batch_size=b,
    )


def check_mixed_args(
    in_features: int,
    out_features: int,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: Tensor,
    batch: int,
) -> None:
    """ValueError/TypeError naming the argument when the per-adapter lists or row_adapter
    do not fit a layer in_features → out_features and a batch of `batch` rows."""
    n = len(lora_As)
    for name, seq in (("lora_Bs", lora_Bs), ("scalings", scalings), ("dropout_ps", dropout_ps)):
        if len(seq) != n:
            raise ValueError(f"{name} must have one entry per adapter ({n}), got {len(seq)}")
    for k, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[1] != in_features or A.shape[0] < 1:
            raise ValueError(f"lora_As[{k}] must be (r, {in_features}) with r >= 1, got {getattr(A, 'shape', A)!r}")
        if not isinstance(B, Tensor) or tuple(B.shape) != (out_features, A.shape[0]):
            raise ValueError(f"lora_Bs[{k}] must be ({out_features}, {A.shape[0]}), got {getattr(B, 'shape', B)!r}")
    for k, (s, p) in enumerate(zip(scalings, dropout_ps)):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"scalings[{k}] must be a real number, got {type(s).__name__}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_ps[{k}] must be in [0, 1), got {p!r}")
    if not isinstance(row_adapter, Tensor) or row_adapter.shape != (batch,):
        raise ValueError(
            f"row_adapter must have shape ({batch},) (one entry per row of x), got {getattr(row_adapter, 'shape', row_adapter)!r}"  # noqa: E501
        )


@dataclass(frozen=True)
class StackedLora:
    """A layer's adapters in the stacked-rank layout. Adapter a owns rows
    `offset[a] .. offset[a] + rank[a]` of A and the same columns of B; adapters left out of
    the stack have rank 0. Per-adapter vectors are fp32 (int32 for rank/offset) on A's device."""

    A: Tensor  # (R_total, in)
    B: Tensor  # (out, R_total)
    rank: Tensor
    offset: Tensor
    ranks: tuple[int, ...]  # host copy of `rank`
    scaling: Tensor
    dropout_p: Tensor
    keep_scale: Tensor  # 1 / (1 - p)
    ones: Tensor


def _weights_key(tensors: Sequence[Tensor]) -> tuple:
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors)


class LoraStackCache:
    """Keeps one layer's `StackedLora` between calls (see the module docstring for its
    memory cost). `get` rebuilds it when the list of adapters, any weight tensor (identity,
    storage, or in-place version: optimizer steps, `load_state_dict`, `copy_`), a scaling or
    a dropout probability changes. Writes through `param.data` bypass the version counter:
    call `clear()` after those."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._stack: StackedLora | None = None

    def clear(self) -> None:
        """Drop the cached stack (the next `get` rebuilds it)."""
        self._key, self._stack = None, None

    def get(
        self,
        lora_As: Sequence[Tensor],
        lora_Bs: Sequence[Tensor],
        scalings: Sequence[float],
        dropout_ps: Sequence[float],
        include: Sequence[int] | None = None,
    ) -> StackedLora:
        """The stack of adapters `include` (all when None). With autograd recording (grad
        enabled and some weight requires grad) it is built fresh by `torch.cat`, so gradients
        reach each adapter's tensor; otherwise the cached copy is returned or rebuilt."""
        idx = list(range(len(lora_As))) if include is None else list(include)
        autograd = torch.is_grad_enabled() and any(t.requires_grad for t in list(lora_As) + list(lora_Bs))
        if autograd:
            return _stack(lora_As, lora_Bs, scalings, dropout_ps, idx)
        key = (tuple(idx), _weights_key(lora_As), _weights_key(lora_Bs), tuple(scalings), tuple(dropout_ps))
        if key != self._key:
            self._stack = _stack(
                [a.detach() for a in lora_As], [b.detach() for b in lora_Bs], scalings, dropout_ps, idx
            )
            self._key = key
        assert self._stack is not None
        return self._stack


def _stack(lora_As, lora_Bs, scalings, dropout_ps, idx: list[int]) -> StackedLora:
    n = len(lora_As)
    device = lora_As[idx[0]].device if idx else torch.device("cpu")
    ranks = [0] * n
    offsets = [0] * n
    total = 0
    for a in idx:
        ranks[a], offsets[a] = lora_As[a].shape[0], total
        total += ranks[a]
    A = torch.cat([lora_As[a] for a in idx], 0) if idx else torch.empty(0)
    B = torch.cat([lora_Bs[a] for a in idx], 1) if idx else torch.empty(0)
    ints = torch.tensor(ranks + offsets, dtype=torch.int32).to(device)
    p = torch.tensor([float(x) for x in dropout_ps], dtype=torch.float64)
    floats = torch.cat(
        [
            torch.tensor([float(s) for s in scalings], dtype=torch.float64),
            p,
            1.0 / (1.0 - p),
            torch.ones(n, dtype=torch.float64),
        ]
    )
    floats = floats.to(torch.float32).to(device)
    return StackedLora(
        A, B, ints[:n], ints[n:], tuple(ranks), floats[:n], floats[n : 2 * n], floats[2 * n : 3 * n], floats[3 * n :]
    )
