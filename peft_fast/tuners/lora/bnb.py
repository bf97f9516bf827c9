"""LoRA and DoRA on bitsandbytes' quantized linear layers (QLoRA): `Linear4bit` and `Linear8bitLt`.

Same numbers as HF peft's bnb LoRA layers over the same quantized base. The 4-bit layer reads
the packed weight through `peft_fast.quant` and runs `ops.lora_linear_4bit` (dequantize,
product, adapter); the 8-bit layer keeps bitsandbytes' int8 product and adds the adapter with
`ops.lora_add`. DoRA (`use_dora=True`) takes its norm of the dequantized weight, as HF peft's
bnb layers do: `ops.dora_linear_4bit` on 4 bits, `ops.dora_add` after the int8 product on 8 bits.
Merging dequantizes, adds and requantizes, as HF peft does, with its warning
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


class _QuantizedDora:
    """DoRA over a quantized base, as HF peft's bnb layers: the norm is taken of the dequantized
    weight, recomputed at every call (HF peft's default; dequantized copies are fresh tensors,
    which the eval-mode norm cache cannot key on)."""

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        return None

    def _dora_merge(self, name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """HF peft's DoRA `merge_safe` on the dequantized `weight`: m/‖W₀ + ΔW‖ ⊙ (W + ΔW), with
        W₀ the weight without the adapters merged before (taken out of a copy of `weight`); the
        norm is kept for unmerge."""
        base = weight
        for merged in reversed(self.merged_adapters):
            base = self._unmerged(base, merged)
        norm = torch.linalg.norm(base + delta, dim=1).to(base.dtype).detach()
        self._dora_merge_norms[name] = norm
        return (self._dora_factor(name, norm) * (weight + delta)).to(weight.dtype)

    def _merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name)
        if self.use_dora.get(name, False):
            return self._dora_merge(name, weight.to(delta.dtype), delta)
        return weight.to(delta.dtype) + delta

    def _unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        weight = self._unmerged(weight.to(self.delta_weight(name).dtype), name)
        self._dora_merge_norms.pop(name, None)
        return weight


class LoraLinear4bit(_QuantizedDora, LoraLinear):
    """LoRA and DoRA on a bitsandbytes Linear4bit (NF4 / FP4, any compute dtype and quant storage)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)

    def _dora_weight(self) -> torch.Tensor:
        return ops.dequantize_4bit(qbnb.state_of(self.base_layer, _where(self)))

    def _lora_forward(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float
    ) -> torch.Tensor:
        base = self.base_layer
        state = qbnb.state_of(base, _where(self))
        compute_dtype = qbnb.compute_dtype_for(base, x)
        return ops.lora_linear_4bit(x, state, base.bias, A, B, scaling, p, self.training, compute_dtype)

    def _dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        state = qbnb.state_of(base, _where(self))
        A, B = self.lora_weights(name)
        magnitude = self.lora_magnitude_vector[name].weight
        p, dtype = self.dropout_p(name), qbnb.compute_dtype_for(base, x)
        return ops.dora_linear_4bit(x, state, base.bias, A, B, magnitude, self.scaling[name], p, self.training, dtype)

    def _mixed_forward(self, x: torch.Tensor, mb: MixedBatch) -> torch.Tensor:
        raise ValueError("adapter_names (mixed adapter batches) are not supported on 4-bit layers yet")

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            qbnb.warn_rounding("Merge", 4)
            w = self._merged_weight(name, self._dora_weight())
            if safe_merge and not torch.isfinite(w).all():
                self._dora_merge_norms.pop(name, None)
                raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
            qbnb.replace_4bit_weight(self.base_layer, w)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            qbnb.warn_rounding("Unmerge", 4)
            w = self._unmerged_weight(name, self._dora_weight())
            self.merged_adapters.pop()
            qbnb.replace_4bit_weight(self.base_layer, w)


class LoraLinear8bit(_QuantizedDora, LoraLinear):
    """LoRA and DoRA on a bitsandbytes Linear8bitLt: its int8 product, plus the adapter."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)

    def _dora_weight(self) -> torch.Tensor:
        return qbnb.dequantize_8bit(self.base_layer)

    def _lora_forward(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float
    ) -> torch.Tensor:
        return ops.lora_add(self.base_layer(x), x, A, B, scaling, p, self.training)

    def _dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._add_adapter_output(self.base_layer(x), x, name)

    def _mixed_forward(self, x: torch.Tensor, mb: MixedBatch) -> torch.Tensor:
        raise ValueError("adapter_names (mixed adapter batches) are not supported on 8-bit layers yet")

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            qbnb.warn_rounding("Merge", 8)
            w = self._merged_weight(name, self._dora_weight())
            if safe_merge and not torch.isfinite(w).all():
                self._dora_merge_norms.pop(name, None)
                raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
            qbnb.replace_8bit_weight(self.base_layer, w)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            qbnb.warn_rounding("Unmerge", 8)
            w = self._unmerged_weight(name, self._dora_weight())
            self.merged_adapters.pop()
            qbnb.replace_8bit_weight(self.base_layer, w)


def lora_layer_for(target: nn.Module, key: str) -> LoraLinear | None:
    """The LoRA layer for a bitsandbytes quantized target, None for any other module."""
    kind = qbnb.quantized_kind(target, key)
    if kind is None:
        return None
    layer = LoraLinear4bit(target) if kind == "4bit" else LoraLinear8bit(target)
    layer._peft_key = key
    return layer
