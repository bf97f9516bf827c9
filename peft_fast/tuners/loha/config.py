"""LoHaConfig: HF peft 0.21's fields, defaults and adapter_config.json keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import PeftType
from ..lycoris import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """HF peft's LoHaConfig: r, alpha, rank_dropout, module_dropout, use_effective_conv2d,
    target_modules, exclude_modules, init_weights, layers_to_transform, layers_pattern,
    rank_pattern, alpha_pattern, modules_to_save; same defaults and JSON keys."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LOHA

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False for LoHa, got {self.init_weights!r}")
