"""Each mixed-adapter launcher on its own (kernels/sgmv_shrink.py, sgmv_expand.py,
sgmv_adapter_grad.py, bgmv_shrink.py, bgmv_expand.py) against a per-adapter torch loop, on
fresh random inputs with mixed ranks and base-only rows. test_mixed.py checks them
through the op and autograd; this pins down each launcher's own contract."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, randn, rel_err, require_triton

from peft_fast.ops.mixed_batch import LoraStackCache, group_rows


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


RANKS = [1, 5, 16]
ROW_ADAPTER = [2, -1, 0, 2, 1, 2, -1]  # base-only rows and an uneven split


def f32(*shape: int, seed: int) -> torch.Tensor:
    return randn(*shape, dtype=torch.float32, seed=seed)


def _setup(T: int, K: int = 33, N: int = 19, seed: int = 0):
    from peft_fast.kernels.segments import StackedRanks

    As = [f32(r, K, seed=seed + i) for i, r in enumerate(RANKS)]
    Bs = [f32(N, r, seed=seed + 10 + i) for i, r in enumerate(RANKS)]
    scal = [0.5, 1.5, 2.0]
    st = LoraStackCache().get(As, Bs, scal, [0.0] * len(RANKS))
    plan = segs = group_rows(ROW_ADAPTER, DEVICE)  # T = M // batch size, from x's rows
    ranks = StackedRanks(st.rank, st.offset, max(RANKS))
    token_adapter = torch.tensor(ROW_ADAPTER).repeat_interleave(T)
    return As, Bs, scal, st, plan, segs, ranks, token_adapter


@pytest.mark.parametrize("T", [1, 3])
def test_shrink_launchers_match_per_adapter_loop(T):
    from peft_fast.kernels.bgmv_shrink import bgmv_shrink
    from peft_fast.kernels.sgmv_shrink import sgmv_shrink

    As, _, scal, st, plan, segs, ranks, token_adapter = _setup(T)
    x = f32(len(ROW_ADAPTER) * T, 33, seed=99)
    want = torch.zeros(x.shape[0], max(RANKS), dtype=torch.float64)
    for m, a in enumerate(token_adapter.tolist()):
        if a >= 0:
            want[m, : RANKS[a]] = scal[a] * (x[m].double() @ As[a].double().T)
    for got in (
        sgmv_shrink(x, st.A, segs, ranks, st.scaling),
        bgmv_shrink(x, st.A, plan.row_adapter, T, ranks, st.scaling),
    ):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel_err(got.cpu(), want) < 1e-5


@pytest.mark.parametrize("T", [1, 3])
def test_expand_launchers_add_into_out(T):
    from peft_fast.kernels.bgmv_expand import bgmv_expand
    from peft_fast.kernels.sgmv_expand import sgmv_expand

    _, Bs, scal, st, plan, segs, ranks, token_adapter = _setup(T)
    M = len(ROW_ADAPTER) * T
    h = f32(M, max(RANKS), seed=7)
    base = f32(M, 19, seed=8)
    want = base.double().clone()
    for m, a in enumerate(token_adapter.tolist()):
        if a >= 0:
            want[m] += scal[a] * (h[m, : RANKS[a]].double() @ Bs[a].double().T)
    for launch in (
        lambda out: sgmv_expand(out, h, st.B, segs, ranks, st.scaling),
        lambda out: bgmv_expand(out, h, st.B, plan.row_adapter, T, ranks, st.scaling),
    ):
        out = base.clone()
        got = launch(out)
        assert got is out  # in place
        assert rel_err(out.cpu(), want) < 1e-5


def test_adapter_grad_sums_each_adapter_over_its_own_tokens():
    from peft_fast.kernels.sgmv_adapter_grad import sgmv_adapter_grad

    T = 2
    _, _, scal, st, _, segs, ranks, token_adapter = _setup(T)
    M, N = len(ROW_ADAPTER) * T, 21
    P = f32(M, max(RANKS), seed=3)
    Q = f32(M, N, seed=4)
    got = sgmv_adapter_grad(P, Q, sum(RANKS), segs, ranks, st.scaling, torch.float32)
    want = torch.zeros(sum(RANKS), N, dtype=torch.float64)
    offsets = [0, RANKS[0], RANKS[0] + RANKS[1]]
    for a, r in enumerate(RANKS):
        rows = (token_adapter == a).nonzero().flatten()
        want[offsets[a] : offsets[a] + r] = scal[a] * (P[rows, :r].double().T @ Q[rows].double())
    assert got.shape == want.shape
    assert rel_err(got.cpu(), want) < 1e-5
