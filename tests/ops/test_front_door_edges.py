"""Edges of the op front doors (`peft_fast.ops.*`) and of dispatch that the backend tests do not
reach: the exact error messages the checks promise, the documented defaults (`training=True`),
the hints a front door hands its backend, and dispatch's shape classes and module registry.

Oracles: the reference ops in float64 under the same torch seed, hand-computed shape classes
and the messages the docstrings promise."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import require_triton

import peft_fast
from peft_fast import ops
from peft_fast.ops import dispatch, dora_reference, reference
from peft_fast.ops.mixed_batch import LoraStackCache


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- error messages ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "feedforward,shape,expected",
    [(True, (3, 1), r"\(1, 8\) for a feed-forward layer, got \(3, 1\)"), (False, (1, 8), r"\(3, 1\) for a non-feed")],
)
def test_ia3_shape_error_names_the_layer_kind_and_the_shape_given(feedforward, shape, expected):
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"ia3_l must have shape " + expected):
        ops.ia3_linear(x, w, None, torch.ones(shape), feedforward)


def test_dora_magnitude_and_weight_errors_name_what_was_given():
    w, A, B = torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 2)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"magnitude must be a \(3,\) tensor .*, got \(5,\)$"):
        ops.dora_linear(x, w, None, A, B, torch.ones(5), 1.0)
    with pytest.raises(ValueError, match=r"magnitude must be a \(3,\) tensor .*, got list$"):
        ops.dora_linear(x, w, None, A, B, [1.0, 1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match=r"weight must be \(out_features, in_features\), got torch.Size\(\[8\]\)"):
        ops.dora_weight_norm(torch.randn(8), A, B, 1.0)


# -- documented defaults ---------------------------------------------------------------------------
def test_lora_linear_mixed_applies_dropout_by_default():
    """`training` defaults to True: the same draws as the float64 reference in training mode."""
    x, w, b = _randn(6, 8, seed=1), _randn(5, 8, seed=2), _randn(5, seed=3)
    As, Bs = [_randn(2, 8, seed=4), _randn(3, 8, seed=5)], [_randn(5, 2, seed=6), _randn(5, 3, seed=7)]
    rows = torch.tensor([0, 1, -1, 1, 0, 0])
    args = (x, w, b, As, Bs, [0.5, 2.0], [0.5, 0.25], rows)
    with peft_fast.use_backend("torch"):
        torch.manual_seed(0)
        got = ops.lora_linear_mixed(*args)
    torch.manual_seed(0)
    expected = reference.lora_linear_mixed(*args, training=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, reference.lora_linear_mixed(*args, training=False))


def test_dora_linear_applies_dropout_by_default():
    x, w, b = _randn(6, 8, seed=1), _randn(5, 8, seed=2), _randn(5, seed=3)
    A, B, m = _randn(2, 8, seed=4), _randn(5, 2, seed=6), _randn(5, seed=8).abs() + 0.5
    with peft_fast.use_backend("torch"):
        torch.manual_seed(0)
        got = ops.dora_linear(x, w, b, A, B, m, 0.7, 0.5)
    norm = dora_reference.dora_weight_norm(w, A, B, 0.7)
    torch.manual_seed(0)
    expected = dora_reference.dora_linear(x, w, b, A, B, m, 0.7, 0.5, True, norm=norm)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, dora_reference.dora_linear(x, w, b, A, B, m, 0.7, 0.5, False, norm=norm))


# -- hints handed to the backend -------------------------------------------------------------------
def test_lora_linear_mixed_hands_its_stack_cache_to_the_kernel_backend():
    require_triton()
    x, w = torch.randn(4, 16), torch.randn(16, 16)
    As, Bs = [torch.randn(16, 16), torch.randn(16, 16)], [torch.randn(16, 16), torch.randn(16, 16)]
    rows = torch.tensor([1, 0, 0, 1])
    cache = LoraStackCache()
    with peft_fast.use_backend("triton"), torch.no_grad():
        got = ops.lora_linear_mixed(x, w, None, As, Bs, [1.0, 0.5], [0.0, 0.0], rows, False, stack=cache)
    assert cache._stack is not None  # the backend filled the caller's cache
    expected = reference.lora_linear_mixed(
        x.double(), w.double(), None, [a.double() for a in As], [b.double() for b in Bs], [1.0, 0.5], [0.0, 0.0], rows
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


# -- dispatch ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,expected",
    [
        ((5,), "tokens<=256"),  # a 1-D input is one token
        ((256, 4), "tokens<=256"),
        ((257, 4), "tokens<=4096"),
        ((2, 2048, 4), "tokens<=4096"),
        ((4097, 1), "tokens>4096"),
        ((), "any"),
    ],
)
def test_shape_class_buckets_tokens_at_the_bounds(shape, expected):
    assert dispatch.shape_class(torch.empty(shape, device="meta")) == expected


def test_auto_order_without_entries_is_the_default_order():
    x = torch.empty(3, 4, device="meta")
    assert dispatch.auto_order("lora_linear", x, table={}) == dispatch.AUTO_DEFAULT["lora_linear"]
    assert dispatch.auto_order("some_op", x, table={"entries": {}}) == dispatch.FALLBACK_ORDER


def test_first_tensor_is_the_first_argument_with_device_and_dtype():
    t = torch.zeros(1)
    assert dispatch._first_tensor((1, None, "x", t, torch.ones(2))) is t
    assert dispatch._first_tensor((1, "x")) is None


def test_register_backend_module_adds_each_module_once_in_order(monkeypatch):
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "cuda", ("a.b",))
    monkeypatch.delitem(dispatch._BACKEND_MODULES, "new_backend", raising=False)
    dispatch.register_backend_module("cuda", "c.d")
    dispatch.register_backend_module("cuda", "a.b")
    dispatch.register_backend_module("cuda", "c.d")
    assert dispatch._BACKEND_MODULES["cuda"] == ("a.b", "c.d")
    dispatch.register_backend_module("new_backend", "e.f")
    assert dispatch._BACKEND_MODULES["new_backend"] == ("e.f",)
    monkeypatch.delitem(dispatch._BACKEND_MODULES, "new_backend")
