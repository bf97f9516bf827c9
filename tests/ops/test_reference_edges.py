"""Edges of the torch reference ops that mutation testing found unpinned
(bench/results/mutation-ops2-20261129.md): DoRA's defaults, its weight-training path and mixed
dtypes, the DoRA embedding's default lookup, the 4-bit DoRA front door's `norm` and
`compute_dtype`, and LoHa/LoKr's form choice, grouped convolutions and output dtype.
Oracles: float64 formulas (HF peft's), and the cost formulas of `loha_form`/`lokr_form`'s
docstrings evaluated by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_fast.ops import dora_reference, lycoris_reference, qlora
from peft_fast.ops.lycoris_reference import BYTE_COST
from peft_fast.quant.formats import dequantize_4bit, quantize_4bit


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# -- DoRA ----------------------------------------------------------------------------------------


def _dora_inputs(M=5, K=12, N=7, r=3, base=torch.float32, lora=torch.float32, mag=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(base).requires_grad_(True)
    weight = (torch.randn(N, K, generator=g) / K**0.5).to(base)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(lora).requires_grad_(True)
    B = (torch.randn(N, r, generator=g) * 0.5).to(lora).requires_grad_(True)
    m = (torch.rand(N, generator=g) + 0.5).to(mag).requires_grad_(True)
    return x, weight, A, B, m


def _dora64(x, weight, A, B, m, s, keep=None, p=0.0, norm=None):
    """HF peft's DoRA in float64: y = xWᵀ + (m/‖W + sBA‖ − 1) ⊙ x'Wᵀ + m/‖W + sBA‖ ⊙ s·x'AᵀBᵀ."""
    x_, w_, A_, B_, m_ = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, A, B, m))
    if norm is None:
        norm = torch.linalg.norm(w_.detach() + s * B_.detach() @ A_.detach(), dim=1)
    scale = m_ / norm.double()
    xd = x_ if keep is None else x_ * keep / (1 - p)
    y = x_ @ w_.T + (scale - 1) * (xd @ w_.T) + scale * s * (xd @ A_.T @ B_.T)
    return y, (x_, w_, A_, B_, m_)


def test_dora_linear_defaults_to_no_dropout():
    """dropout_p defaults to 0: the default call is the plain DoRA output (no mask, no NaN)."""
    x, weight, A, B, m = _dora_inputs()
    y = dora_reference.dora_linear(x, weight, None, A, B, m, 0.8)
    want, _ = _dora64(x, weight, A, B, m, 0.8)
    assert _rel(y, want) < 1e-5


def test_dora_linear_with_a_trainable_weight_matches_float64():
    """A trainable base weight takes HF peft's plain-autograd composition; values and every gradient."""
    x, weight, A, B, m = _dora_inputs(seed=1)
    weight.requires_grad_(True)
    y = dora_reference.dora_linear(x, weight, None, A, B, m, 1.3, 0.0, True)
    want, leaves = _dora64(x, weight, A, B, m, 1.3)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(dy)
    want.backward(dy.double())
    assert _rel(y, want) < 1e-5
    for got, ref in zip((x, weight, A, B, m), leaves):
        assert got.grad is not None and _rel(got.grad, ref.grad) < 1e-4


@pytest.mark.parametrize(
    "base, lora, p",
    [
        (torch.float32, torch.bfloat16, 0.0),  # fp32 base, bf16 adapter: the input gradient mixes both
        (torch.bfloat16, torch.bfloat16, 0.25),  # bf16 everywhere but the fp32 magnitude, with dropout
    ],
)
def test_dora_linear_mixed_dtypes_match_float64(base, lora, p):
    """The frozen-weight autograd Function with mixed dtypes: forward and input/adapter gradients."""
    x, weight, A, B, m = _dora_inputs(base=base, lora=lora, mag=torch.float32, seed=3)
    torch.manual_seed(7)
    y = dora_reference.dora_linear(x, weight, None, A, B, m, 0.9, p, True)
    keep = None
    if p > 0:
        torch.manual_seed(7)  # the mask: F.dropout's draw on a tensor of x's shape, the adapter's dtype
        keep = torch.empty(x.shape, dtype=lora).bernoulli_(1 - p).double()
    want, leaves = _dora64(x, weight, A, B, m, 0.9, keep, p)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y.dtype)
    y.backward(dy)
    want.backward(dy.double())
    assert y.dtype == base and _rel(y, want) < 2e-2
    for got, ref in zip((x, A, B, m), (leaves[0], leaves[2], leaves[3], leaves[4])):
        assert got.grad is not None and got.grad.dtype == got.dtype and _rel(got.grad, ref.grad) < 3e-2


