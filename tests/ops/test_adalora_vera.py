"""ops.adalora_linear and ops.vera_linear against a float64 oracle written from HF peft's formulas
(odd sizes, 3-D and strided inputs, fp32 and bf16, forward and backward), dropout masks equal to
HF peft's under the same seed, AdaLoRA's kernel route (lora_linear's Triton kernels under the
interpreter) against the reference, and the front doors' argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import rel_err, require_triton

import peft_fast
from peft_fast import ops

SHAPES = [(1, 7, 5, 3), (3, 33, 17, 1), (2, 100, 64, 7)]  # (batch, in, out, r)


def _adalora_oracle(x, w, b, A, E, B, s, ranknum, mask=None, dtype=torch.float64):
    """HF peft's SVDLinear, in float64 (or `dtype`: the unfused torch path of that precision)."""
    x, w, A, E, B = (t.to(dtype) for t in (x, w, A, E, B))
    xd = x if mask is None else x * mask.to(dtype)
    out = x @ w.T + (0 if b is None else b.to(dtype)) + (xd @ (A * E).T @ B.T) * s / (ranknum + 1e-5)
    return out


def _vera_oracle(x, w, b, VA, VB, ld, lb, mask=None, dtype=torch.float64):
    """HF peft's vera.Linear, in float64 (or `dtype`: the unfused torch path of that precision)."""
    x, w, VA, VB, ld, lb = (t.to(dtype) for t in (x, w, VA, VB, ld, lb))
    xd = x if mask is None else x * mask.to(dtype)
    n_in, n_out = w.shape[1], w.shape[0]
    return x @ w.T + (0 if b is None else b.to(dtype)) + lb * ((ld * (xd @ VA[:, :n_in].T)) @ VB[:n_out, :].T)


def _check(y, grads, oracle_fn, leaves64, rest, dy, dtype):
    """fp32 within 1e-5 of the float64 oracle; bf16 within twice the error of HF peft's formula
    run in bf16 (flash-attention's rule), plus a floor of 1e-3."""
    want = oracle_fn(*leaves64, *rest)
    want_grads = torch.autograd.grad(want, [t for t in leaves64 if t.requires_grad], dy.double())
    if dtype == torch.float32:
        tols = [1e-5] * (1 + len(want_grads))
    else:
        low = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in leaves64]
        same = oracle_fn(*low, *rest, dtype=dtype)
        same_grads = torch.autograd.grad(same, [t for t in low if t.requires_grad], dy.to(dtype))
        tols = [2 * rel_err(a, b) + 1e-3 for a, b in zip([same, *same_grads], [want, *want_grads])]
    assert y.dtype == dtype and rel_err(y, want) <= tols[0]
    for got, exp, tol in zip(grads, want_grads, tols[1:]):
        assert rel_err(got, exp) <= tol


def _inputs(batch, n_in, n_out, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, n_in + 3, generator=g)[..., 1 : n_in + 1]  # 3-D, strided (a slice)
    w, b = torch.randn(n_out, n_in, generator=g) / n_in**0.5, torch.randn(n_out, generator=g)
    return x, w, b, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, n_in, n_out, r", SHAPES)
def test_adalora_linear_matches_the_oracle(dtype, batch, n_in, n_out, r):
    x, w, b, g = _inputs(batch, n_in, n_out, r)
    A, E, B = torch.randn(r, n_in, generator=g), torch.randn(r, 1, generator=g), torch.randn(n_out, r, generator=g)
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, A, E, B)]
    xl, Al, El, Bl = leaves
    y = ops.adalora_linear(xl, w.to(dtype), b.to(dtype), Al, El, Bl, 8.0, 6.0)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))

    def oracle(x, A, E, B, w, b, dtype=torch.float64):
        return _adalora_oracle(x, w, b, A, E, B, 8.0, 6.0, dtype=dtype)

    leaves64 = [t.double().requires_grad_(True) for t in (x, A, E, B)]
    _check(y, grads, oracle, leaves64, (w, b), dy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, n_in, n_out, r", SHAPES)
def test_vera_linear_matches_the_oracle(dtype, batch, n_in, n_out, r):
    x, w, b, g = _inputs(batch, n_in, n_out, r)
    VA, VB = torch.randn(r, n_in + 5, generator=g), torch.randn(n_out + 2, r, generator=g)  # shared: larger
    ld, lb = torch.randn(r, generator=g), torch.randn(n_out, generator=g)
    leaves = [t.to(dtype).requires_grad_(True) for t in (x, ld, lb)]
    y = ops.vera_linear(leaves[0], w.to(dtype), b.to(dtype), VA.to(dtype), VB.to(dtype), leaves[1], leaves[2])
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))

    def oracle(x, ld, lb, w, b, VA, VB, dtype=torch.float64):
        return _vera_oracle(x, w, b, VA, VB, ld, lb, dtype=dtype)

    leaves64 = [t.double().requires_grad_(True) for t in (x, ld, lb)]
    _check(y, grads, oracle, leaves64, (w, b, VA, VB), dy, dtype)


