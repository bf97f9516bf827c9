"""What the CPU autograd Functions of AdaLoRA and VeRA (`adalora.py`, `vera.py`) share: a frozen
base linear layer plus an adapter on dropout(x), with HF peft's dropout mask and the adapter's
input gradient added into the base's in one `addmm`."""

from __future__ import annotations

import torch

__all__ = ["applies", "draw_dropout", "input_grad"]


def applies(weight: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> bool:
    """True when a Function of this kind can take the call: the base weight is frozen and every
    tensor shares one dtype and one device (anything else runs plain autograd)."""
    return not weight.requires_grad and len({t.dtype for t in tensors}) == 1 and len({t.device for t in tensors}) == 1


def draw_dropout(x: torch.Tensor, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x ⊙ keep, dropped) for 2-D x: keep is drawn exactly as `F.dropout` draws it on CPU
    (`bernoulli_(1 - p)` on x's shape and dtype), so the same seed gives HF peft's mask; x ⊙ keep
    is NOT scaled by 1/(1 - p) (the caller folds that into a small factor); `dropped` is the bool
    complement of keep, for `input_grad` (None, and x itself, when dropout_p is 0)."""
    if dropout_p <= 0.0:
        return x, None
    noise = torch.empty_like(x).bernoulli_(1.0 - dropout_p)
    dropped = noise == 0  # bool: masked_fill_ in backward (a multiply by a bool mask would cast it to x's dtype)
    return x * noise, dropped


def input_grad(
    adapter_grad: torch.Tensor, dropped: torch.Tensor | None, dy: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """dL/dx = dy W + adapter_grad ⊙ keep, where `adapter_grad` (M, in) is the gradient reaching
    x ⊙ keep (overwritten in place) and `dropped` comes from `draw_dropout`."""
    if dropped is not None:
        adapter_grad.masked_fill_(dropped, 0.0)
    return torch.addmm(adapter_grad, dy, weight)
