"""`RowGroups`: one batch's rows grouped by adapter, the one grouping type of mixed-adapter
batches. The layers build it once per batch from the host-side adapter names
(`peft_fast.ops.mixed_batch.group_rows`); the reference path, the Triton SGMV/BGMV kernels
and the CUDA SGMV kernels all read it.

Torch only (no Triton import): `import peft_fast` loads this module on any machine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowGroups(NamedTuple):
    """The rows of one batch grouped by adapter, on one device.

    Promises: `row_order` lists the rows with an adapter (>= 0), sorted by adapter, stable;
    segment s covers `row_order[seg_starts[s]:seg_starts[s+1]]`, all of adapter
    `seg_adapter[s] == present[s]`; `present` is ascending; base-only rows (-1) are in no
    segment. Device tensors are int32; the host tuples (`present`, `seg_rows`) size grids and
    slices without reading the device."""

    row_adapter: torch.Tensor  # (batch,) int32: adapter index per row, -1 = base only
    row_order: torch.Tensor  # (n_adapted,) int32
    seg_adapter: torch.Tensor  # (S,) int32
    seg_start: torch.Tensor  # (S + 1,) int32
    present: tuple[int, ...]  # host: the adapter of each segment
    seg_rows: tuple[int, ...]  # host: the rows of each segment

    @property
    def batch_size(self) -> int:
        return self.row_adapter.shape[0]

    @property
    def num_segments(self) -> int:
        return len(self.present)

    @property
    def max_seg_rows(self) -> int:
        return max(self.seg_rows, default=0)

    @property
    def num_adapted_rows(self) -> int:
        return sum(self.seg_rows)

    @property
    def seg_starts(self) -> list[int]:
        """Host copy of `seg_start`: S + 1 positions into row_order."""
        starts = [0]
        for n in self.seg_rows:
            starts.append(starts[-1] + n)
        return starts
