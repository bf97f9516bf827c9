"""X-LoRA on a LoRA layer: the layer's experts mixed per token by the classifier's scalings.

`XLoraLinearLayer` takes over one `LoraLinear`'s forward (as HF peft does, the LoRA layer and
its parameters and state-dict keys stay as they are). Its forward depends on the pass the
model is in (`XLoraModel._pass`):

* scaling pass (the first, under no_grad): every scaling equals `scaling_pass_value`; when
  that is 0 the experts add nothing and are skipped entirely (the base layer alone runs);
* real pass: the classifier's scalings for this layer;
* outside an X-LoRA forward (the LoRA model called directly): every expert at weight 1, as HF
  peft's layer does when no scalings are given.

Top-k (and softmax over the top k) follow HF peft's `get_maybe_topk_scalings`; then all
experts run through `ops.xlora_linear`: one stacked shrink, one stacked expand (the stack
is the mixed-batch `LoraStackCache`). Under top-k, experts that no token of the batch picked
are left out of the stack, so their rank slices cost nothing (unless the experts train: they
then get HF peft's zero gradients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ... import ops
from ...ops.mixed_batch import LoraStackCache, StackedLora
from ..lora.layer import LoraLinear

if TYPE_CHECKING:  # pragma: no cover
    from .model import XLoraModel


def topk_scalings(scalings: torch.Tensor, top_k: int | None, softmax_topk: bool) -> torch.Tensor:
    """HF peft's top-k of one layer's scalings (..., n): all but the k largest per token set to
    0; then, with `softmax_topk`, a softmax over the non-zero ones."""
    if top_k is not None:
        _, idx = torch.topk(scalings, k=top_k, dim=-1)
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, idx, True)
        scalings = scalings * mask.to(scalings.dtype)
    if softmax_topk:
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings


class XLoraLinearLayer:
    """The X-LoRA forward of one LoraLinear (see the module docstring). Not a module: the
    LoraLinear stays the module, this object only replaces its `forward`."""

    def __init__(self, model: XLoraModel, target: LoraLinear, layer_number: int, experts: list[str]) -> None:
        self.model = model
        self.target = target
        self.layer_number = layer_number
        self.experts = experts
        self.stack = LoraStackCache()
        # The experts' weights (the X-LoRA model never adds or removes experts of a layer).
        self._As = [target.lora_A[n].weight for n in experts]
        self._Bs = [target.lora_B[n].weight for n in experts]
        self._params = self._As + self._Bs
        self._dropout_ps = [target.dropout_p(n) for n in experts]
        self._stack_key: tuple | None = None  # see _stack
        self._last_stack: StackedLora | None = None
        self._coeff_key: tuple | None = None
        self._coeff = torch.empty(0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        target = self.target
        state = self.model
        if state.disabled or target.merged:
            return target.base_layer(x, *args, **kwargs)
        config = state.xlora_config
        mode = state._pass
        n = len(self.experts)
        if mode is None:
            weights = torch.ones((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
            global_weight = 1.0
        else:
            if mode == "scaling":
                value = state.internal_xlora_classifier.override_scaling_pass_value
                if value == 0:
                    return target.base_layer(x, *args, **kwargs)
                weights = torch.full((*x.shape[:-1], n), float(value), dtype=state.classifier_dtype, device=x.device)
            else:
                weights = state.internal_xlora_scalings[:, :, self.layer_number, :]
            weights = topk_scalings(weights, config.top_k_lora, config.enable_softmax_topk)
            global_weight = config.global_scaling_weight
        return self._mix(x, weights, global_weight)

    def _mix(self, x: torch.Tensor, weights: torch.Tensor, global_weight: float) -> torch.Tensor:
        target = self.target
        names = self.experts
        include = list(range(len(names)))
        trains_experts = torch.is_grad_enabled() and any(p.requires_grad for p in self._params)
        if self.model.xlora_config.top_k_lora is not None and not trains_experts:
            # Experts no token of this batch picked: out of the stack (one host read per layer).
            # Not while the experts train: as in HF peft, unpicked experts then get zero
            # gradients (an optimizer still steps them: weight decay, moments), not none.
            used = (weights != 0).reshape(-1, len(names)).any(0).tolist()
            include = [i for i in include if used[i]]
            if not include:
                return target.base_layer(x)
            if len(include) < len(names):
                weights = weights.index_select(-1, torch.tensor(include, device=weights.device))
        scalings = [target.scaling[n] for n in names]
        dropout_ps = self._dropout_ps
        stack = self._stack(scalings, dropout_ps, include)
        coeff = self._coefficients(tuple(scalings[i] * global_weight for i in include), weights)
        return ops.xlora_linear(
            x,
            target.base_weight(),
            target.base_layer.bias,
            stack.A,
            stack.B,
            [stack.ranks[i] for i in include],
            weights * coeff,
            [dropout_ps[i] for i in include],
            target.training,
        )

    def _stack(self, scalings: list[float], dropout_ps: list[float], include: list[int]) -> StackedLora:
        """The stack of the experts `include` from the layer's LoraStackCache. Frozen experts
        (the default) skip even the cache's key check while no expert weight changed in place
        or moved (their version counters and storage are compared first, a cheaper check)."""
        params = self._params
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.stack.get(self._As, self._Bs, scalings, dropout_ps, include)
        key = (include, [(p._version, p.data_ptr()) for p in params], scalings, dropout_ps)
        if key != self._stack_key:
            self._last_stack = self.stack.get(self._As, self._Bs, scalings, dropout_ps, include)
            self._stack_key = key
        assert self._last_stack is not None
        return self._last_stack

    def _coefficients(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        """The experts' constant factors (alpha / r · global weight) as a tensor, kept between calls."""
        key = (values, like.dtype, like.device)
        if self._coeff_key != key:
            self._coeff = torch.tensor(values, dtype=like.dtype, device=like.device)
            self._coeff_key = key
        return self._coeff
