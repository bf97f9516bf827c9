"""LoRA and DoRA on bitsandbytes' quantized linear layers (QLoRA): `Linear4bit` and `Linear8bitLt`.

Same numbers as HF peft's bnb LoRA layers over the same quantized base. The 4-bit layer reads
the packed weight through `peft_fast.quant` and runs `ops.lora_linear_4bit` (dequantize,
product, adapter); the 8-bit layer keeps bitsandbytes' int8 product and adds the adapter with
`ops.lora_add`. DoRA (`use_dora=True`) takes its norm of the dequantized weight, as HF peft's
bnb layers do: `ops.dora_linear_4bit` on 4 bits, `ops.dora_add` after the int8 product on 8 bits.
Merging dequantizes, adds and requantizes, as HF peft does, with its warning about rounding; a
DoRA adapter merged while others are merged first unmerges them and merges them again,
requantizing at each step, as HF peft's `_unmerged_base_weight` does, so the bytes are HF's.
Adapters stay unquantized (fp32 unless cast), so an adapter file loads onto a base quantized
any other way.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import ops
from ...quant import bnb as qbnb
from ...quant.bnb import layer_name as _where
from ..base import MixedBatch
from .layer import LoraLayer, LoraLinear


class _QuantizedLora:
    """Merging and DoRA over a quantized base, as HF peft's bnb layers: LoraLayer's merge and unmerge
    (with its replay of merged adapters for DoRA) on the dequantized weight, requantized at every
    step, with HF peft's rounding warning; DoRA's norm is taken of the dequantized weight and
    recomputed at every call (HF peft's default; dequantized copies are fresh tensors, which the
    eval-mode norm cache cannot key on)."""

    _bits: int
    _plain_in_adapter_dtype = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)

    def _dora_weight(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _merge_weight(self) -> torch.Tensor:
        return self._dora_weight()

    def _store_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` into the base layer with its own settings (HF peft's merge)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _warn_merge_step(self, step: str) -> None:
        qbnb.warn_rounding(step, self._bits)

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        return None

    def _plain_operands(self, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF peft's bnb layers: on 8 bits the dequantized weight in the adapter's dtype; on 4 bits
        both as they are (the addition promotes)."""
        return (weight.to(delta.dtype) if self._plain_in_adapter_dtype else weight), delta

    # HF peft's bnb merge adds the same way with or without safe_merge
    _plain_merged = LoraLayer._plain_merged


class LoraLinear4bit(_QuantizedLora, LoraLinear):
    """LoRA and DoRA on a bitsandbytes Linear4bit (NF4 / FP4, any compute dtype and quant storage)."""

    _bits = 4

    def _dora_weight(self) -> torch.Tensor:
        return ops.dequantize_4bit(qbnb.state_of(self.base_layer, _where(self)))

    def _store_weight(self, weight: torch.Tensor) -> None:
        qbnb.replace_4bit_weight(self.base_layer, weight)

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


class LoraLinear8bit(_QuantizedLora, LoraLinear):
    """LoRA and DoRA on a bitsandbytes Linear8bitLt: its int8 product, plus the adapter."""

    _bits = 8
    _plain_in_adapter_dtype = True

    def _dora_weight(self) -> torch.Tensor:
        return qbnb.dequantize_8bit(self.base_layer)

    def _store_weight(self, weight: torch.Tensor) -> None:
        qbnb.replace_8bit_weight(self.base_layer, weight)

    def _lora_forward(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float
    ) -> torch.Tensor:
        return ops.lora_add(self.base_layer(x), x, A, B, scaling, p, self.training)

    def _dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._add_adapter_output(self.base_layer(x), x, name)

    def _mixed_forward(self, x: torch.Tensor, mb: MixedBatch) -> torch.Tensor:
        raise ValueError("adapter_names (mixed adapter batches) are not supported on 8-bit layers yet")


def lora_layer_for(target: nn.Module, key: str) -> LoraLinear | None:
    """The LoRA layer for a bitsandbytes quantized target, None for any other module."""
    kind = qbnb.quantized_kind(target, key)
    if kind is None:
        return None
    layer = LoraLinear4bit(target) if kind == "4bit" else LoraLinear8bit(target)
    layer._peft_key = key
    return layer
