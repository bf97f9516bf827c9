"""LoHa ops: what the LoHa layers call. Each dispatches to a backend (see dispatch.py); the
"torch" backend is `lycoris_reference.py`, which computes the adapter output in the cheaper of
two forms (ΔW built in full, or the rank-r² Khatri-Rao product; see `loha_form`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch
from . import lycoris_reference as reference
from .lycoris_reference import Form, loha_delta_weight, loha_form

dispatch.register("loha_linear", "torch", reference.loha_linear)
dispatch.register("loha_conv", "torch", reference.loha_conv)

__all__ = ["loha_conv", "loha_delta_weight", "loha_form", "loha_linear"]


def loha_linear(
    x: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scaling: float,
    row_scale: torch.Tensor | None = None,
    form: Form | None = None,
) -> torch.Tensor:
    """The LoHa adapter's output (not including the base layer's): `x ΔWᵀ` with
    `ΔW = (w1a w1b) ⊙ (w2a w2b) · scaling`, each output feature times `row_scale` (rank dropout).

    x (..., in); w1a, w2a (out, r); w1b, w2b (r, in); row_scale (out,) or None. x is cast to the
    adapter's dtype and the result is in that dtype. `form` forces "factored" or "delta_weight";
    None chooses by cost."""
    fn = dispatch.select("loha_linear", x, w1a, w1b, w2a, w2b, scaling, row_scale, form)
    return fn(x, w1a, w1b, w2a, w2b, scaling, row_scale, form)


def loha_conv(
    x: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scaling: float,
    row_scale: torch.Tensor | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    groups: int,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    form: Form | None = None,
) -> torch.Tensor:
    """The LoHa adapter's output on a Conv1d/Conv2d layer (weight shape `weight_shape`, the
    base layer's stride, padding, dilation and groups); t1, t2 are the CP tensors of
    use_effective_conv2d. See `lycoris_reference.loha_conv`."""
    args = (x, w1a, w1b, w2a, w2b, scaling, row_scale, weight_shape, stride, padding, dilation, groups, t1, t2, form)
    return dispatch.select("loha_conv", *args)(*args)
