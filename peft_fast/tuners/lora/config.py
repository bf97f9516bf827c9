"""LoraConfig: HF peft's LoRA fields, defaults and JSON keys."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ...config import PeftConfig, PeftType, check_unsupported
from ..targets import normalize_targets

# HF peft fields this version accepts in files but does not implement: their "off" values.
_LORA_UNSUPPORTED = {
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "trainable_token_indices": None,
    "megatron_config": None,
}


@dataclass
class LoraConfig(PeftConfig):
    """HF peft's LoraConfig: same fields, defaults and JSON keys."""

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | Literal["gaussian"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    # Accepted for file compatibility with HF peft; any value but the default is refused.
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict | None = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"use_dora must be True or False, got {self.use_dora!r}")
        # HF peft's own refusals for DoRA come first, with HF peft's messages.
        if self.use_dora and self.megatron_config:
            raise ValueError("DoRA does not support megatron_core, please set `use_dora=False`.")
        if self.use_dora and self.lora_bias:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        check_unsupported(self, _LORA_UNSUPPORTED)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise TypeError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if self.lora_alpha == 0:
            warnings.warn(
                "lora_alpha=0 makes scaling 0: the adapter changes nothing and its gradients are all zero",
                stacklevel=3,
            )
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        normalize_targets(self)
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise TypeError(
                    f"{name} must be a dict of {{module name pattern: value}}, got {type(pattern).__name__}"
                )
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
