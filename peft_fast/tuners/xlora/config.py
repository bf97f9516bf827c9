"""XLoraConfig: HF peft 0.21's X-LoRA fields, defaults, warnings and adapter_config.json keys."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import ClassVar

from ...config import PeftConfig, PeftType


@dataclass
class XLoraConfig(PeftConfig):
    """HF peft's XLoraConfig: a mixture of LoRA experts whose per-token weights come from a
    classifier on the model's last hidden state.

    `adapters` maps each expert's name to its LoRA adapter folder (any names; HF peft 0.21.2
    only runs with the names "0", "1", ...). When a saved X-LoRA folder is loaded, the paths
    may be replaced with `PeftModel.from_pretrained(..., adapters={...})`; only the names are
    read from the file. Same defaults and warnings as HF peft; values that can never work
    (depth <= 0, top_k_lora < 1, temperature <= 0, dropout outside [0, 1)) raise ValueError."""

    hidden_size: int = None  # type: ignore[assignment]
    adapters: dict[str, str] = None  # type: ignore[assignment]
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    PEFT_TYPE: ClassVar[PeftType] = PeftType.XLORA

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size is None:
            warnings.warn(
                "No value was provided for `hidden_size`. This will be set to 4096 by default, please ensure that"
                " this is correct.",
                stacklevel=3,
            )
            self.hidden_size = 4096
        if self.adapters is None:
            warnings.warn(
                "No value was provided for `adapters`. This will be set to empty, please ensure that this is correct.",
                stacklevel=3,
            )
            self.adapters = {}
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        if not isinstance(self.adapters, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.adapters.items()
        ):
            raise TypeError(f"adapters must be a dict {{expert name: LoRA adapter folder}}, got {self.adapters!r}")
        if isinstance(self.xlora_depth, bool) or not isinstance(self.xlora_depth, int) or self.xlora_depth <= 0:
            raise ValueError(f"xlora_depth must be a positive integer (X-LoRA depth), got {self.xlora_depth!r}")
        if isinstance(self.xlora_size, bool) or not isinstance(self.xlora_size, int) or self.xlora_size <= 0:
            raise ValueError(f"xlora_size must be a positive integer, got {self.xlora_size!r}")
        if not (isinstance(self.xlora_dropout_p, (int, float)) and 0.0 <= self.xlora_dropout_p < 1.0):
            raise ValueError(f"xlora_dropout_p must be in [0, 1), got {self.xlora_dropout_p!r}")
        if not isinstance(self.softmax_temperature, (int, float)) or self.softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature must be a number > 0, got {self.softmax_temperature!r}")
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("`enable_softmax_topk` enabled `top_k_lora` is not set", stacklevel=3)
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn(
                "`enable_softmax_topk` and `enable_softmax` are both enabled. This will result in worse performance.",
                stacklevel=3,
            )
        check_top_k(self.top_k_lora, None)

    def to_json_string(self) -> str:
        """adapter_config.json's text: keys sorted as in every config, except the experts, which
        keep their order (it is the order of the classifier's outputs; HF peft sorts them, so
        names that do not sort in creation order come back mismatched there)."""
        return json.dumps(dict(sorted(self.to_dict().items())), indent=2) + "\n"


def check_top_k(top_k: int | None, n_experts: int | None) -> None:
    """ValueError unless top_k is None or an integer in [1, n_experts] (n_experts None: no upper bound)."""
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k_lora must be None or an integer >= 1, got {top_k!r}")
    if n_experts is not None and top_k > n_experts:
        raise ValueError(f"top_k_lora={top_k} is larger than the number of experts ({n_experts})")
