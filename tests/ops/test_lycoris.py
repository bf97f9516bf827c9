"""LoHa and LoKr ops (peft_fast/ops/loha.py, lokr.py, lycoris_reference.py): both forms of each op
against a float64 ΔW built by hand (the formula, not our code), forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_fast import ops
from peft_fast.ops.lycoris_reference import loha_form, lokr_form


def _rand(*shape: int, dtype: torch.dtype = torch.float32, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, g.to(out.dtype)))


def _loha_dw64(w1a, w1b, w2a, w2b, scaling):
    return (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * scaling


TOL = {torch.float32: 2e-5, torch.float16: 2e-2}


@pytest.mark.parametrize("form", ["factored", "delta_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("lead", "n_in", "n_out", "r"), [((7,), 33, 100, 3), ((2, 5), 17, 1, 1), ((1,), 64, 48, 8)])
@pytest.mark.parametrize("rank_dropout", [False, True])
def test_loha_linear_matches_float64(form, dtype, lead, n_in, n_out, r, rank_dropout):
    gen = torch.Generator().manual_seed(hash((n_in, n_out, r)) % 1000)
    x = _rand(*lead, n_in, dtype=dtype, gen=gen)
    ws = [_rand(n_out, r, dtype=dtype, gen=gen), _rand(r, n_in, dtype=dtype, gen=gen)]
    ws += [_rand(n_out, r, dtype=dtype, gen=gen), _rand(r, n_in, dtype=dtype, gen=gen)]
    row_scale = (torch.rand(n_out, generator=gen) > 0.3).to(dtype) * 1.7 if rank_dropout else None
    out = ops.loha_linear(x, *ws, 0.75, row_scale, form=form)
    assert out.dtype == dtype and out.shape == (*lead, n_out)

    inputs64 = [t.detach().double().requires_grad_(True) for t in [x, *ws]]
    dw = _loha_dw64(*inputs64[1:], 0.75)
    if row_scale is not None:
        dw = dw * row_scale.double()[:, None]
    ref = F.linear(inputs64[0], dw)
    assert _rel(out, ref) < TOL[dtype]
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(_grads(out, [x, *ws], g), _grads(ref, inputs64, g)):
        assert _rel(got, want) < TOL[dtype] * 5


def _lokr_dw64(w1, w2, scaling):
    return torch.kron(w1.double(), w2.double()) * scaling


@pytest.mark.parametrize("form", ["factored", "delta_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("lead", "a", "c", "b", "d"), [((7,), 3, 5, 11, 2), ((2, 3), 1, 7, 33, 1), ((5,), 8, 8, 4, 16)]
)
@pytest.mark.parametrize("rank_dropout", [False, True])
def test_lokr_linear_matches_float64(form, dtype, lead, a, c, b, d, rank_dropout):
    gen = torch.Generator().manual_seed(a * 100 + b)
    x = _rand(*lead, c * d, dtype=dtype, gen=gen)
    w1, w2 = _rand(a, c, dtype=dtype, gen=gen), _rand(b, d, dtype=dtype, gen=gen)
    row_scale = (torch.rand(a * b, generator=gen) > 0.3).float() if rank_dropout else None
    out = ops.lokr_linear(x, w1, w2, 0.5, row_scale, form=form)
    assert out.dtype == dtype and out.shape == (*lead, a * b)
    inputs64 = [t.detach().double().requires_grad_(True) for t in [x, w1, w2]]
    dw = _lokr_dw64(inputs64[1], inputs64[2], 0.5)
    if row_scale is not None:
        dw = dw * row_scale.double()[:, None]
    ref = F.linear(inputs64[0], dw)
    assert _rel(out, ref) < TOL[dtype]
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(_grads(out, [x, w1, w2], g), _grads(ref, inputs64, g)):
        assert _rel(got, want) < TOL[dtype] * 5


@pytest.mark.parametrize("form", ["factored", "delta_weight"])
@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_loha_conv2d_matches_float64(form, stride, padding, dilation):
    gen = torch.Generator().manual_seed(3)
    out_ch, in_ch, k, r = 6, 5, 3, 2
    x = _rand(2, in_ch, 9, 7, gen=gen)
    ws = [_rand(out_ch, r, gen=gen), _rand(r, in_ch * k * k, gen=gen), _rand(out_ch, r, gen=gen)]
    ws.append(_rand(r, in_ch * k * k, gen=gen))
    row_scale = torch.tensor([1.5, 0.0, 1.5, 1.5, 0.0, 1.5])
    shape = (out_ch, in_ch, k, k)
    out = ops.loha_conv(x, *ws, 0.3, row_scale, shape, (stride,) * 2, (padding,) * 2, (dilation,) * 2, 1, form=form)
    inputs64 = [t.detach().double().requires_grad_(True) for t in [x, *ws]]
    dw = (_loha_dw64(*inputs64[1:], 0.3) * row_scale.double()[:, None]).reshape(shape)
    ref = F.conv2d(inputs64[0], dw, stride=stride, padding=padding, dilation=dilation)
    assert _rel(out, ref) < 2e-5
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(_grads(out, [x, *ws], g), _grads(ref, inputs64, g)):
        assert _rel(got, want) < 1e-4


@pytest.mark.parametrize("form", ["factored", "delta_weight"])
@pytest.mark.parametrize("w2_kind", ["4d", "2d"])
def test_lokr_conv2d_matches_float64(form, w2_kind):
    gen = torch.Generator().manual_seed(4)
    a, c, b, d, k = 2, 3, 5, 2, 3
    x = _rand(2, c * d, 8, 6, gen=gen)
    w1 = _rand(a, c, gen=gen)
    w2 = _rand(b, d, k, k, gen=gen) if w2_kind == "4d" else _rand(b, d * k * k, gen=gen)
    shape = (a * b, c * d, k, k)
    row_scale = (torch.rand(a * b, generator=gen) > 0.5).float()
    out = ops.lokr_conv(x, w1, w2, 0.6, row_scale, shape, (2, 1), (1, 1), (1, 1), 1, form=form)
    inputs64 = [t.detach().double().requires_grad_(True) for t in [x, w1, w2]]
    w2_4d = inputs64[2].reshape(b, d, k, k)
    dw = torch.kron(inputs64[1][:, :, None, None], w2_4d) * 0.6 * row_scale.double().view(-1, 1, 1, 1)
    ref = F.conv2d(inputs64[0], dw, stride=(2, 1), padding=1)
    assert _rel(out, ref) < 2e-5
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(_grads(out, [x, w1, w2], g), _grads(ref, inputs64, g)):
        assert _rel(got, want) < 1e-4


def test_loha_cp_delta_weight_is_the_cp_formula():
    gen = torch.Generator().manual_seed(5)
    r, o, i, k = 3, 4, 5, 3
    t1, t2 = _rand(r, r, k, k, gen=gen), _rand(r, r, k, k, gen=gen)
    w1a, w2a, w1b, w2b = _rand(r, o, gen=gen), _rand(r, o, gen=gen), _rand(r, i, gen=gen), _rand(r, i, gen=gen)
    got = ops.loha.loha_delta_weight(w1a, w1b, w2a, w2b, 0.5, t1, t2)
    # By hand: ΔW[p, q, :, :] = Σ_ij t[i, j] w_a[i, p] w_b[j, q], for both factors.
    want = torch.zeros(o, i, k, k, dtype=torch.float64)
    for p in range(o):
        for q in range(i):
            f1 = sum(t1[a, b].double() * w1a[a, p].double() * w1b[b, q].double() for a in range(r) for b in range(r))
            f2 = sum(t2[a, b].double() * w2a[a, p].double() * w2b[b, q].double() for a in range(r) for b in range(r))
            want[p, q] = f1 * f2 * 0.5
    assert _rel(got, want) < 1e-5


def test_form_choice_follows_the_counts():
    # Llama-sized layer at r=8: r² = 64 is small against 4096 -> factored.
    assert loha_form(8192, 4096, 4096, 8) == "factored"
    # A tiny layer where r² exceeds the layer's width -> ΔW.
    assert loha_form(8, 32, 32, 8) == "delta_weight"
    # LoKr with near-square factors is always cheaper factored on a large layer...
    assert lokr_form(8192, (64, 64), (64, 64)) == "factored"
    # ...and a prime dimension (factors 1 x n) leaves nothing to save.
    assert lokr_form(8192, (1, 1), (4093, 4093)) == "delta_weight"


def test_bad_form_is_refused():
    x, w = torch.randn(2, 4), torch.randn(4, 1)
    with pytest.raises(ValueError, match="form must be one of"):
        ops.loha_linear(x, w, w.T, w, w.T, 1.0, None, form="fast")
    with pytest.raises(ValueError, match="groups == 1"):
        ops.loha_conv(
            torch.randn(1, 4, 3, 3), w, torch.randn(1, 2), w, torch.randn(1, 2), 1.0, None, (4, 2, 1, 1),
            (1, 1), (0, 0), (1, 1), 2, form="factored",
        )  # fmt: skip
