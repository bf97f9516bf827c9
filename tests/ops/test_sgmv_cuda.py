"""The CUDA C++ SGMV backend of `lora_linear_mixed` (peft_fast/ops/sgmv_cuda.py, cuda_ops.py)
against the float64 reference, with per-adapter gradients. GPU only."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, assert_close_to_oracle, leaf, randn, rel_err, require_cuda_kernels

import peft_fast

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    require_cuda_kernels()


def _mixed_case(M, K, N, ranks, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = randn(M, *lead, K, seed=seed)
    W = randn(N, K, seed=seed + 1) / K**0.5
    b = randn(N, seed=seed + 2)
    As = [randn(r, K, seed=seed + 10 + i) / K**0.5 for i, r in enumerate(ranks)]
    Bs = [randn(N, r, seed=seed + 20 + i) for i, r in enumerate(ranks)]
    row_adapter = torch.randint(-1, len(ranks), (M,), generator=g).to(DEVICE)
    dy = randn(M, *lead, N, seed=seed + 3)
    return x, W, b, As, Bs, row_adapter, dy


def _grads(backend, case, dtype, adapter_dtype, scalings, ps=None, training=True):
    x, W, b, As, Bs, ra, dy = case
    xs = leaf(x, dtype)
    Al = [leaf(A, adapter_dtype) for A in As]
    Bl = [leaf(B, adapter_dtype) for B in Bs]
    ps = ps or [0.0] * len(As)
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.lora_linear_mixed(xs, W.to(dtype), b.to(dtype), Al, Bl, scalings, ps, ra, training)
    gs = torch.autograd.grad(y, [xs, *Al, *Bl], dy.to(y.dtype), allow_unused=True)
    gs = [g if g is not None else torch.zeros_like(t) for g, t in zip(gs, [xs, *Al, *Bl])]
    return [y, *gs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ranks", [[4], [1, 8, 16], [3, 33, 64, 2]])
@pytest.mark.parametrize("M,K,N", [(7, 33, 20), (100, 64, 72), (300, 136, 40)])
def test_matches_fp64_reference_with_per_adapter_grads(M, K, N, ranks, dtype):
    case = _mixed_case(M, K, N, ranks)
    scalings = [0.5 + i for i in range(len(ranks))]
    want = _grads_64(case, dtype, scalings)
    got = _grads("cuda", case, dtype, dtype, scalings)
    base = _grads("torch", case, dtype, dtype, scalings) if dtype != torch.float32 else [None] * len(got)
    names = ["y", "dx"] + [f"dA{k}" for k in range(len(ranks))] + [f"dB{k}" for k in range(len(ranks))]
    for name, g, w, bt in zip(names, got, want, base):
        if w.abs().sum() == 0:  # an adapter no row uses: its gradient is exactly zero
            assert g.abs().sum() == 0, name
            continue
        assert_close_to_oracle(name, g, w, dtype, bt)


def _grads_64(case, dtype, scalings):
    """The float64 reference on the values the kernels see (inputs rounded to dtype)."""
    x, W, b, As, Bs, ra, dy = case
    r64 = lambda t: t.to(dtype).double()  # noqa: E731
    return _grads("torch", (r64(x), r64(W), r64(b), [r64(A) for A in As], [r64(B) for B in Bs], ra, r64(dy)),
                  torch.float64, torch.float64, scalings)  # fmt: skip


def test_3d_input_rows_are_batch_entries():
    case = _mixed_case(5, 40, 24, [2, 6], lead=(7,))
    want = _grads("torch", case, torch.float64, torch.float64, [1.0, 2.0])
    got = _grads("cuda", case, torch.float32, torch.float32, [1.0, 2.0])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5 or w.abs().sum() == 0


def test_more_adapters_than_one_launch_holds():
    """More segments than one kernel argument table (48): the launchers split them."""
    ranks = [2 + (i % 5) for i in range(60)]
    case = _mixed_case(400, 32, 24, ranks)
    s = [1.0] * 60
    want = _grads("torch", case, torch.float64, torch.float64, s)
    got = _grads("cuda", case, torch.float32, torch.float32, s)
    for g, w in zip(got, want):
        assert (rel_err(g, w) < 1e-5) if w.abs().sum() > 0 else g.abs().sum() == 0


def test_dropout_per_adapter_same_mask_forward_and_backward():
    from test_lora_cuda import _mask_of

    M, K, N, ranks, ps, s = 64, 48, 32, [3, 5], [0.2, 0.5], [1.0, 0.5]
    x, W, b, As, Bs, ra, dy = _mixed_case(M, K, N, ranks)
    torch.manual_seed(7)
    got = _grads("cuda", (x, W, b, As, Bs, ra, dy), torch.float32, torch.float32, s, ps)
    torch.manual_seed(7)  # the seed lora_linear_mixed draws
    seed = torch.randint(0, 2**31 - 1, (1,), device=DEVICE, dtype=torch.int64)
    x64 = leaf(x, torch.float64)
    A64 = [leaf(A, torch.float64) for A in As]
    B64 = [leaf(B, torch.float64) for B in Bs]
    y64 = x64 @ W.t() + b
    for k in range(len(ranks)):
        keep = _mask_of(seed, M, K, ps[k]).double()
        rows = (ra == k).double()[:, None]
        y64 = y64 + rows * s[k] * ((x64 * keep / (1 - ps[k])) @ A64[k].t()) @ B64[k].t()
    want = [y64, *torch.autograd.grad(y64, [x64, *A64, *B64], dy)]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_segments_and_errors():
    from peft_fast.ops.sgmv_cuda import segments_of

    ra = torch.tensor([1, -1, 0, 1, 0], device=DEVICE)
    segs = segments_of(ra, [2, 3], 5)
    assert segs.rows.tolist() == [2, 4, 0, 3] and segs.seg_starts == [0, 2, 4] and segs.rank_offsets == [0, 2]
    with pytest.raises(ValueError, match="row_adapter"):
        segments_of(torch.tensor([0, 2], device=DEVICE), [2, 3], 2)
    x, W, b, As, Bs, ra, _ = _mixed_case(4, 8, 6, [2])
    with peft_fast.use_backend("cuda"), pytest.raises(ValueError, match=r"lora_Bs\[0\]"):
        peft_fast.ops.lora_linear_mixed(
            x.float(), W.float(), b.float(), [As[0].float()], [Bs[0][:5].float()], [1.0], [0.0], ra
        )
