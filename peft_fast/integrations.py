"""Hooks for training frameworks that special-case HF peft's own classes.

transformers' Trainer writes adapter-only checkpoints (and resumes from them) only for HF
peft's `PeftModel`; for any other model it writes the whole state dict. Where HF peft is
installed, peft_fast's `PeftModel` passes that check (see `peft_fast.hf_identity`), so the
Trainer and TRL write adapter-only checkpoints by themselves and nothing here is needed.

Without HF peft, `SaveAdapterCallback` adds the adapter files (adapter_config.json +
adapter_model.safetensors, and sub-folders for named adapters) to every checkpoint the
Trainer saves, so `PeftModel.from_pretrained(base, "out/checkpoint-N")` works as with HF
peft; the Trainer's own full-weights file stays (its resume needs it there).

`AdaLoraCallback` calls AdaLoRA's `update_and_allocate` after every optimizer step (before the
gradients are zeroed), which HF peft leaves to the user.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from transformers import TrainerCallback

from .peft_model import PeftModel


class SaveAdapterCallback(TrainerCallback):
    """`Trainer(..., callbacks=[SaveAdapterCallback()])`: each checkpoint also holds the adapter."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if not isinstance(model, PeftModel):
            raise TypeError(f"SaveAdapterCallback needs a peft_fast PeftModel, got {type(model).__name__}")
        model.save_pretrained(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


class AdaLoraCallback(TrainerCallback):
    """`Trainer(..., callbacks=[AdaLoraCallback()])`: AdaLoRA's rank allocation runs every step.

    Calls `model.base_model.update_and_allocate(state.global_step)` after each optimizer step and
    before the gradients are zeroed, as HF peft asks of a hand-written loop (the step index
    counts from 0). Set the config's `total_step` to the Trainer's number of optimizer steps."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tuner = _adalora_tuner(model)
        name = tuner.trainable_adapter_name
        total_step = tuner.peft_config[name].total_step if name is not None else None
        if state.max_steps and total_step is not None and total_step != state.max_steps:
            warnings.warn(
                f"AdaLoRA's total_step is {total_step} but the Trainer runs {state.max_steps} optimizer steps; the"
                " rank budget schedule assumes total_step steps: set AdaLoraConfig(total_step=...) to match",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        _adalora_tuner(model).update_and_allocate(state.global_step)


def _adalora_tuner(model: Any) -> Any:
    from .tuners.adalora import AdaLoraModel

    tuner = getattr(model, "base_model", None)
    if not isinstance(model, PeftModel) or not isinstance(tuner, AdaLoraModel):
        raise TypeError(
            f"AdaLoraCallback needs a peft_fast PeftModel with an AdaLoRA adapter, got {type(model).__name__}"
            f" (base_model: {type(tuner).__name__})"
        )
    return tuner
