"""IA³ layers: learned vectors that scale the output of attention projections and the input of
feed-forward projections."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ... import ops
from ..base import AdapterLayer, linear_features


class IA3Linear(AdapterLayer):
    """IA³ on nn.Linear or Conv1D. ia3_l is (1, in) for feed-forward layers, else (out, 1)."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.fan_in_fan_out = fan_in_fan_out
        self.is_feedforward = is_feedforward
        self.in_features, self.out_features = linear_features(base_layer)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool) -> None:
        w = self.base_layer.weight
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        value = torch.randn(shape, device=w.device, dtype=w.dtype if w.is_floating_point() else None)
        if init_ia3_weights:
            nn.init.constant_(value, 1.0)
        self.ia3_l[adapter_name] = nn.Parameter(value)
        self.set_adapter(self.active_adapters or [adapter_name])

    def _scale_for_weight(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to multiply the stored base weight."""
        ia3_l = self.ia3_l[adapter_name].data
        return ia3_l.T if self.fan_in_fan_out else ia3_l

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        base = self.base_layer
        for name in self._adapters_to_merge(adapter_names):
            scale = self._scale_for_weight(name)
            new_w = base.weight.data * scale.to(base.weight.dtype)
            new_b = None
            if not self.is_feedforward and base.bias is not None:
                new_b = base.bias.data * self.ia3_l[name].data.reshape(base.bias.shape).to(base.bias.dtype)
            if safe_merge and not (torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all())):
                raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
            base.weight.data = new_w
            if new_b is not None:
                base.bias.data = new_b
            self.merged_adapters.append(name)

    def _unmerge(self) -> None:
        warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=3)  # as HF peft
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            scale = self._scale_for_weight(name)
            base.weight.data = base.weight.data / (scale.to(base.weight.dtype) + 1e-8)
            if not self.is_feedforward and base.bias is not None:
                base.bias.data = base.bias.data / (self.ia3_l[name].data.reshape(base.bias.shape) + 1e-8)

    def active_scale(self) -> torch.Tensor | None:
        """The product of the active adapters' vectors, or None if none is active here."""
        names = [a for a in self.active_adapters if a in self.ia3_l]
        if not names:
            return None
        scale = self.ia3_l[names[0]]
        for a in names[1:]:
            scale = scale * self.ia3_l[a]
        return scale

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        scale = self.active_scale()
        if scale is None:
            return None
        return ops.ia3_linear(x, self.base_weight(), self.base_layer.bias, scale, self.is_feedforward)

    def extra_repr(self) -> str:
        return f"is_feedforward={self.is_feedforward}, fan_in_fan_out={self.fan_in_fan_out}"
