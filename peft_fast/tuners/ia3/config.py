"""IA3Config: HF peft's IA³ fields, defaults and JSON keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import PeftConfig, PeftType
from ..targets import normalize_targets


@dataclass
class IA3Config(PeftConfig):
    """HF peft's IA3Config: same fields, defaults and JSON keys."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    PEFT_TYPE: ClassVar[PeftType] = PeftType.IA3

    def __post_init__(self) -> None:
        super().__post_init__()
        normalize_targets(self)
        if (
            isinstance(self.feedforward_modules, set)
            and isinstance(self.target_modules, set)
            and not self.feedforward_modules <= self.target_modules
        ):
            raise ValueError(
                f"feedforward_modules {sorted(self.feedforward_modules)} must be a subset of target_modules "
                f"{sorted(self.target_modules)}"
            )