def test_dora_embedding_defaults_give_dense_gradients():
    """Default lookup options (no sparse gradients): y = m/‖Eᵀ + sBA‖ ⊙ (E[ids] + s·A[:, ids]ᵀBᵀ)."""
    g = torch.Generator().manual_seed(5)
    num, dim, r, s = 9, 6, 2, 0.7
    E = torch.randn(num, dim, generator=g)
    A = torch.randn(r, num, generator=g).requires_grad_(True)
    B = torch.randn(dim, r, generator=g).requires_grad_(True)
    m = (torch.rand(dim, generator=g) + 0.5).requires_grad_(True)
    ids = torch.tensor([[1, 4, 4], [0, 8, 2]])
    y = dora_reference.dora_embedding(ids, E, A, B, m, s)
    A_, B_, m_ = (t.detach().double().requires_grad_(True) for t in (A, B, m))
    norm = torch.linalg.norm(E.double().T + s * B_.detach() @ A_.detach(), dim=1)
    want = m_ / norm * (E.double()[ids] + s * A_.T[ids] @ B_.T)
    y.sum().backward()
    want.sum().backward()
    assert _rel(y, want) < 1e-5
    for got, ref in zip((A, B, m), (A_, B_, m_)):
        assert not got.grad.is_sparse and _rel(got.grad, ref.grad) < 1e-5


