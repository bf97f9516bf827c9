"""IA³ on bitsandbytes' quantized linear layers: `Linear4bit` and `Linear8bitLt`, as HF peft's
bnb IA³ layers compute it (x in fp32 outside autocast); merging into them is refused, as there."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ... import ops
from ...quant import bnb as qbnb
from ...quant.bnb import layer_name as _where
from .layer import IA3Linear


class _IA3Quantized(IA3Linear):
    bits = 0

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer, fan_in_fan_out=False, is_feedforward=is_feedforward)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        raise ValueError(f"Cannot merge ia3 layers when the model is loaded in {self.bits}-bit mode")

    def unmerge(self) -> None:
        raise ValueError(f"Cannot unmerge ia3 layers when the model is loaded in {self.bits}-bit mode")


class IA3Linear4bit(_IA3Quantized):
    """IA³ on a bitsandbytes Linear4bit."""

    bits = 4

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        scale = self.active_scale()
        if scale is None:
            return None
        base = self.base_layer
        state = qbnb.state_of(base, _where(self))
        x_cast = x if torch.is_autocast_enabled() else x.float()
        compute_dtype = qbnb.compute_dtype_for(base, x_cast)
        return ops.ia3_linear_4bit(x, state, base.bias, scale, self.is_feedforward, compute_dtype)


class IA3Linear8bit(_IA3Quantized):
    """IA³ on a bitsandbytes Linear8bitLt: the vector scales the int8 product's input or output
    (HF peft's bnb IA³ layer: x in fp32 outside autocast, the result kept in the base's dtype)."""

    bits = 8

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        scale = self.active_scale()
        if scale is None:
            return None
        scale = scale.flatten()
        if not torch.is_autocast_enabled() and x.dtype != torch.float32:
            x = x.float()
        if self.is_feedforward:
            return self.base_layer(x * scale)
        return self.base_layer(x) * scale


def ia3_layer_for(target: nn.Module, key: str, is_feedforward: bool) -> IA3Linear | None:
    """The IA³ layer for a bitsandbytes quantized target, None for any other module."""
    kind = qbnb.quantized_kind(target, key)
    if kind is None:
        return None
    layer = IA3Linear4bit(target, is_feedforward) if kind == "4bit" else IA3Linear8bit(target, is_feedforward)
    layer._peft_key = key
    return layer
