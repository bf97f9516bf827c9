"""LoKrConfig: HF peft 0.21's fields, defaults and adapter_config.json keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...config import PeftType
from ..lycoris import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """HF peft's LoKrConfig: LoHaConfig's fields plus decompose_both (factor w1 as w1_a w1_b
    too), decompose_factor (-1: near-square factors; k > 0: one factor k where k divides the
    dimension, see `factorization`), rank_dropout_scale, and init_weights True, False or
    "lycoris"; same defaults and JSON keys."""

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LOKR

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris' for LoKr, got {self.init_weights!r}")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor != -1 and factor <= 0):
            raise ValueError(f"decompose_factor must be -1 (near-square factors) or a positive integer, got {factor!r}")
