"""kernels/row_groups.py: `RowGroups`, built by `ops.mixed_batch.group_rows`, checked against its
documented promises on fresh random batches, with a brute-force oracle written from them."""

from __future__ import annotations

import random

import pytest
import torch

from peft_fast.kernels.row_groups import RowGroups
from peft_fast.ops.mixed_batch import group_rows


def _oracle(ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(row_order, present, seg_rows) straight from the promises: adapted rows stably sorted by
    adapter, one segment per adapter present (ascending), base-only rows (-1) in none."""
    row_order = sorted((r for r, a in enumerate(ids) if a >= 0), key=lambda r: ids[r])  # sorted() is stable
    present = sorted({a for a in ids if a >= 0})
    return row_order, present, [ids.count(a) for a in present]


@pytest.mark.parametrize("seed", range(6))
def test_grouping_keeps_every_promise_on_random_batches(seed):
    rng = random.Random(seed)
    n_adapters = rng.randint(1, 9)
    ids = [rng.randint(-1, n_adapters - 1) for _ in range(rng.randint(1, 40))]
    for given in (ids, torch.tensor(ids)):
        g = group_rows(given)
        assert isinstance(g, RowGroups)
        row_order, present, seg_rows = _oracle(ids)
        assert g.row_order.tolist() == row_order
        assert g.present == tuple(present) and g.seg_adapter.tolist() == present
        assert g.seg_rows == tuple(seg_rows)
        assert g.seg_start.tolist() == g.seg_starts
        assert g.seg_starts[0] == 0 and g.seg_starts[-1] == len(row_order)
        for s, a in enumerate(g.present):  # segment s holds exactly adapter a's rows
            rows = row_order[g.seg_starts[s] : g.seg_starts[s + 1]]
            assert rows and all(ids[r] == a for r in rows)
        assert g.row_adapter.tolist() == ids and g.batch_size == len(ids)
        assert g.num_segments == len(present) and g.num_adapted_rows == len(row_order)
        assert g.max_seg_rows == max(seg_rows, default=0)
        for t in (g.row_adapter, g.row_order, g.seg_adapter, g.seg_start):
            assert t.dtype == torch.int32
