"""Edges of ops/adalora.py and ops/vera.py that mutation testing found unpinned
(bench/results/mutation-ops2-20261129.md): a fully pruned AdaLoRA layer in eval draws no
dropout mask, a bias that trains alone, the shape messages, VeRA's output dtype with mixed
dtypes and a frozen input. Oracles: float64 formulas (HF peft's SVDLinear and VeRA Linear),
torch's RNG state, hand-written shapes."""

from __future__ import annotations

import pytest
import torch

from peft_fast import ops


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_pruned_adalora_layer_in_eval_draws_no_mask():
    """r = 0 and training=False: the base output, and the random stream untouched (HF peft's
    dropout is the identity in eval)."""
    x, W, b = _rand(3, 4), _rand(5, 4, seed=1), _rand(5, seed=2)
    empty_a, empty_e, empty_b = torch.zeros(0, 4), torch.zeros(0, 1), torch.zeros(5, 0)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    y = ops.adalora_linear(x, W, b, empty_a, empty_e, empty_b, 1.0, 0.0, 0.4, False)
    assert torch.equal(torch.get_rng_state(), state)
    assert _rel(y, x.double() @ W.double().T + b.double()) < 1e-6


def test_adalora_bias_trains_alone():
    """Only the bias requires grad: its gradient is dy summed over the rows."""
    x, W = _rand(2, 3, 4), _rand(5, 4, seed=1)
    b = _rand(5, seed=2).requires_grad_(True)
    A, E, B = _rand(2, 4, seed=3), _rand(2, 1, seed=4), _rand(5, 2, seed=5)
    y = ops.adalora_linear(x, W, b, A, E, B, 0.5, 2.0)
    dy = _rand(2, 3, 5, seed=6)
    y.backward(dy)
    want = x.double() @ W.double().T + b.double() + (x.double() @ (A * E).double().T @ B.double().T) * 0.5 / (2 + 1e-5)
    assert _rel(y, want) < 1e-5
    assert b.grad is not None and _rel(b.grad, dy.sum((0, 1))) < 1e-6


def test_adalora_names_the_bad_lora_A_shape():
    x, W = _rand(2, 4), _rand(5, 4, seed=1)
    E, B = _rand(2, 1), _rand(5, 2)
    with pytest.raises(ValueError, match=r"^lora_A must be \(r, 4\), got \(2, 3\)$"):
        ops.adalora_linear(x, W, None, _rand(2, 3), E, B, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"^lora_A must be \(r, 4\), got \(\)$"):
        ops.adalora_linear(x, W, None, [[0.0] * 4] * 2, E, B, 1.0, 2.0)


def _vera64(x, W, b, A, B, ld, lb):
    in_f, out_f = W.shape[1], W.shape[0]
    x_, W_, A_, B_, ld_, lb_ = (t.double() for t in (x, W, A, B, ld, lb))
    y = x_ @ W_.T + lb_ * ((ld_ * (x_ @ A_[:, :in_f].T)) @ B_[:out_f].T)
    return y if b is None else y + b.double()


def test_vera_mixed_dtypes_return_the_base_dtype():
    """bf16 base, fp32 vectors and projections (HF peft's composition path): bf16 out, the float64 value."""
    x, W = _rand(3, 4, dtype=torch.bfloat16), _rand(5, 4, seed=1, dtype=torch.bfloat16)
    A, B = _rand(2, 6, seed=2), _rand(7, 2, seed=3)
    ld, lb = _rand(2, seed=4), _rand(5, seed=5)
    y = ops.vera_linear(x, W, None, A, B, ld, lb)
    assert y.dtype == torch.bfloat16 and _rel(y, _vera64(x, W, None, A, B, ld, lb)) < 2e-2


def test_vera_trains_the_vectors_with_a_frozen_input():
    """x needs no gradient (a first layer's input): λ_d and λ_b get theirs, against float64."""
    x, W, b = _rand(3, 4), _rand(5, 4, seed=1), _rand(5, seed=6)
    A, B = _rand(2, 6, seed=2), _rand(7, 2, seed=3)
    ld, lb = _rand(2, seed=4).requires_grad_(True), _rand(5, seed=5).requires_grad_(True)
    y = ops.vera_linear(x, W, b, A, B, ld, lb)
    ld_, lb_ = (t.detach().double().requires_grad_(True) for t in (ld, lb))
    want = _vera64(x, W, b, A, B, ld_, lb_)
    dy = _rand(3, 5, seed=7)
    y.backward(dy)
    want.backward(dy.double())
    assert _rel(y, want) < 1e-5
    assert _rel(ld.grad, ld_.grad) < 1e-5 and _rel(lb.grad, lb_.grad) < 1e-5
