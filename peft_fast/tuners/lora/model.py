"""LoraModel: puts LoRA layers into a model."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...config import PeftConfig
from ..base import LINEAR_TYPES, AdapterLayer, BaseTuner, fan_in_fan_out_for, pattern_matches
from ..targets import LORA_TARGETS
from .config import LoraConfig
from .layer import LoraEmbedding, LoraLayer, LoraLinear


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """HF peft's rank_pattern/alpha_pattern lookup: the first pattern matching the key's end."""
    for pattern, value in patterns.items():
        if pattern_matches(pattern, key):
            return value
    return default


class LoraModel(BaseTuner):
    """Injects LoRA layers into a model."""

    prefix = "lora_"
    shorten_targets = True
    layer_cls = LoraLayer
    target_module_mapping = LORA_TARGETS

    def _layer_numbers(self, config: LoraConfig, key: str) -> tuple[int, float]:
        r = _pattern_value(config.rank_pattern, key, config.r)
        alpha = _pattern_value(config.alpha_pattern, key, config.lora_alpha)
        return r, alpha

    def _create_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, key: str) -> AdapterLayer:
        assert isinstance(config, LoraConfig)
        from .bnb import lora_layer_for  # bitsandbytes' Linear4bit / Linear8bitLt (QLoRA)

        layer: LoraLayer
        quantized = lora_layer_for(target, key)
        if quantized is not None:
            layer = quantized
        elif isinstance(target, nn.Embedding):
            layer = LoraEmbedding(target)
        elif isinstance(target, LINEAR_TYPES):
            layer = LoraLinear(target, fan_in_fan_out=fan_in_fan_out_for(target, config, key))
        else:
            raise ValueError(
                f"target module {key!r} is a {type(target).__name__}; LoRA supports nn.Linear, transformers' Conv1D "
                "and nn.Embedding"
            )
        self._update_layer(layer, adapter_name, config, key)
        return layer

    def _update_layer(self, layer: AdapterLayer, adapter_name: str, config: PeftConfig, key: str) -> None:
        assert isinstance(config, LoraConfig) and isinstance(layer, (LoraLinear, LoraEmbedding))
        r, alpha = self._layer_numbers(config, key)
        layer.update_layer(
            adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights, config.use_rslora, config.use_dora
        )

    def _mark_trainable(self, model: nn.Module, adapter_name: str) -> None:
        super()._mark_trainable(model, adapter_name)
        for config in self.peft_config.values():
            bias = getattr(config, "bias", "none")
            if bias == "all":
                for n, p in model.named_parameters():
                    if "bias" in n:
                        p.requires_grad_(True)
            elif bias == "lora_only":
                for m in model.modules():
                    if isinstance(m, LoraLayer) and getattr(m.base_layer, "bias", None) is not None:
                        m.base_layer.bias.requires_grad_(True)
