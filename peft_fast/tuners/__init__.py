"""One package per method: LoRA, AdaLoRA, IA³, LoHa, LoKr, VeRA, X-LoRA, and prompt learning (prompt tuning,
prefix tuning, P-tuning).

Each method's package registers its config and tuner classes when imported
(`peft_fast.config.register_peft_method`); importing this package registers them all."""

from .adalora import AdaLoraConfig, AdaLoraModel
from .ia3 import IA3Config, IA3Model
from .loha import LoHaConfig, LoHaModel
from .lokr import LoKrConfig, LoKrModel
from .lora import LoraConfig, LoraModel
from .prompt_learning import (
    PrefixEncoder,
    PrefixTuningConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .vera import VeraConfig, VeraModel
from .xlora import XLoraConfig, XLoraModel

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoraConfig",
    "LoraModel",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "VeraConfig",
    "VeraModel",
    "XLoraConfig",
    "XLoraModel",
]
