"""IA3Model: puts IA³ layers into a model."""

from __future__ import annotations

import re

from torch import nn

from ...config import PeftConfig
from ..base import LINEAR_TYPES, AdapterLayer, BaseTuner, fan_in_fan_out_for
from ..targets import IA3_FEEDFORWARD, IA3_TARGETS
from .config import IA3Config
from .layer import IA3Linear


def _is_feedforward(config: IA3Config, key: str) -> bool:
    ff = config.feedforward_modules
    if not ff:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


class IA3Model(BaseTuner):
    """Injects IA³ layers into a model."""

    prefix = "ia3_"
    layer_cls = IA3Linear
    target_module_mapping = IA3_TARGETS

    def _fill_default_extras(self, config: PeftConfig, model_type: str | None) -> None:
        assert isinstance(config, IA3Config)
        if config.feedforward_modules is None:
            config.feedforward_modules = set(IA3_FEEDFORWARD.get(model_type, []))

    def _create_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, key: str) -> AdapterLayer:
        assert isinstance(config, IA3Config)
        if not isinstance(target, LINEAR_TYPES):
            raise ValueError(
                f"target module {key!r} is a {type(target).__name__}; IA³ supports nn.Linear and transformers' Conv1D"
            )
        from .bnb import ia3_layer_for  # bitsandbytes' Linear4bit / Linear8bitLt

        layer = ia3_layer_for(target, key, _is_feedforward(config, key)) or IA3Linear(
            target, fan_in_fan_out_for(target, config, key), _is_feedforward(config, key)
        )
        layer.update_layer(adapter_name, config.init_ia3_weights)
        return layer

    def _update_layer(self, layer: AdapterLayer, adapter_name: str, config: PeftConfig, key: str) -> None:
        assert isinstance(config, IA3Config) and isinstance(layer, IA3Linear)
        if _is_feedforward(config, key) != layer.is_feedforward:
            raise ValueError(
                f"{key!r} is a feed-forward module in one IA³ adapter and not in another; they cannot share the layer"
            )
        layer.update_layer(adapter_name, config.init_ia3_weights)
