"""What the kernel backends' autograd shares (Triton and CUDA): the dropout seed draw, the
frozen base's gradients, and the whole autograd of the LoRA and IA³ ops (each backend's
ops of one name take the same arguments; only their bodies differ).

Every kernel op pair is `<op>_<backend>_fwd` (a torch.library custom op with autograd) and
`<op>_<backend>_bwd` (a custom op its backward calls); dW and db of the frozen base layer come
from torch (`base_grads`), only when the base requires grad.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def new_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed (a (1,) int64 tensor on `device`) drawn from torch's generator on that
    device: `torch.manual_seed` reproduces it, and every call draws a fresh one."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def base_grads(
    dy: torch.Tensor, x: torch.Tensor, need_weight: bool, need_bias: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dW, db) of `y = x Wᵀ + b` for 2-D dy (M, out) and x (M, in): `dyᵀ x` and `Σ_m dy`,
    each None where not needed."""
    dW = dy.t().mm(x) if need_weight else None
    db = dy.sum(0) if need_bias else None
    return dW, db


def register_lora_autograd(fwd_op: Any, bwd_op: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Give the LoRA custom op `fwd_op` its backward, computed by `bwd_op`.

    Every backend registers a forward op `(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
    seed) -> (y, h, keep)` (h = dropout(x)Aᵀ/(1-p), fp32, and keep, the dropout mask's keep
    bytes (kernels/dropout.py; empty without dropout), both saved for backward) and a backward
    op `(dy, x, weight, lora_A, lora_B, h, keep, scaling, dropout_p, need_dx) -> (dx, dA, dB)`,
    which reads the mask from the bytes and draws no Philox."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, _ = inputs
        ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], output[2])
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p

    def backward(ctx, dy, *_):
        x, weight, lora_A, lora_B, h, keep = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dB = bwd_op(dy, x, weight, lora_A, lora_B, h, keep, ctx.scaling, ctx.dropout_p, need[0])
        dW, db = base_grads(dy, x, need[1], need[2])
        return (dx if need[0] else None), dW, db, (dA if need[3] else None), (dB if need[4] else None), None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)


def register_ia3_autograd(fwd_op: Any, bwd_op: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give the IA³ custom op `fwd_op` its backward, computed by `bwd_op`.

    Both backends register a forward custom op `(x, weight, bias, scale, feedforward, save_z)
    -> (y, z)` and a backward op `(dy, x, weight, scale, z, feedforward) -> (dx, dscale)`;
    only those ops differ."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, scale, feedforward, save_z = inputs
        ctx.save_for_backward(x, weight, scale, output[1])
        ctx.feedforward = feedforward
        ctx.save_z = save_z

    def backward(ctx, dy, _dz):
        x, weight, scale, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        if need[3] and not ctx.feedforward and not ctx.save_z:
            raise RuntimeError("ia3_linear: the scale needs grad but its forward ran without saving x Wᵀ + b")
        dx = dscale = None
        if need[0] or need[3]:
            dx, dscale = bwd_op(dy, x, weight, scale, z, ctx.feedforward)
        dW = db = None
        if need[1] or need[2]:
            if ctx.feedforward:  # y = (x ⊙ l) Wᵀ + b
                dW, db = base_grads(dy, (x.to(scale.dtype) * scale).to(x.dtype), need[1], need[2])
            else:  # y = (x Wᵀ + b) ⊙ l
                dW, db = base_grads((dy * scale).to(dy.dtype), x, need[1], need[2])
        return dx if need[0] else None, dW, db, dscale.to(scale.dtype) if need[3] else None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
