"""X-LoRA: a mixture of LoRA experts weighted per token by a classifier (HF peft's X-LoRA)."""

from ...config import register_peft_method
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .model import XLoraModel

register_peft_method(name="xlora", config_cls=XLoraConfig, model_cls=XLoraModel, prefix="xlora_")

__all__ = ["XLoraClassifier", "XLoraConfig", "XLoraModel"]
