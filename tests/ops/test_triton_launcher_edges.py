"""Edges of the Triton launchers (peft_fast/ops/triton/) that mutation testing found unpinned
(bench/results/mutation-ops2-20261129.md): each `supports` names the argument it refuses, and
the mixed-batch path choice gets the tokens per batch row. Oracles: the argument names and
hand-counted shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import require_triton

import peft_fast

pytest.importorskip("triton")
from peft_fast.ops.triton import device_reason, dora, loha, lokr, lora, mixed, xlora  # noqa: E402 (needs triton)

F64 = torch.float64


def _t(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype)


def test_lora_supports_names_the_refused_argument():
    for name in ("x", "weight", "bias", "lora_A", "lora_B"):
        args = {"x": _t(2, 4), "weight": _t(3, 4), "bias": _t(3), "lora_A": _t(2, 4), "lora_B": _t(3, 2)}
        args[name] = args[name].to(F64)
        why = lora.supports(**args, scaling=1.0)
        assert why is not None and why.startswith(f"{name} has dtype torch.float64"), (name, why)


def test_lora_supports_refuses_dropout_past_int32_by_default():
    """training defaults to True: dropout on more than 2**31 - 1 elements is refused (an expanded x,
    no memory behind it)."""
    require_triton()
    x = _t(1, 1).expand(2**31, 1)
    with peft_fast.use_backend("triton"):
        why = lora.supports(x, _t(3, 1), None, _t(2, 1), _t(3, 2), 1.0, 0.1)
        assert why == f"dropout on {2**31} elements exceeds the kernels' int32 mask numbering"
        assert lora.supports(x, _t(3, 1), None, _t(2, 1), _t(3, 2), 1.0, 0.1, training=False) != why


def test_dora_supports_refuses_dropout_past_int32():
    require_triton()
    x = _t(1, 1).expand(2**31, 1)
    with peft_fast.use_backend("triton"):
        why = dora.supports(x, _t(3, 1), None, _t(2, 1), _t(3, 2), _t(3), 1.0, 0.1, norm=_t(3))
        assert why == f"dropout on {2**31} elements exceeds the kernels' int32 mask numbering"


def test_loha_supports_names_a_refused_row_scale():
    w1a, w1b = _t(4, 2), _t(2, 3)
    why = loha.supports(_t(2, 3), w1a, w1b, w1a, w1b, 1.0, row_scale=_t(4, dtype=F64))
    assert why is not None and why.startswith("row_scale has dtype torch.float64")


def test_lokr_supports_refuses_non_2d_factors_with_its_message():
    require_triton()
    with peft_fast.use_backend("triton"):
        assert lokr.supports(_t(2, 6), _t(2, 3, 1), _t(2, 2), 1.0) == "w1 and w2 must be 2-D"


def test_mixed_supports_names_a_refused_weight():
    why = mixed.supports(_t(2, 4), _t(3, 4, dtype=F64), None, [_t(2, 4)], [_t(3, 2)], [1.0], [0.0], None)
    assert why is not None and why.startswith("weight has dtype torch.float64")


def test_xlora_supports_names_a_refused_lora_A():
    why = xlora.supports(_t(2, 4), _t(3, 4), None, _t(2, 4, dtype=F64), _t(3, 2), [2], _t(2, 1), [0.0])
    assert why is not None and why.startswith("lora_A has dtype torch.float64")


def test_tokens_per_row_is_the_product_of_the_middle_dimensions():
    assert mixed.tokens_per_row(_t(4, 8)) == 1
    assert mixed.tokens_per_row(_t(4, 3, 8)) == 3
    assert mixed.tokens_per_row(_t(4, 3, 5, 8)) == 15


def test_mixed_path_choice_gets_the_tokens_per_row(monkeypatch):
    """With no path given, choose_path sees the batch's tokens per row (1 for decode-shaped x)."""
    require_triton()
    seen = []
    choose = mixed.choose_path
    monkeypatch.setattr(mixed, "choose_path", lambda groups, T: seen.append(T) or choose(groups, T))
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g)
    A, B = torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g)
    ra = torch.tensor([0, -1, 0])
    with peft_fast.use_backend("triton"):
        y = mixed.lora_linear_mixed(x, W, None, [A], [B], [0.5], [0.0], ra)
    want = x.double() @ W.double().T + 0.5 * (ra == 0).double()[:, None] * (x.double() @ A.double().T @ B.double().T)
    assert seen == [1]
    assert ((y.double() - want).norm() / want.norm()).item() < 1e-5


def test_device_reason_refuses_a_device_that_is_neither_cuda_nor_cpu():
    assert device_reason({"x": torch.empty(2, 3, device="meta")}) == "device meta is neither CUDA nor CPU"
