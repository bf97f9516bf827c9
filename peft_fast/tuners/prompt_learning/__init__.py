"""Prompt learning: prompt tuning, prefix tuning and P-tuning (see model.py).

They change no layer of the base model: as in HF peft, each registers its prompt encoder as
`model_cls`, and a PeftModel puts the encoder's virtual tokens in front of the input."""

from ...config import register_peft_method
from .config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .model import (
    PROMPT_FILE_KEY,
    PrefixEncoder,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderBase,
    PromptLearningAdapters,
    create_prompt_encoder,
    prefix_cache,
    prepare_prompt_learning_config,
    prepend,
)

register_peft_method(name="prompt_tuning", config_cls=PromptTuningConfig, model_cls=PromptEmbedding)
register_peft_method(name="prefix_tuning", config_cls=PrefixTuningConfig, model_cls=PrefixEncoder)
register_peft_method(name="p_tuning", config_cls=PromptEncoderConfig, model_cls=PromptEncoder)

__all__ = [
    "PROMPT_FILE_KEY",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderBase",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningAdapters",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "create_prompt_encoder",
    "prefix_cache",
    "prepare_prompt_learning_config",
    "prepend",
]
