"""`get_peft_model`: HF peft's entry point."""

from __future__ import annotations

from torch import nn

from .config import PeftConfig
from .peft_model import TASK_MODELS, PeftModel


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (HF peft's entry point).

    The task wrapper (PeftModelForCausalLM, ...) follows `peft_config.task_type`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a PeftConfig (LoraConfig, IA3Config, ...), got {type(peft_config).__name__}"
        )
    if mixed:
        raise ValueError("mixed=True (PeftMixedModel) is not supported by peft_fast")
    if isinstance(getattr(model, "peft_config", None), dict):
        raise ValueError(
            "this model already has adapters; use add_adapter() on its PeftModel instead of get_peft_model() again"
        )
    if revision is not None:
        peft_config.revision = revision
    cls = TASK_MODELS.get(peft_config.task_type, PeftModel) if peft_config.task_type is not None else PeftModel
    return cls(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