def _state(shape, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.2
    return quantize_4bit(w, 64, "nf4", False, torch.uint8)


def test_dora_linear_4bit_uses_the_given_norm_and_compute_dtype(monkeypatch):
    """A cached norm is used as given (not recomputed), and compute_dtype reaches the backend as given
    (x's dtype when None)."""
    state = _state((6, 64))
    W = dequantize_4bit(state, torch.float32)
    x, _, A, B, m = _dora_inputs(M=3, K=64, N=6, r=2, seed=6)
    norm = torch.linspace(0.5, 2.0, 6)  # not ‖W + sBA‖: only used if passed through
    seen = []
    select = qlora.dispatch.select

    def spy(name, *args, **kwargs):
        if name == "dora_linear_4bit":
            seen.append(args[9])
        return select(name, *args, **kwargs)

    monkeypatch.setattr(qlora.dispatch, "select", spy)
    y = qlora.dora_linear_4bit(x, state, None, A, B, m, 0.5, 0.0, False, torch.float16, norm=norm)
    want, _ = _dora64(x, W, A, B, m, 0.5, norm=norm)
    assert _rel(y, want) < 5e-3 and y.dtype == torch.float32
    qlora.dora_linear_4bit(x, state, None, A, B, m, 0.5, 0.0, False)
    assert seen == [torch.float16, torch.float32]


def test_dora_linear_4bit_dequantizes_its_weight_once_or_not_at_all(monkeypatch):
    """DoRA's own dequantized weight (for the norm and, with dropout, x'Wᵀ) is made once per call,
    as HF peft's bnb DoRA makes it, and not at all when the norm is given and nothing is dropped;
    the results stay the float64 formula's."""
    state = _state((6, 64))
    W = dequantize_4bit(state, torch.float32)
    x, _, A, B, m = _dora_inputs(M=3, K=64, N=6, r=2, seed=7)
    calls = []
    for module in (dora_reference, qlora):
        real = module.dequantize_4bit
        monkeypatch.setattr(module, "dequantize_4bit", lambda *a, real=real, **k: calls.append(1) or real(*a, **k))

    y = qlora.dora_linear_4bit(x, state, None, A, B, m, 0.5, 0.0, False)  # the norm from the weight
    assert len(calls) == 1 and _rel(y, _dora64(x, W, A, B, m, 0.5)[0]) < 1e-5
    torch.manual_seed(3)
    qlora.dora_linear_4bit(x, state, None, A, B, m, 0.5, 0.3, True)  # norm and x'Wᵀ from one copy
    assert len(calls) == 2
    norm = torch.linalg.norm(W.double() + 0.5 * B.double() @ A.double(), dim=1).float()
    y = qlora.dora_linear_4bit(x, state, None, A, B, m, 0.5, 0.0, False, norm=norm)  # eval, cached norm
    assert len(calls) == 2 and _rel(y, _dora64(x, W, A, B, m, 0.5, norm=norm)[0]) < 1e-5
    with pytest.raises(ValueError, match=r"norm must be \(6,\)"):
        qlora.dora_linear_4bit(x, state, None, A, B, m, 0.5, norm=norm[:2])
    with pytest.raises(ValueError, match=r"lora_B must be \(6, 2\)"):
        qlora.dora_linear_4bit(x, state, None, A, B[:3], m, 0.5)


# -- LoHa / LoKr ---------------------------------------------------------------------------------


def _loha_cost(rows, n_in, n_out, rank):
    """loha_form's docstring: (delta_weight, factored) in flops, BYTE_COST flops an element moved."""
    r2 = rank * rank
    delta = 4 * rank * n_out * n_in + n_out * n_in + 2 * rows * n_in * n_out + BYTE_COST * 3 * n_out * n_in
    factored = (1 + BYTE_COST) * r2 * (n_in + n_out) + 2 * rows * r2 * (n_in + n_out) + BYTE_COST * rows * r2
    return delta, factored


def _lokr_cost(rows, a, c, b, d, kernel):
    """lokr_form's docstring: (delta_weight, cheaper factored order) in flops."""
    full = a * b * c * d * kernel
    delta = full + BYTE_COST * full + 2 * rows * full
    w2_first = 2 * rows * c * d * b * kernel + 2 * rows * a * c * b + BYTE_COST * rows * c * b
    w1_first = 2 * rows * a * c * d + 2 * rows * a * d * b * kernel + BYTE_COST * rows * a * d
    return delta, min(w2_first, w1_first)


def test_loha_form_follows_its_cost_formula():
    """Over a grid that crosses the boundary in both directions, the cheaper form by the docstring."""
    seen = set()
    for rows in (1, 2, 3, 5, 8, 13, 40, 200):
        for n_in in (1, 2, 3, 8, 33):
            for n_out in (1, 4, 9, 64):
                for rank in (1, 2, 3, 6):
                    delta, factored = _loha_cost(rows, n_in, n_out, rank)
                    want = "factored" if factored < delta else "delta_weight"
                    assert lycoris_reference.loha_form(rows, n_in, n_out, rank) == want, (rows, n_in, n_out, rank)
                    seen.add(want)
    assert seen == {"factored", "delta_weight"}
    # one case by hand: rows 1, in 2, out 1, rank 1: delta 8 + 2 + 4 + 48 = 62, factored 27 + 6 + 8 = 41
    assert _loha_cost(1, 2, 1, 1) == (62, 41) and lycoris_reference.loha_form(1, 2, 1, 1) == "factored"


def test_lokr_form_follows_its_cost_formula():
    seen = set()
    for rows in (1, 2, 4, 9, 50):
        for a, c, b, d in ((1, 1, 1, 1), (2, 2, 2, 2), (1, 4, 3, 2), (4, 1, 2, 8), (3, 5, 7, 2)):
            for kernel in (1, 9):
                delta, factored = _lokr_cost(rows, a, c, b, d, kernel)
                want = "factored" if factored < delta else "delta_weight"
                assert lycoris_reference.lokr_form(rows, (a, c), (b, d), kernel) == want, (rows, a, c, b, d, kernel)
                seen.add(want)
    assert seen == {"factored", "delta_weight"}
    # by hand: rows 1, all sizes 1: delta 1 + 8 + 2 = 11, factored 2 + 2 + 8 = 12
    assert _lokr_cost(1, 1, 1, 1, 1, 1) == (11, 12) and lycoris_reference.lokr_form(1, (1, 1), (1, 1)) == "delta_weight"
    # a tie keeps delta_weight: rows 9, w1 (1, 2), w2 (3, 1): delta 6·9 + 2·9·6 = 162,
    # w1 first 2·9·(2 + 3) + 8·9·1 = 162 (w2 first 648)
    assert (
        _lokr_cost(9, 1, 2, 3, 1, 1) == (162, 162) and lycoris_reference.lokr_form(9, (1, 2), (3, 1)) == "delta_weight"
    )


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_loha_linear_chooses_its_form_from_the_row_count(monkeypatch):
    """form None: loha_form gets rows = x.numel() // in (here in = 1: 6 rows), and the output is ΔW x."""
    calls = []
    form = lycoris_reference.loha_form
    monkeypatch.setattr(lycoris_reference, "loha_form", lambda *a: calls.append(a) or form(*a))
    x = _rand(2, 3, 1)
    w1a, w1b, w2a, w2b = _rand(4, 2, seed=1), _rand(2, 1, seed=2), _rand(4, 2, seed=3), _rand(2, 1, seed=4)
    y = lycoris_reference.loha_linear(x, w1a, w1b, w2a, w2b, 0.5)
    assert calls == [(6, 1, 4, 2)]
    dw = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * 0.5
    assert _rel(y, x.double() @ dw.T) < 1e-6


@pytest.mark.parametrize("form", ["factored", "delta_weight"])
def test_loha_output_keeps_the_adapter_dtype_with_a_fp32_row_scale(form):
    """bf16 factors, fp32 row_scale (rank dropout): the output is bf16, ΔW x · row_scale."""
    w1a, w1b, w2a, w2b = (_rand(*s, dtype=torch.bfloat16, seed=i) for i, s in enumerate([(5, 2), (2, 8)] * 2))
    x = _rand(3, 8, seed=9)
    row_scale = torch.tensor([0.0, 2.0, 1.0, 0.0, 2.0])
    y = lycoris_reference.loha_linear(x, w1a, w1b, w2a, w2b, 0.7, row_scale, form)
    dw = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * 0.7
    want = x.to(torch.bfloat16).double() @ dw.T * row_scale.double()
    assert y.dtype == torch.bfloat16 and _rel(y, want) < 2e-2


@pytest.mark.parametrize("form", [None, "delta_weight"])
def test_loha_grouped_conv_builds_delta_weight(form):
    """groups = 2 cannot be factored: form None or "delta_weight" convolve with ΔW (HF peft's way)."""
    wshape = (4, 3, 3, 3)  # Conv2d(6, 4, 3, groups=2)
    w1a, w1b, w2a, w2b = _rand(4, 2, seed=1), _rand(2, 27, seed=2), _rand(4, 2, seed=3), _rand(2, 27, seed=4)
    x = _rand(2, 6, 5, 5, seed=5)
    y = lycoris_reference.loha_conv(x, w1a, w1b, w2a, w2b, 0.5, None, wshape, (1, 1), (1, 1), (1, 1), 2, form=form)
    dw = ((w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * 0.5).reshape(wshape)
    assert _rel(y, F.conv2d(x.double(), dw, padding=1, groups=2)) < 1e-6


def test_lokr_linear_applies_delta_weight_when_its_cost_says_so(monkeypatch):
    """form None and lokr_form choosing "delta_weight": ΔW = kron(w1, w2) is built and applied."""
    built = []
    delta_weight = lycoris_reference.lokr_delta_weight
    monkeypatch.setattr(lycoris_reference, "lokr_delta_weight", lambda *a: built.append(1) or delta_weight(*a))
    w1, w2 = _rand(2, 2, seed=1), _rand(2, 2, seed=2)
    x = _rand(10, 4, seed=3)
    # by hand: rows 10, a = b = c = d = 2: delta 16·9 + 2·10·16 = 464, factored 2·10·16 + 8·10·4 = 640
    assert lycoris_reference.lokr_form(10, (2, 2), (2, 2)) == "delta_weight"
    y = lycoris_reference.lokr_linear(x, w1, w2, 0.5)
    assert built == [1]
    assert _rel(y, x.double() @ (torch.kron(w1.double(), w2.double()) * 0.5).T) < 1e-6


def test_lokr_conv_chooses_a_form_and_matches_float64():
    """form None on a factorable Conv2d (the cost model decides), and the refusal's exact message."""
    a, c, b, d = 2, 3, 2, 2
    wshape = (a * b, c * d, 3, 3)
    w1, w2 = _rand(a, c, seed=1), _rand(b, d, 3, 3, seed=2)
    x = _rand(2, c * d, 6, 6, seed=3)
    y = lycoris_reference.lokr_conv(x, w1, w2, 0.5, None, wshape, (1, 1), (1, 1), (1, 1), 1)
    dw = (torch.kron(w1.double()[:, :, None, None], w2.double()) * 0.5).reshape(wshape)
    assert _rel(y, F.conv2d(x.double(), dw, padding=1)) < 1e-6
    with pytest.raises(ValueError, match=r"^the factored LoKr convolution needs a Conv2d with groups == 1$"):
        lycoris_reference.lokr_conv(x, w1, w2, 0.5, None, (4, 3, 3, 3), (1,), (1,), (1,), 2, form="factored")
