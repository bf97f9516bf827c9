"""peft_fast/ops/reference.py's dropout and defaults, hand-checked (tests/ops covers the math).

With W = 0, A = I and B = I the LoRA output is `scaling · dropout(x)`, so every element of
y / x is either 0 (dropped) or scaling / (1 - p) (kept): the dropout that ran, its p and
whether it ran at all can be read off exactly. Found by mutation testing (bench/mutation.sh):
defaults and the mixed-batch dropout were never exercised.
"""

from __future__ import annotations

import torch

from peft_fast.ops import reference

K, S, P = 16, 2.0, 0.25


def _identity_case(rows: int):
    x = torch.rand(rows, 5, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    return x, torch.zeros(K, K, dtype=torch.float64), torch.eye(K, dtype=torch.float64)


def _ratios(y: torch.Tensor, x: torch.Tensor) -> set[float]:
    return {round(v, 9) for v in (y / x).flatten().tolist()}


def test_lora_linear_defaults_no_dropout_and_training_on():
    x, W, I = _identity_case(3)
    assert _ratios(reference.lora_linear(x, W, None, I, I, S), x) == {S}  # dropout_p defaults to 0
    torch.manual_seed(1)
    y = reference.lora_linear(x, W, None, I, I, S, P)  # training defaults to True: dropout runs
    assert _ratios(y, x) == {0.0, round(S / (1 - P), 9)}
    assert _ratios(reference.lora_linear(x, W, None, I, I, S, P, False), x) == {S}


def test_lora_linear_mixed_dropout_per_adapter_and_off_in_eval():
    """Adapter 0 has no rows (a later adapter must still run), adapter 1 drops with p, row 1 is base only."""
    x, W, I = _identity_case(4)
    rows = torch.tensor([1, -1, 1, 1])
    args = (x, W, None, [I, I], [I, I], [5.0, S], [0.0, P], rows)
    torch.manual_seed(2)
    y = reference.lora_linear_mixed(*args)  # training defaults to True
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert _ratios(y[[0, 2, 3]], x[[0, 2, 3]]) == {0.0, round(S / (1 - P), 9)}
    dropped = (y[[0, 2, 3]] == 0).double().mean().item()
    assert abs(dropped - P) < 0.1  # 240 elements: 0.25 +- 4.5 sigma
    y_eval = reference.lora_linear_mixed(*args, training=False)
    assert _ratios(y_eval[[0, 2, 3]], x[[0, 2, 3]]) == {S} and torch.equal(y_eval[1], y[1])
    # p = 0 in training: no dropout at all
    y0 = reference.lora_linear_mixed(x, W, None, [I], [I], [S], [0.0], torch.tensor([0, 0, 0, 0]))
    assert _ratios(y0, x) == {S}
