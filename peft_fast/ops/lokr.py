"""LoKr ops: what the LoKr layers call. Each dispatches to a backend (see dispatch.py); the
"torch" backend is `lycoris_reference.py`, which computes `kron(w1, w2) x` as two small
matmuls `w1 · X · w2ᵀ` (x viewed as (c, d)) where that is cheaper than building the
Kronecker product (see `lokr_form`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch
from . import lycoris_reference as reference
from .lycoris_reference import Form, lokr_delta_weight, lokr_form

dispatch.register("lokr_linear", "torch", reference.lokr_linear)
dispatch.register("lokr_conv", "torch", reference.lokr_conv)

__all__ = ["lokr_conv", "lokr_delta_weight", "lokr_form", "lokr_linear"]


def lokr_linear(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    scaling: float,
    row_scale: torch.Tensor | None = None,
    form: Form | None = None,
) -> torch.Tensor:
    """The LoKr adapter's output (not including the base layer's): `x kron(w1, w2)ᵀ · scaling`,
    each output feature times `row_scale` (rank dropout).

    w1 (a, c), w2 (b, d), x (..., c·d) -> (..., a·b). x is cast to the adapter's dtype and the
    result is in that dtype. `form` forces "factored" or "delta_weight"; None chooses by cost."""
    fn = dispatch.select("lokr_linear", x, w1, w2, scaling, row_scale, form)
    return fn(x, w1, w2, scaling, row_scale, form)


def lokr_conv(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    scaling: float,
    row_scale: torch.Tensor | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    groups: int,
    form: Form | None = None,
) -> torch.Tensor:
    """The LoKr adapter's output on a Conv1d/Conv2d layer (weight shape `weight_shape`, the
    base layer's stride, padding, dilation and groups). See `lycoris_reference.lokr_conv`."""
    args = (x, w1, w2, scaling, row_scale, weight_shape, stride, padding, dilation, groups, form)
    return dispatch.select("lokr_conv", *args)(*args)
