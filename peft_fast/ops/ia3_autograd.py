"""The autograd of the IA³ kernel ops, shared by the Triton and CUDA backends.

Both register a forward custom op `(x, weight, bias, scale, feedforward, save_z) -> (y, z)`
and a backward op `(dy, x, weight, scale, z, feedforward) -> (dx, dscale)`; only those ops
differ. dW and db (only when the frozen base requires grad) come from torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def register_ia3_autograd(fwd_op: Any, bwd_op: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give the custom op `fwd_op` its backward, computed by `bwd_op`."""

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
            if ctx.feedforward:
                scaled_x = (x.to(scale.dtype) * scale).to(x.dtype)
                dW = dy.t().mm(scaled_x) if need[1] else None
                db = dy.sum(0) if need[2] else None
            else:
                dz = (dy * scale).to(dy.dtype)
                dW = dz.t().mm(x) if need[1] else None
                db = dz.sum(0) if need[2] else None
        return dx if need[0] else None, dW, db, dscale.to(scale.dtype) if need[3] else None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
