"""IA³ op: what the IA³ layers call; dispatches to a backend (see dispatch.py)."""

from __future__ import annotations

import torch

from . import dispatch, reference

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
    fn = dispatch.select("ia3_linear", x, weight, bias, ia3_l, feedforward)
    return fn(x, weight, bias, ia3_l, feedforward)
