"""What mixed-adapter batches need besides the kernels, shared by every backend (torch only):

* `RowGroups` (defined beside the kernels, `peft_fast.kernels.row_groups`): one batch's
  rows grouped by adapter, built once per batch by `group_rows` from host-side adapter
  indices (the layers derive them from the `adapter_names` strings, so building it reads
  nothing back from the device and `torch.compile` traces it without a graph break) and
  reused by every layer of that forward (`tuners.base.MixedBatch.plan_for` caches it);
* `LoraStackCache`: a layer's adapters' weights stacked along the rank in the layout the
  SGMV/BGMV kernels of both backends read (A: (R_total, in), B: (out, R_total)), kept
  between calls and rebuilt when an adapter is added, deleted, reloaded or its weights change.

Memory cost of the stack cache (inference): one extra copy of every adapter of the layer,
Σ_a r_a · (in + out) elements of the adapter dtype, plus 6 small per-adapter vectors.
For 64 rank-16 adapters on a 4096 → 4096 layer in bf16 that is 64·16·8192·2 B = 16 MiB per
layer. In training (adapters that require grad, grad enabled) nothing is cached: the
stack is a `torch.cat` inside autograd of the adapters present in the batch only, so each
adapter's own nn.Parameter gets its gradient (absent adapters get none, as in the reference),
and it lives as long as the autograd graph (same size as those adapters' weights). Under
`torch.compile` nothing is cached either (the compiled graph stacks on each call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from peft_fast.kernels.row_groups import RowGroups

__all__ = ["RowGroups", "group_rows", "StackedLora", "LoraStackCache"]


def group_rows(row_adapter: Sequence[int] | Tensor, device: torch.device | str | None = None) -> RowGroups:
    """The `RowGroups` of `row_adapter` (one integer adapter index per batch row, -1 = base
    only), with its tensors on `device` (a tensor row_adapter's device by default, else CPU).

    Given a Python sequence (what layers pass) it reads nothing from the device: plain Python
    and one host-to-device copy. Given a tensor it first reads it to the host (a device sync
    when it lives on a GPU). ValueError/TypeError naming row_adapter on bad input."""
    if isinstance(row_adapter, Tensor):
        if row_adapter.dim() != 1:
            raise ValueError(
                f"row_adapter must be a 1-D tensor (one adapter index per row), got shape {tuple(row_adapter.shape)}"
            )
        if row_adapter.is_floating_point() or row_adapter.is_complex() or row_adapter.dtype == torch.bool:
            raise TypeError(f"row_adapter must hold integers, got {row_adapter.dtype}")
        device = row_adapter.device if device is None else device
        ids = row_adapter.tolist()
    else:
        ids = list(row_adapter)
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in ids):
            raise TypeError(f"row_adapter must hold integers, got {ids!r}")
    if any(a < -1 for a in ids):
        raise ValueError(f"row_adapter entries must be >= -1 (-1 = base only), got {min(ids)}")
    rows_of: dict[int, list[int]] = {}
    for row, a in enumerate(ids):
        if a >= 0:
            rows_of.setdefault(a, []).append(row)
    present = sorted(rows_of)
    row_order: list[int] = []
    seg_rows: list[int] = []
    for a in present:
        row_order += rows_of[a]
        seg_rows.append(len(rows_of[a]))
    seg_start = [0]
    for n in seg_rows:
        seg_start.append(seg_start[-1] + n)
    b, n, s = len(ids), len(row_order), len(present)
    packed = torch.tensor(ids + row_order + present + seg_start, dtype=torch.int32, device=device)
    return RowGroups(
        row_adapter=packed[:b],
        row_order=packed[b : b + n],
        seg_adapter=packed[b + n : b + n + s],
        seg_start=packed[b + n + s :],
        present=tuple(present),
        seg_rows=tuple(seg_rows),
    )


@dataclass(frozen=True)
class StackedLora:
    """A layer's adapters in the stacked-rank layout. Adapter a owns rows
    `offsets[a] .. offsets[a] + ranks[a]` of A and the same columns of B; adapters left out of
    the stack have rank 0. The per-adapter vectors live packed on A's device, `ints` (2, n)
    int32 (rank, offset) and `numbers` (4, n) fp32 (scaling, dropout p, 1 / (1 - p), 1), so
    an op takes them as two tensors; the properties are views of them."""

    A: Tensor  # (R_total, in)
    B: Tensor  # (out, R_total)
    ints: Tensor  # (2, n) int32
    numbers: Tensor  # (4, n) float32
    ranks: tuple[int, ...]  # host copy of `rank`
    offsets: tuple[int, ...]  # host copy of `offset`

    @property
    def rank(self) -> Tensor:
        return self.ints[0]

    @property
    def offset(self) -> Tensor:
        return self.ints[1]

    @property
    def scaling(self) -> Tensor:
        return self.numbers[0]

    @property
    def dropout_p(self) -> Tensor:
        return self.numbers[1]

    @property
    def keep_scale(self) -> Tensor:
        return self.numbers[2]

    @property
    def ones(self) -> Tensor:
        return self.numbers[3]


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
        reach each adapter's tensor; under torch.compile it is built fresh inside the graph;
        otherwise the cached copy is returned or rebuilt."""
        idx = list(range(len(lora_As))) if include is None else list(include)
        autograd = torch.is_grad_enabled() and any(t.requires_grad for t in list(lora_As) + list(lora_Bs))
        if autograd or torch.compiler.is_compiling():
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
    ints = torch.tensor([ranks, offsets], dtype=torch.int32, device=device)
    ps = [float(p) for p in dropout_ps]
    rows = [[float(s) for s in scalings], ps, [1.0 / (1.0 - p) for p in ps], [1.0] * n]
    numbers = torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)
    return StackedLora(A, B, ints, numbers, tuple(ranks), tuple(offsets))
