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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ... import ops
from ...quant import bnb as qbnb
from ...quant.bnb import layer_name as _where
from ..base import MixedBatch
from .layer import LoraLinear


class _QuantizedLora:
    """Merging and DoRA over a quantized base, as HF peft's bnb layers: the weight is dequantized,
    changed and requantized at every step; DoRA's norm is taken of the dequantized weight and
    recomputed at every call (HF peft's default; dequantized copies are fresh tensors, which the
    eval-mode norm cache cannot key on)."""

    _bits: int
    _plain_in_adapter_dtype = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)
        # the dequantized base without the merged adapters while a DoRA merge replays them
        self._replay_base: torch.Tensor | None = None

    def _dora_weight(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _requantize(self, weight: torch.Tensor) -> None:
        """Quantize `weight` into the base layer with its own settings (HF peft's merge)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        return None

    @contextmanager
    def _base_without_merged(self, safe_merge: bool) -> Iterator[torch.Tensor]:
        """HF peft's `_unmerged_base_weight` on a quantized base: the merged adapters are unmerged
        for real (dequantize, undo, requantize), a copy of the dequantized weight is yielded, and
        they are merged again (requantized) on exit. Merges during that replay get the same copy."""
        if self._replay_base is not None:
            yield self._replay_base
            return
        merged = list(self.merged_adapters)
        try:
            if merged:
                self.unmerge()
            self._replay_base = self._dora_weight().detach().clone()
            yield self._replay_base
        finally:
            try:
                to_merge = [n for n in merged if n not in self.merged_adapters]
                if to_merge:
                    self.merge(safe_merge=safe_merge, adapter_names=to_merge)
            finally:
                self._replay_base = None

    def _plain(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """`weight` in the dtype HF peft adds a plain LoRA delta in: the adapter's on 8 bits; on 4 bits
        the dequantized one, promoted by the addition."""
        return weight.to(delta.dtype) if self._plain_in_adapter_dtype else weight

    def _merged_weight(self, name: str, safe_merge: bool) -> torch.Tensor:
        """The dequantized weight with adapter `name` merged in (HF peft's bnb `merge`). DoRA (HF's
        `merge_safe`): m / ‖W₀ + ΔW‖ ⊙ (W + ΔW) with W₀ the base without the merged adapters (see
        `_base_without_merged`) and W the weight after that replay; the norm is kept for unmerge."""
        delta = self.delta_weight(name)
        if not self.use_dora.get(name, False):
            return self._plain(self._dora_weight(), delta) + delta
        with self._base_without_merged(safe_merge) as base:
            norm = torch.linalg.norm(base + delta, dim=1).detach()
        self._dora_merge_norms[name] = norm
        weight = self._dora_weight()  # requantized by the replay
        return (self._dora_factor(name, norm) * (weight + delta)).to(weight.dtype)

    def _unmerged_weight(self, name: str) -> torch.Tensor:
        """The dequantized weight with adapter `name` taken out (HF peft's bnb `unmerge`)."""
        delta = self.delta_weight(name)
        weight = self._dora_weight()
        if not self.use_dora.get(name, False):
            return self._plain(weight, delta) - delta
        factor = self._dora_factor(name, self._dora_merge_norms.pop(name))
        return (weight / factor - delta).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        for name in self._adapters_to_merge(adapter_names):
            qbnb.warn_rounding("Merge", self._bits)
            w = self._merged_weight(name, safe_merge)
            if safe_merge and not torch.isfinite(w).all():
                self._dora_merge_norms.pop(name, None)
                raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
            self._requantize(w)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            qbnb.warn_rounding("Unmerge", self._bits)
            w = self._unmerged_weight(self.merged_adapters[-1])
            self.merged_adapters.pop()
            self._requantize(w)


class LoraLinear4bit(_QuantizedLora, LoraLinear):
    """LoRA and DoRA on a bitsandbytes Linear4bit (NF4 / FP4, any compute dtype and quant storage)."""

    _bits = 4

    def _dora_weight(self) -> torch.Tensor:
        return ops.dequantize_4bit(qbnb.state_of(self.base_layer, _where(self)))

    def _requantize(self, weight: torch.Tensor) -> None:
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

    def _requantize(self, weight: torch.Tensor) -> None:
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