def test_dropout_draws_hf_peft_s_mask():
    """With dropout, the same seed gives the mask nn.Dropout would draw on x (HF peft's order:
    the base product draws nothing, then dropout(x)), and leaves the generator where F.dropout
    leaves it (the next layer's mask is HF peft's too)."""
    x, w, b, g = _inputs(2, 33, 17, 3)
    A, E, B = torch.randn(3, 33, generator=g), torch.randn(3, 1, generator=g), torch.randn(17, 3, generator=g)
    VA, VB, ld, lb = torch.randn(3, 33, generator=g), torch.randn(17, 3, generator=g), torch.randn(3), torch.randn(17)
    torch.manual_seed(4)
    mask = F.dropout(torch.ones_like(x), p=0.4, training=True)
    next_draw = torch.rand(5)
    torch.manual_seed(4)
    got = ops.adalora_linear(x, w, b, A, E, B, 8.0, 3.0, 0.4, True)
    assert rel_err(got, _adalora_oracle(x, w, b, A, E, B, 8.0, 3.0, mask)) < 1e-5
    assert torch.equal(torch.rand(5), next_draw)
    torch.manual_seed(4)
    got = ops.vera_linear(x, w, b, VA, VB, ld, lb, 0.4, True)
    assert rel_err(got, _vera_oracle(x, w, b, VA, VB, ld, lb, mask)) < 1e-5
    assert torch.equal(torch.rand(5), next_draw)
    # Not training: no dropout.
    assert rel_err(ops.vera_linear(x, w, b, VA, VB, ld, lb, 0.4, False), _vera_oracle(x, w, b, VA, VB, ld, lb)) < 1e-5


@pytest.mark.parametrize("weight_trains", [False, True])
def test_dropout_gradients_match_the_oracle(weight_trains):
    """Training with dropout: outputs and every gradient (x, A, E, B; x, λ_d, λ_b; the bias, and the
    weight when it trains, which takes the plain-autograd path) equal the float64 oracle run with
    the mask F.dropout draws from the same seed."""
    x, w, b, g = _inputs(2, 33, 17, 3)
    A, E, B = torch.randn(3, 33, generator=g), torch.randn(3, 1, generator=g), torch.randn(17, 3, generator=g)
    VA, VB, ld, lb = torch.randn(3, 40, generator=g), torch.randn(20, 3, generator=g), torch.randn(3), torch.randn(17)
    dy = torch.randn(2, 4, 17, generator=g)
    torch.manual_seed(4)
    mask = F.dropout(torch.ones_like(x), p=0.4, training=True)
    cases = [
        (lambda x, w, b, A, E, B: ops.adalora_linear(x, w, b, A, E, B, 8.0, 3.0, 0.4, True), (A, E, B),
         lambda x, w, b, A, E, B: _adalora_oracle(x, w, b, A, E, B, 8.0, 3.0, mask)),
        (lambda x, w, b, ld, lb: ops.vera_linear(x, w, b, VA, VB, ld, lb, 0.4, True), (ld, lb),
         lambda x, w, b, ld, lb: _vera_oracle(x, w, b, VA, VB, ld, lb, mask)),
    ]  # fmt: skip
    for op, adapter, oracle in cases:
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b, *adapter)]
        leaves[1].requires_grad_(weight_trains)
        torch.manual_seed(4)
        y = op(*leaves)
        got = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy)
        leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
        want = oracle(*leaves64)
        want_grads = torch.autograd.grad(want, [t for t in leaves64 if t.requires_grad], dy.double())
        assert rel_err(y, want) < 1e-5
        assert len(got) == len(want_grads) == len(leaves) - (not weight_trains)
        for a, e in zip(got, want_grads):
            assert rel_err(a, e) < 1e-5


