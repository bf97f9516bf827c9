"""IA³ op: what the IA³ layers call; checks its arguments once, here, then dispatches to a
backend (see dispatch.py), which sees only validated arguments."""

from __future__ import annotations

import torch

from . import dispatch, reference
from .checks import check_ia3_args

dispatch.register("ia3_linear", "torch", reference.ia3_linear)


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ia3_l: torch.Tensor,
    feedforward: bool,
) -> torch.Tensor:
    """IA³ on a linear layer. weight: (out, in); ia3_l as HF peft stores it: (1, in) scaling
    the input of a feed-forward layer, or (out, 1) scaling the output of any other."""
    check_ia3_args(x, weight, bias, ia3_l, feedforward)
    fn = dispatch.select("ia3_linear", x, weight, bias, ia3_l, feedforward)
    return fn(x, weight, bias, ia3_l, feedforward)
