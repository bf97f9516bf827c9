"""AdaLoraConfig: HF peft 0.21's fields (LoraConfig's plus the rank-allocation schedule),
defaults and adapter_config.json keys, with HF peft's checks and a few more that catch, at
config time, schedules and options that would fail or be ignored later."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import PeftType
from ..lora.config import LoraConfig


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class AdaLoraConfig(LoraConfig):
    """HF peft's AdaLoraConfig. Three phases: `tinit` warm-up steps at the initial budget
    (`init_r` per layer), a cubic decrease of the total rank budget to `target_r` per layer
    until step `total_step - tfinal` (masks recomputed every `deltaT` steps from EMA
    sensitivity (`beta1`) and uncertainty (`beta2`)), then `tfinal` steps with the final masks.
    `orth_reg_weight` weighs the orthogonality penalty added to the loss. `rank_pattern` is
    written by the rank allocator (per lora_E parameter, which triplets survive); `r` is
    unused (HF peft warns when it is set)."""

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADALORA

    def __post_init__(self) -> None:
        # HF peft's own refusals first, with its reasons.
        if self.use_dora:
            raise ValueError("AdaLoRA does not support DoRA (use_dora=True); use LoraConfig for DoRA")
        if self.loftq_config:
            raise ValueError("AdaLoRA does not support LoftQ (loftq_config); leave it empty")
        # LoraConfig checks rank_pattern as LoRA's {pattern: rank}; AdaLoRA's is {name: [kept, ...]}.
        rank_pattern, self.rank_pattern = self.rank_pattern, {}
        try:
            super().__post_init__()
        finally:
            self.rank_pattern = rank_pattern
        if self.r != 8:
            warnings.warn(
                "r is not used by AdaLoRA and is ignored; set init_r for the initial rank (and target_r for the"
                " final average rank)",
                stacklevel=3,
            )
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int):
            raise ValueError(
                f"AdaLoRA needs total_step, the number of training steps (an integer > 0), got {self.total_step!r}"
            )
        if self.total_step <= 0:
            raise ValueError(f"total_step must be > 0, got {self.total_step}")
        if not isinstance(self.orth_reg_weight, (int, float)) or isinstance(self.orth_reg_weight, bool):
            raise TypeError(f"orth_reg_weight must be a number, got {self.orth_reg_weight!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        _check_int("init_r", self.init_r, 1)
        _check_int("target_r", self.target_r, 1)
        _check_int("tinit", self.tinit, 0)
        _check_int("tfinal", self.tfinal, 0)
        _check_int("deltaT", self.deltaT, 1)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"the schedule leaves no budgeting phase: tinit ({self.tinit}) must be < total_step - tfinal"
                f" ({self.total_step} - {self.tfinal}); decrease tinit or tfinal, or increase total_step"
            )
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be <= init_r ({self.init_r}): AdaLoRA only prunes ranks")
        for name in ("beta1", "beta2"):  # HF peft asserts this when the model is built
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise TypeError(
                f"rank_pattern must be a dict {{lora_E name: [kept, ...]}} or None, got {self.rank_pattern!r}"
            )
        # LoRA options AdaLoRA's layers do not read (HF peft ignores them silently).
        ignored = {"use_rslora": False, "alpha_pattern": {}, "ensure_weight_tying": False}
        used = [f"{n}={getattr(self, n)!r}" for n, off in ignored.items() if getattr(self, n) not in (off, None)]
        if used:
            raise ValueError(
                f"AdaLoraConfig: {', '.join(used)} is not supported (AdaLoRA's layers do not use it); leave it at"
                " its default"
            )
