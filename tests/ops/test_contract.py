"""One contract per op (issue 17): every op checks its arguments once, in its front door, so the same
bad input gets the same error (type and message, naming the argument) on every backend, the torch
reference included, before any backend runs."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import require_triton

import peft_fast
from peft_fast import ops

M, K, N, R = 4, 16, 8, 2


def _t(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _lora(**over):
    args = dict(x=_t(M, K), weight=_t(N, K), bias=_t(N), lora_A=_t(R, K), lora_B=_t(N, R), scaling=2.0, dropout_p=0.0)
    args.update(over)
    return lambda: ops.lora_linear(**args)


def _ia3(ia3_l, feedforward):
    return lambda: ops.ia3_linear(_t(M, K), _t(N, K), _t(N), ia3_l, feedforward)


def _mixed(row_adapter, n_adapters=2, **over):
    args = dict(
        x=_t(M, 3, K),
        weight=_t(N, K),
        bias=None,
        lora_As=[_t(R, K)] * n_adapters,
        lora_Bs=[_t(N, R)] * n_adapters,
        scalings=[1.0] * n_adapters,
        dropout_ps=[0.0] * n_adapters,
        row_adapter=torch.tensor(row_adapter),
    )
    args.update(over)
    return lambda: ops.lora_linear_mixed(**args)


BAD = {
    "lora_A wrong in_features": (_lora(lora_A=_t(R, K + 1)), "lora_A"),
    "lora_B wrong rank": (_lora(lora_B=_t(N, R + 1)), "lora_B"),
    "dropout_p = 1": (_lora(dropout_p=1.0), "dropout_p"),
    "scaling not a number": (_lora(scaling="2"), "scaling"),
    "bias wrong shape": (_lora(bias=_t(N + 1)), "bias"),
    "x wrong in_features": (_lora(x=_t(M, K + 2)), "x"),
    "ia3_l (2, 8) on a feed-forward layer": (_ia3(_t(2, 8), True), "ia3_l"),
    "ia3_l (32, 1) on a feed-forward layer": (_ia3(_t(32, 1), True), "ia3_l"),
    "ia3_l transposed (1, 16) on an attention layer": (_ia3(_t(1, K), False), "ia3_l"),
    "row_adapter shorter than the batch": (_mixed([0, 1, -1]), "row_adapter"),
    "row_adapter longer than the batch": (_mixed([0, 1, -1, 0, 1]), "row_adapter"),
    "row_adapter index past the adapters": (_mixed([0, 1, 2, -1]), "adapter 2"),
    "row_adapter entry -2": (_mixed([0, -2, 1, -1]), "row_adapter"),
    "per-adapter lists of different lengths": (_mixed([0, 1, 0, 1], scalings=[1.0]), "scalings"),
}


def _error(case, backend):
    make, _ = BAD[case]
    with peft_fast.use_backend(backend), pytest.raises((ValueError, TypeError)) as e:
        make()()
    return type(e.value), str(e.value)


@pytest.mark.parametrize("case", list(BAD))
def test_same_bad_input_same_error_on_every_backend(case):
    kind, message = _error(case, "torch")
    assert BAD[case][1] in message, message  # names the argument at fault
    backends = ["triton"] if peft_fast.ops.dispatch.unavailable_reason("triton") is None else []
    if torch.cuda.is_available() and peft_fast.ops.dispatch.unavailable_reason("cuda") is None:
        backends.append("cuda")
    if not backends:
        require_triton()  # skips, saying why no kernel backend could be compared
    for backend in backends:
        assert _error(case, backend) == (kind, message), backend
