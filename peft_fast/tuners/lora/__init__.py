"""LoRA: `y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ` on Linear, Conv1D and Embedding layers."""

from ...config import register_peft_method
from .config import LoraConfig
from .layer import LoraEmbedding, LoraLayer, LoraLinear
from .model import LoraModel

register_peft_method(name="lora", config_cls=LoraConfig, model_cls=LoraModel)

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLayer", "LoraLinear", "LoraModel"]
