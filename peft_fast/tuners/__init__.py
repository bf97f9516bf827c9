"""One module per method: LoRA, IA³."""

from .ia3 import IA3Config, IA3Model
from .lora import LoraConfig, LoraModel

__all__ = ["IA3Config", "IA3Model", "LoraConfig", "LoraModel"]