def test_orthogonality_norms_match_hf_peft_s_terms():
    """Σ ‖F Fᵀ − I‖_F and its gradients against autograd through HF peft's formula in float64,
    with a factor whose rows are orthonormal (norm 0: gradient 0, as autograd's norm gives)."""
    g = torch.Generator().manual_seed(7)
    factors = [torch.randn(3, 10, generator=g), torch.randn(17, 5, generator=g).T, torch.eye(2, 6)]
    leaves = [f.clone().requires_grad_(True) for f in factors]
    got = ops.orthogonality_norms(leaves)
    got_grads = torch.autograd.grad(2.5 * got, leaves)
    leaves64 = [f.double().requires_grad_(True) for f in factors]
    want = sum(torch.norm(f @ f.T - torch.eye(f.shape[0], dtype=f.dtype), p="fro") for f in leaves64)
    want_grads = torch.autograd.grad(2.5 * want, leaves64)
    assert rel_err(got, want) < 1e-6
    for a, e in zip(got_grads, want_grads):
        assert a.shape == e.shape and rel_err(a, e) < 1e-5
    assert torch.all(got_grads[2] == 0)
    with pytest.raises(ValueError, match="factors"):
        ops.orthogonality_norms([])
    with pytest.raises(ValueError, match=r"factors\[1\]"):
        ops.orthogonality_norms([factors[0], torch.ones(3)])


def test_adalora_rank_zero_is_the_base_layer():
    x, w, b, _ = _inputs(2, 7, 5, 1)
    empty_a, empty_e, empty_b = torch.zeros(0, 7), torch.zeros(0, 1), torch.zeros(5, 0)
    torch.testing.assert_close(ops.adalora_linear(x, w, b, empty_a, empty_e, empty_b, 8.0, 6.0), F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_adalora_kernel_route_matches_the_reference(dtype):
    """backend "triton": A ⊙ E · scale goes to lora_linear's Triton kernels (interpreter on CPU)."""
    require_triton()
    x, w, b, g = _inputs(2, 33, 17, 3)
    A, E, B = torch.randn(3, 33, generator=g), torch.randn(3, 1, generator=g), torch.randn(17, 3, generator=g)
    args = [t.to(dtype) for t in (x, w, b, A, E, B)]
    want = _adalora_oracle(x, w, b, A, E, B, 8.0, 6.0)
    with peft_fast.use_backend("triton"):
        got = ops.adalora_linear(*args, 8.0, 6.0)
    ref = ops.adalora_linear(*args, 8.0, 6.0)
    assert rel_err(got, want) <= max(2 * rel_err(ref, want), 1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda x, w: ops.adalora_linear(x, w, None, torch.ones(2, 6), torch.ones(3, 1), torch.ones(4, 2), 1.0, 2.0),
            "lora_E",
        ),
        (
            lambda x, w: ops.adalora_linear(x, w, None, torch.ones(2, 5), torch.ones(2, 1), torch.ones(4, 2), 1.0, 2.0),
            "lora_A",
        ),
        (
            lambda x, w: ops.adalora_linear(x, w, None, torch.ones(2, 6), torch.ones(2, 1), torch.ones(3, 2), 1.0, 2.0),
            "lora_B",
        ),
        (
            lambda x, w: ops.vera_linear(x, w, None, torch.ones(2, 5), torch.ones(4, 2), torch.ones(2), torch.ones(4)),
            "vera_A",
        ),
        (
            lambda x, w: ops.vera_linear(x, w, None, torch.ones(2, 6), torch.ones(3, 2), torch.ones(2), torch.ones(4)),
            "vera_B",
        ),
        (
            lambda x, w: ops.vera_linear(x, w, None, torch.ones(2, 6), torch.ones(4, 2), torch.ones(2), torch.ones(3)),
            "lambda_b",
        ),
        (
            lambda x, w: ops.vera_linear(
                x, w, None, torch.ones(2, 6), torch.ones(4, 2), torch.ones(2), torch.ones(4), 1.0
            ),
            "dropout_p",
        ),
    ],
)
def test_front_doors_name_the_bad_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.ones(3, 6), torch.ones(4, 6))
