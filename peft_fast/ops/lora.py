"""LoRA ops: what the LoRA layers call. Each checks its arguments once, here (the same error
for the same bad input whatever the backend), then dispatches to a backend (see dispatch.py),
which sees only validated arguments; the "torch" backend is `reference.py`. Kernel backends
register themselves under the same op names and signatures."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch, reference
from .checks import check_embedding_result, check_lora_args, check_mixed_call
from .mixed_batch import LoraStackCache, RowGroups, group_rows

dispatch.register("lora_linear", "torch", reference.lora_linear)
dispatch.register("lora_embedding", "torch", reference.lora_embedding)
dispatch.register("lora_linear_mixed", "torch", reference.lora_linear_mixed)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ`.

    x: (..., in); weight: (out, in) as nn.Linear stores it; bias: (out,) or None;
    lora_A: (r, in); lora_B: (out, r). Returns (..., out) in the base output's dtype.
    Dropout applies only when `training` and `dropout_p > 0`.
    """
    check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    fn = dispatch.select("lora_linear", x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    return fn(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)


def lora_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    *,
    result: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embedding lookup plus its LoRA update; A: (r, num_embeddings), B: (dim, r). With `result`
    (the lookup's shape, e.g. the output with other adapters applied) the update is added to it
    instead of to the lookup."""
    lookup = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    if result is not None:
        check_embedding_result(result, input_ids, weight)
        return reference.lora_embedding(input_ids, weight, lora_A, lora_B, scaling, *lookup, result=result)
    fn = dispatch.select("lora_embedding", input_ids, weight, lora_A, lora_B, scaling)
    return fn(input_ids, weight, lora_A, lora_B, scaling, *lookup)


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: torch.Tensor,
    training: bool = True,
    *,
    plan: RowGroups | None = None,
    stack: LoraStackCache | None = None,
) -> torch.Tensor:
    """LoRA for a batch that mixes adapters: row i of x (dim 0) uses adapter
    `row_adapter[i]`, an index into the lists, or the base layer alone where it is -1.

    `plan` (the batch's `RowGroups`, `ops.mixed_batch.group_rows`, built once per batch from
    host-side adapter indices; it must group `row_adapter`'s values) and `stack` (a per-layer
    cache of the stacked adapter weights) let every backend skip per-call work: with `plan`
    no backend reads row_adapter back to the host, so the call has no device sync and
    compiles without a graph break. They never change the result."""
    groups = plan if plan is not None else group_rows(row_adapter, x.device)
    check_mixed_call(x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, row_adapter, groups, same_dtype=False)
    hints = {"plan": groups, "stack": stack}
    fn = dispatch.select(
        "lora_linear_mixed", x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, row_adapter, training, **hints
    )
    return fn(x, weight, bias, lora_As, lora_Bs, scalings, dropout_ps, row_adapter, training, **hints)
