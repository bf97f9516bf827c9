"""VeraConfig: HF peft 0.21's fields, defaults and adapter_config.json keys."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from ...config import PeftConfig, PeftType
from ..targets import normalize_targets


@dataclass
class VeraConfig(PeftConfig):
    """HF peft's VeraConfig: r (the shared projections' rank, default 256), target_modules,
    projection_prng_key (the seed of vera_A / vera_B), save_projection (store them in the
    adapter file, once per model), vera_dropout, d_initial (λ_d's initial value),
    fan_in_fan_out, bias ("none", "all" or "vera_only"), modules_to_save, init_weights,
    layers_to_transform, layers_pattern."""

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    PEFT_TYPE: ClassVar[PeftType] = PeftType.VERA

    def __post_init__(self) -> None:
        super().__post_init__()
        normalize_targets(self)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.vera_dropout, (int, float)) and 0.0 <= self.vera_dropout < 1.0):
            raise ValueError(f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise TypeError(f"d_initial must be a number, got {self.d_initial!r}")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise TypeError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        for name in ("save_projection", "init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.save_projection:
            warnings.warn(
                "save_projection=False: vera_A and vera_B are not saved; loading rebuilds them from"
                " projection_prng_key, which may not give the same numbers on every system. Set"
                " save_projection=True to store them (once per model) in the adapter file",
                stacklevel=3,
            )
