"""PeftModel and its task wrappers: HF peft's user-facing model classes."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import PeftConfig, PeftType, TaskType
from .save_and_load import get_peft_model_state_dict, load_peft_weights, save_adapter_folder, set_peft_model_state_dict
from .tuners.base import SEQ_CLS_HEAD_NAMES, BaseTuner, set_modules_to_save
from .tuners.ia3 import IA3Model
from .tuners.lora import LoraModel

def _checkpointing_enabled(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (now deprecated) to is_activation_checkpointing.
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


TUNERS: dict[PeftType, type[BaseTuner]] = {PeftType.LORA: LoraModel, PeftType.IA3: IA3Model}


class PeftModel(nn.Module):
    """A base model with adapters. `base_model` is the tuner (LoraModel, IA3Model), whose
    `model` is the wrapped transformers model; state-dict keys start `base_model.model.`."""

    # Heads trained in full for this task (added to modules_to_save), by subclass.
    task_head_names: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig (LoraConfig, IA3Config, ...), got {type(peft_config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
        tuner = TUNERS.get(peft_config.peft_type)
        if tuner is None:
            raise ValueError(f"peft_type {peft_config.peft_type!r} is not supported; supported: {[t.value for t in TUNERS]}")
        self._add_task_heads(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        self.peft_type = peft_config.peft_type
        self.base_model = tuner(model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        self._finish_adapter(adapter_name, peft_config, autocast_adapter_dtype, activate=True)
        if _checkpointing_enabled(model) and hasattr(model, "enable_input_require_grads"):
            # Checkpointed blocks need inputs that require grad for the adapters to get gradients.
            model.enable_input_require_grads()

    # -- plumbing ----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _add_task_heads(self, config: PeftConfig) -> None:
        if not self.task_head_names or not hasattr(config, "modules_to_save"):
            return
        if config.modules_to_save is None:
            config.modules_to_save = list(self.task_head_names)
        else:
            config.modules_to_save = list(config.modules_to_save) + [n for n in self.task_head_names if n not in config.modules_to_save]

    def _finish_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool, activate: bool) -> None:
        """Wrap modules_to_save, set dtypes and trainability of a newly added adapter."""
        model = self.base_model.model
        if getattr(config, "modules_to_save", None):
            set_modules_to_save(model, config.modules_to_save, adapter_name, trainable=not config.inference_mode)
        if activate:
            self.base_model.set_adapter(adapter_name)
        else:
            self.base_model.set_adapter(self.base_model.active_adapter)
        if autocast_adapter_dtype:
            self._cast_adapter_dtype(adapter_name)
        if config.inference_mode:
            for p in self._adapter_parameters(adapter_name):
                p.requires_grad_(False)

    def _adapter_parameters(self, adapter_name: str, include_modules_to_save: bool = True) -> Iterator[nn.Parameter]:
        from .save_and_load import adapter_key_map

        params = dict(self.named_parameters(remove_duplicate=False))
        for model_key in adapter_key_map(self, adapter_name).values():
            if not include_modules_to_save and ".modules_to_save." in model_key:
                continue
            if model_key in params:
                yield params[model_key]

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """HF peft's autocast_adapter_dtype: fp16/bf16 adapter-layer weights become fp32.

        Copies of modules_to_save keep the base model's dtype (as in HF peft): their input
        comes from the base model in that dtype."""
        for p in self._adapter_parameters(adapter_name, include_modules_to_save=False):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        active = self.base_model.active_adapter
        return active if isinstance(active, str) else active[0]

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as HF peft counts them."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- forward ------------------------------------------------------------------------------
    @contextmanager
    def _peft_forward(
        self, kwargs: dict[str, Any], encoder_adapter_names: tuple[nn.Module, Sequence[str]] | None = None
    ) -> Iterator[dict[str, Any]]:
        adapter_names = kwargs.pop("adapter_names", None)
        device = None
        for v in kwargs.values():
            if isinstance(v, torch.Tensor):
                device = v.device
                break
        with self.base_model.mixed_batch(adapter_names, device, encoder_adapter_names):
            yield kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._peft_forward(kwargs) as kw:
            return self.get_base_model()(*args, **kw)

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True) -> None:
        """Add a new (inactive) adapter; `set_adapter` activates it."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        if peft_config.peft_type != self.peft_type:
            raise ValueError(
                f"cannot add a {peft_config.peft_type} adapter to a model with {self.peft_type} adapters; one method per model"
            )
        self._add_task_heads(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = self.active_peft_config.base_model_name_or_path
        self.base_model.inject_adapter(self.base_model.model, adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        self._finish_adapter(adapter_name, peft_config, autocast_adapter_dtype, activate=False)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter, and the trainable one."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a string, got {type(adapter_name).__name__}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        self.base_model.set_adapter(adapter_name)
        if self.peft_config[adapter_name].inference_mode:
            for p in self._adapter_parameters(adapter_name):
                p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes as its base model alone."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the active adapter into the base weights; return the plain base model."""
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove all adapters without merging; return the plain base model."""
        return self.base_model.unload()

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as HF peft does: "default" into the folder, others into sub-folders."""
        save_directory = str(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory!r}")
        if kwargs:
            raise TypeError(f"save_pretrained got unsupported arguments: {sorted(kwargs)}")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters names unknown adapters {unknown}; adapters: {list(self.peft_config)}")
        if not is_main_process:
            return
        for name in names:
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            state_dict = get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=save_embedding_layers)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            save_adapter_folder(folder, state_dict, config, safe_serialization=safe_serialization)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load an adapter folder (HF peft's or ours) onto `model`."""
        if kwargs:
            raise TypeError(f"from_pretrained got unsupported arguments: {sorted(kwargs)}")
        if config is None:
            config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        target_cls = cls
        if cls is PeftModel and config.task_type is not None:
            target_cls = TASK_MODELS.get(config.task_type, PeftModel)
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
        peft_model._load_weights(model_id, adapter_name, low_cpu_mem_usage)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def _load_weights(self, model_id: str | os.PathLike, adapter_name: str, low_cpu_mem_usage: bool) -> Any:
        device = next((p.device for p in self.parameters() if p.device.type != "meta"), torch.device("cpu"))
        weights = load_peft_weights(model_id, device=device)
        return set_peft_model_state_dict(self, weights, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load another adapter folder under `adapter_name` (inactive until `set_adapter`)."""
        if kwargs:
            raise TypeError(f"load_adapter got unsupported arguments: {sorted(kwargs)}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype)
        result = self._load_weights(model_id, adapter_name, low_cpu_mem_usage)
        if not is_trainable:
            self.eval()
        return result


class _GenerativePeftModel(PeftModel):
    """Task wrappers whose base model generates text."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        model = self.get_base_model()
        if not hasattr(model, "generate"):
            raise AttributeError(f"{type(model).__name__} has no generate()")
        adapter_names = kwargs.get("adapter_names")
        encoder_adapter_names = None
        if adapter_names is not None:
            # Generation expands the batch for beams and returned sequences: expand the names alike.
            repeat = max(int(kwargs.get("num_beams", 1) or 1), int(kwargs.get("num_return_sequences", 1) or 1))
            kwargs["adapter_names"] = [n for n in adapter_names for _ in range(repeat)]
            # An encoder runs once on the rows as given, before the expansion: it keeps the names as given.
            get_encoder = getattr(model, "get_encoder", None)
            encoder = get_encoder() if callable(get_encoder) else None
            if repeat > 1 and isinstance(encoder, nn.Module) and encoder is not model:
                encoder_adapter_names = (encoder, list(adapter_names))
        with self._peft_forward(kwargs, encoder_adapter_names) as kw:
            return model.generate(*args, **kw)


class PeftModelForCausalLM(_GenerativePeftModel):
    pass


class PeftModelForSeq2SeqLM(_GenerativePeftModel):
    pass


class PeftModelForSequenceClassification(PeftModel):
    task_head_names = SEQ_CLS_HEAD_NAMES


class PeftModelForTokenClassification(PeftModel):
    task_head_names = SEQ_CLS_HEAD_NAMES


class PeftModelForQuestionAnswering(PeftModel):
    task_head_names = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    pass


TASK_MODELS: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
