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
    """(x ⊙ keep, keep) for 2-D x: keep is a uint8 0/1 mask drawn exactly as `F.dropout` draws its
    noise on CPU (`bernoulli_(1 - p)` on x's shape: one draw per element whatever the tensor's
    dtype, so the same seed gives HF peft's mask and leaves the generator where F.dropout leaves
    it); x ⊙ keep is NOT scaled by 1/(1 - p) (the caller folds that into a small factor); keep is
    for `input_grad` (None, and x itself, when dropout_p is 0).

    Why uint8: a quarter of F.dropout's fp32 noise in memory, and a product with a uint8 operand
    runs about twice as fast on CPU as one with a bool operand or a bool `masked_fill_`."""
    if dropout_p <= 0.0:
        return x, None
    keep = torch.empty_like(x, dtype=torch.uint8).bernoulli_(1.0 - dropout_p)
    return x * keep, keep


def input_grad(
    adapter_grad: torch.Tensor, keep: torch.Tensor | None, dy: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """dL/dx = dy W + adapter_grad ⊙ keep, where `adapter_grad` (M, in) is the gradient reaching
    x ⊙ keep and `keep` comes from `draw_dropout`. Computed in `adapter_grad`'s memory (masked,
    then the base's product accumulated onto it by the GEMM): no other (M, in) tensor is written."""
    if keep is not None:
        adapter_grad.mul_(keep)  # as F.dropout's backward: a dropped entry is grad * 0
    return adapter_grad.addmm_(dy, weight)
