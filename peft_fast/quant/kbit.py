"""`prepare_model_for_kbit_training`: HF peft's recipe for training adapters on a quantized model."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

# quantization methods HF peft leaves the dtypes of alone (their own kernels want them as they are)
_KEEP_DTYPES = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Prepare a (quantized) transformers model for adapter training, as HF peft does:
    freeze every parameter; cast fp16/bf16 parameters that are not 4-bit weights to fp32
    (layer norms, embeddings, head); and, for a model loaded in 8 or 4 bits with
    `use_gradient_checkpointing`, make the input embeddings' output require grad (unless
    `use_reentrant=False` is asked for) and turn on gradient checkpointing. Returns `model`."""
    if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
        raise TypeError(
            f"gradient_checkpointing_kwargs must be a dict or None, got {type(gradient_checkpointing_kwargs).__name__}"
        )
    gc_kwargs = dict(gradient_checkpointing_kwargs or {})
    method = getattr(model, "quantization_method", None)
    keep_dtypes = method in _KEEP_DTYPES or getattr(model, "hqq_quantized", False)
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)

    for param in model.parameters():
        param.requires_grad = False
    if not keep_dtypes:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()

    if (loaded_in_kbit or keep_dtypes) and use_gradient_checkpointing:
        if gc_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:

                def make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        enable = model.gradient_checkpointing_enable
        takes_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters
        if not takes_kwargs and gc_kwargs:
            warnings.warn(
                "gradient_checkpointing_kwargs is not supported by this transformers version; they are ignored",
                FutureWarning,
                stacklevel=2,
            )
        enable(**({"gradient_checkpointing_kwargs": gc_kwargs} if takes_kwargs else {}))
    return model
