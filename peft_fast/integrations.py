"""Hooks for training frameworks that special-case HF peft's own classes.

transformers' Trainer writes adapter-only checkpoints (and resumes from them) only for HF
peft's `PeftModel`; for any other model it writes the whole state dict. Where HF peft is
installed, peft_fast's `PeftModel` passes that check (see `peft_fast.hf_identity`), so the
Trainer and TRL write adapter-only checkpoints by themselves and nothing here is needed.

Without HF peft, `SaveAdapterCallback` adds the adapter files (adapter_config.json +
adapter_model.safetensors, and sub-folders for named adapters) to every checkpoint the
Trainer saves, so `PeftModel.from_pretrained(base, "out/checkpoint-N")` works as with HF
peft; the Trainer's own full-weights file stays (its resume needs it there).
"""

from __future__ import annotations

import os
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
