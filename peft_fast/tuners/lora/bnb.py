"""LoRA on bitsandbytes' quantized linear layers (QLoRA): `Linear4bit` and `Linear8bitLt`.

Same numbers as HF peft's bnb LoRA layers over the same quantized base. The 4-bit layer reads
the packed weight through `peft_fast.quant` and runs `ops.lora_linear_4bit` (dequantize,
product, adapter); the 8-bit layer keeps bitsandbytes' int8 product and adds the adapter with
`ops.lora_add`. Merging dequantizes, adds and requantizes, as HF peft does, with its warning
about rounding. Adapters stay unquantized (fp32 unless cast), so an adapter file loads onto a
base quantized any other way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ... import ops
from ...quant import bnb as qbnb
from ...quant.bnb import layer_name as _where
from ..base import MixedBatch
from .layer import LoraLinear


class LoraLinear4bit(LoraLinear):
    """LoRA on a bitsandbytes Linear4bit (NF4 / FP4, any compute dtype and quant storage)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        lora = self.active_lora()
        if lora is None:
            return None
        A, B, scaling, p = lora
        base = self.base_layer
        state = qbnb.state_of(base, _where(self))
        compute_dtype = qbnb.compute_dtype_for(base, x)
        return ops.lora_linear_4bit(x, state, base.bias, A, B, scaling, p, self.training, compute_dtype)

    def _mixed_forward(self, x: torch.Tensor, mb: MixedBatch) -> torch.Tensor:
        raise ValueError("adapter_names (mixed adapter batches) are not supported on 4-bit layers yet")

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            qbnb.warn_rounding("Merge", 4)
            w = ops.dequantize_4bit(qbnb.state_of(self.base_layer, _where(self))) + self.delta_weight(name)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
            qbnb.replace_4bit_weight(self.base_layer, w)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            qbnb.warn_rounding("Unmerge", 4)
            w = ops.dequantize_4bit(qbnb.state_of(self.base_layer, _where(self))) - self.delta_weight(name)
            qbnb.replace_4bit_weight(self.base_layer, w)


class LoraLinear8bit(LoraLinear):
    """LoRA on a bitsandbytes Linear8bitLt: its int8 product, plus the adapter."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        lora = self.active_lora()
        if lora is None:
            return None
        A, B, scaling, p = lora
        return ops.lora_add(self.base_layer(x), x, A, B, scaling, p, self.training)

    def _mixed_forward(self, x: torch.Tensor, mb: MixedBatch) -> torch.Tensor:
        raise ValueError("adapter_names (mixed adapter batches) are not supported on 8-bit layers yet")

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            qbnb.warn_rounding("Merge", 8)
            delta = self.delta_weight(name)
            w = qbnb.dequantize_8bit(self.base_layer).to(delta.dtype) + delta
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
            qbnb.replace_8bit_weight(self.base_layer, w)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            qbnb.warn_rounding("Unmerge", 8)
            delta = self.delta_weight(name)
            qbnb.replace_8bit_weight(self.base_layer, qbnb.dequantize_8bit(self.base_layer).to(delta.dtype) - delta)


def lora_layer_for(target: nn.Module, key: str) -> LoraLinear | None:
    """The LoRA layer for a bitsandbytes quantized target, None for any other module."""
    kind = qbnb.quantized_kind(target, key)
    if kind is None:
        return None
    layer = LoraLinear4bit(target) if kind == "4bit" else LoraLinear8bit(target)
    layer._peft_key = key
    return layer
