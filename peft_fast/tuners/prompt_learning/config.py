"""Prompt-learning configs (HF peft's fields, defaults and JSON keys): prompt tuning, prefix
tuning and P-tuning, and the fields they share."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Literal

from ...config import PeftConfig, PeftType, _enum_value


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning initialises its virtual tokens."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network P-tuning puts on top of its virtual-token embeddings."""

    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning config shares (HF peft's PromptLearningConfig).

    `token_dim`, `num_layers`, `num_attention_heads`, `num_transformer_submodules` (and
    `encoder_hidden_size` where a method has it) are read from the base model when left None."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    @property
    def is_prompt_learning(self) -> bool:
        return True


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """HF peft's PromptTuningConfig: learned virtual-token embeddings put before the input."""

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PROMPT_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = _enum_value(self.prompt_tuning_init, PromptTuningInit, "prompt_tuning_init")
        text_init = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text_init and not self.tokenizer_name_or_path:
            raise ValueError(
                f"prompt_tuning_init='TEXT' needs tokenizer_name_or_path, got {self.tokenizer_name_or_path!r}"
            )
        if text_init and self.prompt_tuning_init_text is None:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, got None")
        if self.tokenizer_kwargs and not text_init:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """HF peft's PrefixTuningConfig: learned keys and values put before every layer's own."""

    init_weights: Literal["zero"] | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """HF peft's PromptEncoderConfig (P-tuning): virtual-token embeddings through an MLP or LSTM."""

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    PEFT_TYPE: ClassVar[PeftType] = PeftType.P_TUNING

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = _enum_value(
            self.encoder_reparameterization_type, PromptEncoderReparameterizationType, "encoder_reparameterization_type"
        )
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
