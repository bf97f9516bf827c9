"""PeftModel and its task wrappers: HF peft's user-facing model classes."""

from __future__ import annotations

import copy
import functools
import inspect
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapter_files import folder_lock
from .config import PeftConfig, PeftType, TaskType, registered_method
from .hf_identity import hf_peft_model_base, register_layer_types
from .save_and_load import (
    adapter_key_map,
    check_adapter_name,
    get_peft_model_state_dict,
    load_peft_weights,
    save_adapter_folder,
    set_peft_model_state_dict,
)
from .tuners.base import SEQ_CLS_HEAD_NAMES, AdapterLayer, BaseTuner, set_modules_to_save
from .tuners.prompt_learning import PromptLearningAdapters, prefix_cache, prepend


def _checkpointing_enabled(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (now deprecated) to is_activation_checkpointing.
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def _input_embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding layer prompt learning reads from (tokens' embeddings, init of prompt tuning)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module) or not hasattr(embeddings, "weight"):
        raise ValueError(f"prompt learning needs a model with get_input_embeddings(); {type(model).__name__} has none")
    return embeddings


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    """The batch size of whichever input is given (ValueError when neither is)."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pass input_ids or inputs_embeds")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


def _check_takes_cache(model: nn.Module) -> None:
    """Refuse prefix tuning on a model whose forward cannot receive the prefix cache."""
    params = inspect.signature(model.forward).parameters
    if "past_key_values" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(
            f"prefix tuning needs a model whose forward takes past_key_values; {type(model).__name__}.forward does not"
        )


def _span_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """Extractive question answering's loss, as transformers computes it: positions outside the
    sequence are ignored, start and end cross-entropies averaged."""
    ignored = start_logits.shape[1]
    loss = nn.CrossEntropyLoss(ignore_index=ignored)
    start, end = start.reshape(-1).clamp(0, ignored), end.reshape(-1).clamp(0, ignored)
    return (loss(start_logits, start.to(start_logits.device)) + loss(end_logits, end.to(end_logits.device))) / 2


def _check_loadable(config: PeftConfig, is_trainable: bool) -> None:
    """Refuse loading a prompt-learning adapter file for training (as HF peft does)."""
    if config.is_prompt_learning and is_trainable:
        raise ValueError(
            f"is_trainable=True is not supported for {config.peft_type} adapter files (as in HF peft):"
            f" they store "
            "the encoder's output for the virtual tokens, not the encoder; create a new adapter to train"
        )


class _Rollback:
    """Enough of some modules' and objects' state to put them back after a failed add or load.

    Every attribute of each object is kept, and the contents of those that are dicts, lists
    or sets (a module's `_modules`, `_parameters`, hooks; a layer's per-adapter dicts; the
    configs dict), restored in place so that containers shared between objects stay shared;
    and each parameter's requires_grad. Modules created since are dropped with their parents'
    old `_modules`. Weights copied into existing parameters are not covered: loads copy only
    once every check has passed."""

    def __init__(self, modules: Iterable[nn.Module], others: Iterable[object] = ()) -> None:
        modules = list(modules)
        self._state: list[tuple[object, dict[str, Any], list[tuple[Any, Any]]]] = []
        for obj in [*modules, *others]:
            attrs = dict(vars(obj))
            contents = [(v, v.copy()) for v in attrs.values() if isinstance(v, (dict, list, set))]
            self._state.append((obj, attrs, contents))
        self._requires_grad = [(p, p.requires_grad) for m in modules for p in m.parameters(recurse=False)]

    def restore(self) -> None:
        for obj, attrs, contents in self._state:
            vars(obj).clear()
            vars(obj).update(attrs)
            for container, saved in contents:
                container.clear()
                if isinstance(container, list):
                    container.extend(saved)
                else:
                    container.update(saved)
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)


@contextmanager
def _all_or_nothing(modules: Iterable[nn.Module], others: Iterable[object] = ()) -> Iterator[None]:
    """Run the block; if it raises, put `modules` and `others` back as they were (see _Rollback)."""
    rollback = _Rollback(modules, others)
    try:
        yield
    except BaseException:
        rollback.restore()
        raise


def _load_device(model: nn.Module) -> torch.device:
    """Where adapter weights of `model` are created: its first parameter not on the meta device."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


class _BoundForward:
    """A PeftModel's forward, bound to it, whose signature is the base model's forward plus
    `adapter_names`. Tools that read `model.forward`'s arguments to pick what to pass in (the
    HF Trainer drops dataset columns that forward does not name) see the real arguments instead
    of `*args, **kwargs`; HF peft gets this from the Trainer recognizing its PeftModel class."""

    def __init__(self, model: PeftModel) -> None:
        self.__self__ = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.__self__
        return type(model).forward(model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        model = self.__self__
        try:
            sig = inspect.signature(model.get_base_model().forward)
        except (TypeError, ValueError):
            return inspect.signature(functools.partial(type(model).forward, model))
        params = list(sig.parameters.values())
        if "adapter_names" not in sig.parameters:
            extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
            var_kw = [p for p in params if p.kind is p.VAR_KEYWORD]
            params = [p for p in params if p.kind is not p.VAR_KEYWORD] + [extra] + var_kw
        return sig.replace(parameters=params)


# Clients that special-case HF peft (the Trainer, TRL, accelerate) recognise peft_fast's models and layers.
register_layer_types(AdapterLayer)


class PeftModel(hf_peft_model_base()):
    """A base model with adapters. `base_model` is the tuner (LoraModel, IA3Model), whose
    `model` is the wrapped transformers model; state-dict keys start `base_model.model.`.

    Where HF peft is installed, `isinstance(model, peft.PeftModel)` holds, so that clients take
    their PEFT code paths; none of HF peft's code runs on it (see `hf_identity`).

    With prompt-learning adapters (prompt tuning, prefix tuning, P-tuning), as in HF peft,
    `base_model` is the transformers model itself and the encoders are `prompt_encoder.<name>`;
    each task wrapper's forward puts the active adapter's virtual tokens in (`_prompt_forward`)."""

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
            raise TypeError(
                f"peft_config must be a PeftConfig (LoraConfig, IA3Config, ...), got {type(peft_config).__name__}"
            )
        check_adapter_name(adapter_name)
        # The tuner class comes from the registry (ValueError for a peft_type nobody registered).
        tuner = registered_method(peft_config.peft_type).model_cls
        if not peft_config.is_prompt_learning and not issubclass(tuner, BaseTuner):
            raise TypeError(
                f"peft_type {str(peft_config.peft_type)!r} registered model_cls={tuner.__name__}, which is not a"
                " BaseTuner subclass (only prompt-learning methods register a prompt encoder)"
            )
        self._add_task_heads(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        self.peft_type = peft_config.peft_type
        if peft_config.is_prompt_learning:
            # As in HF peft: the base model itself is `base_model` (keys `base_model.<...>`), the
            # encoders are `prompt_encoder.<adapter>`, and `word_embeddings` is registered here too.
            self.base_model = model
            self.prompt_encoder = nn.ModuleDict()
            self.word_embeddings = _input_embeddings(model)
            self._prompt_adapters = PromptLearningAdapters(model, self.prompt_encoder, self.word_embeddings)
            self._prompt_adapters.inject_adapter(model, adapter_name, peft_config)
        else:
            self.base_model = tuner(
                model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
            )
        self._finish_adapter(adapter_name, peft_config, autocast_adapter_dtype, activate=True)
        # `model.forward` shows the base model's arguments (see _BoundForward); calls are unchanged.
        self.__dict__["forward"] = _BoundForward(self)
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

    @property
    def _tuner(self) -> Any:
        """What manages the adapters: the layer tuner (`base_model`), or the prompt-learning bookkeeping."""
        adapters = self.__dict__.get("_prompt_adapters")
        return adapters if adapters is not None else self.base_model

    @property
    def _prompts_active(self) -> bool:
        """Whether forward and generate put an adapter's virtual tokens in (prompt learning, not disabled)."""
        adapters = self.__dict__.get("_prompt_adapters")
        return adapters is not None and adapters.enabled

    def _add_task_heads(self, config: PeftConfig) -> None:
        if not self.task_head_names or not hasattr(config, "modules_to_save"):
            return
        if config.modules_to_save is None:
            config.modules_to_save = list(self.task_head_names)
        else:
            config.modules_to_save = list(config.modules_to_save) + [
                n for n in self.task_head_names if n not in config.modules_to_save
            ]

    def _finish_adapter(
        self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool, activate: bool
    ) -> None:
        """Wrap modules_to_save, set dtypes and trainability of a newly added adapter."""
        model = self.get_base_model()
        if getattr(config, "modules_to_save", None):
            unmatched = set_modules_to_save(
                model, config.modules_to_save, adapter_name, trainable=not config.inference_mode
            )
            unmatched = [n for n in unmatched if n not in self.task_head_names]
            if unmatched:
                warnings.warn(
                    f"modules_to_save entries {unmatched} match no module of the base model; nothing is trained or"
                    " saved for them",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self._tuner.set_adapter(adapter_name if activate else self._tuner.active_adapter)
        for name in self._tuner.active_adapters:  # set_adapter made them trainable: inference mode stays frozen
            if name != adapter_name and self.peft_config[name].inference_mode:
                for p in self._adapter_parameters(name):
                    p.requires_grad_(False)
        if autocast_adapter_dtype:
            self._cast_adapter_dtype(adapter_name)
        if config.inference_mode:
            for p in self._adapter_parameters(adapter_name):
                p.requires_grad_(False)

    def _adapter_parameters(self, adapter_name: str, include_modules_to_save: bool = True) -> Iterator[nn.Parameter]:
        params = dict(self.named_parameters(remove_duplicate=False))
        for model_key in adapter_key_map(self, adapter_name).values():
            if not include_modules_to_save and ".modules_to_save." in model_key:
                continue
            if model_key in params:
                yield params[model_key]
        if "_prompt_adapters" in self.__dict__:
            yield from self.prompt_encoder[adapter_name].parameters()

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """HF peft's autocast_adapter_dtype: fp16/bf16 adapter-layer weights become fp32.

        Copies of modules_to_save keep the base model's dtype (as in HF peft): their input
        comes from the base model in that dtype."""
        for p in self._adapter_parameters(adapter_name, include_modules_to_save=False):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._tuner.peft_config

    @property
    def active_adapter(self) -> str:
        active = self._tuner.active_adapter
        return active if isinstance(active, str) else active[0]

    @property
    def active_adapters(self) -> list[str]:
        return self._tuner.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def modules_to_save(self) -> set[str] | None:
        """Names of the modules trained in full, over all adapters (None when there are none), as in HF peft."""
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or ())
        return names or None

    def get_base_model(self) -> nn.Module:
        return self._tuner.model

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counted as HF peft counts them."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # two 4-bit values per byte of storage
                n *= 2 * p.element_size()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

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
        with self._tuner.mixed_batch(adapter_names, device, encoder_adapter_names):
            yield kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._peft_forward(kwargs) as kw:
            if self._prompts_active:
                return self._prompt_forward(*args, **kw)
            return self.get_base_model()(*args, **kw)

    # -- prompt learning ------------------------------------------------------------------------
    # How a task treats token type ids, per-token targets and per-token outputs when virtual
    # tokens are put in front of the input (prompt tuning, P-tuning); see _prompt_forward.
    prompt_keeps_token_type_ids: bool = False
    prompt_pads_labels: bool = False  # labels get -100 for the virtual tokens
    prompt_drops_virtual_outputs: tuple[str, ...] = ()  # outputs whose virtual positions are cut off

    def get_prompt(self, batch_size: int) -> Any:
        """The active adapter's virtual tokens for a batch: embeddings (batch, n, token_dim)
        for prompt tuning and P-tuning, a transformers cache holding the prefix for prefix tuning."""
        config = self.active_peft_config
        if not config.is_prompt_learning:
            raise TypeError(
                f"get_prompt() needs a prompt-learning adapter; {self.active_adapter!r} is {config.peft_type}"
            )
        virtual = self.prompt_encoder[self.active_adapter].prompt_embeddings()
        if config.peft_type == PeftType.PREFIX_TUNING:
            return prefix_cache(virtual.to(self.get_base_model().dtype), config, batch_size)
        return virtual.expand(batch_size, -1, -1)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What an adapter file stores as `prompt_embeddings`: the encoder's output for its virtual tokens."""
        return self.prompt_encoder[adapter_name].prompt_embeddings().detach().cpu()

    def _prompt_input_embeds(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The input embeddings with the active adapter's (first num_virtual_tokens) virtual tokens in front."""
        if inputs_embeds is None:
            _batch_size(input_ids, inputs_embeds)
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(inputs_embeds.shape[0])[:, : self.active_peft_config.num_virtual_tokens]
        return torch.cat([prompts.to(inputs_embeds.dtype), inputs_embeds], dim=1)

    def _adjust_prompt_kwargs(self, kwargs: dict[str, Any], warn: bool = True) -> None:
        """Position ids shift past a prefix, and are dropped where embeddings are put in front
        (the model counts positions itself); token type ids are dropped where the task ignores them."""
        config = self.active_peft_config
        if kwargs.get("position_ids") is not None:
            if config.peft_type == PeftType.PREFIX_TUNING:
                kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
            else:
                if warn:
                    warnings.warn(
                        "position_ids are ignored with prompt tuning and P-tuning (as in HF peft)", stacklevel=4
                    )
                kwargs["position_ids"] = None
        if not self.prompt_keeps_token_type_ids and kwargs.get("token_type_ids") is not None:
            if warn:
                warnings.warn(
                    f"token_type_ids are ignored with prompt learning for {type(self).__name__} (as in HF peft)",
                    stacklevel=4,
                )
            kwargs["token_type_ids"] = None

    def _prompt_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The forward of a prompt-learning adapter (HF peft's): the attention mask covers the
        virtual tokens; prefix tuning passes them as past_key_values, the other methods as
        input embeddings in front of the input."""
        model = self.get_base_model()
        config = self.active_peft_config
        n = config.num_virtual_tokens
        batch_size = _batch_size(input_ids, inputs_embeds)
        attention_mask = prepend(attention_mask, n, 1)
        self._adjust_prompt_kwargs(kwargs)
        if config.peft_type == PeftType.PREFIX_TUNING:
            _check_takes_cache(model)
            past_key_values = self.get_prompt(batch_size)
            return model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                **kwargs,
            )
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], n, 0)
        if self.prompt_pads_labels and kwargs.get("labels") is not None:
            kwargs["labels"] = prepend(kwargs["labels"], n, -100)
        output = model(
            inputs_embeds=self._prompt_input_embeds(input_ids, inputs_embeds), attention_mask=attention_mask, **kwargs
        )
        for name in self.prompt_drops_virtual_outputs:
            if not hasattr(output, "keys"):
                raise ValueError(f"{type(self).__name__} with prompt learning needs return_dict=True outputs")
            output[name] = output[name][:, n:]
        return output

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new (inactive) adapter; `set_adapter` activates it. If this raises, the model
        (and `peft_config`) are left as they were."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}")
        if peft_config.peft_type != self.peft_type:
            raise ValueError(
                f"cannot add a {peft_config.peft_type} adapter to a model with {self.peft_type} adapters; one method per model"  # noqa: E501
            )
        with _all_or_nothing(self.modules(), self._rollback_objects(peft_config)):
            self._add_task_heads(peft_config)
            if peft_config.base_model_name_or_path is None:
                peft_config.base_model_name_or_path = self.active_peft_config.base_model_name_or_path
            self._tuner.inject_adapter(
                self.get_base_model(), adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage
            )
            self._finish_adapter(adapter_name, peft_config, autocast_adapter_dtype, activate=False)

    def _rollback_objects(self, *configs: PeftConfig) -> list[object]:
        """What an add or load changes besides modules: the given configs, prompt-learning bookkeeping."""
        adapters = self.__dict__.get("_prompt_adapters")
        return [*configs] + ([adapters] if adapters is not None else [])

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter: trainable, or frozen with `inference_mode`
        (HF peft's API: a loaded, frozen adapter becomes trainable unless told otherwise)."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a string, got {type(adapter_name).__name__}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        self._tuner.set_adapter(adapter_name)
        if inference_mode:
            for p in self._adapter_parameters(adapter_name):
                p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        self._tuner.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes as its base model alone."""
        self._tuner.disable_adapter_layers()
        try:
            yield
        finally:
            self._tuner.enable_adapter_layers()

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        self._tuner.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._tuner.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the active adapter into the base weights; return the plain base model."""
        return self._tuner.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove all adapters without merging; return the plain base model."""
        return self._tuner.unload()

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as HF peft does: "default" into the folder, others into sub-folders.

        `state_dict` (the model's full state dict, as the HF Trainer passes it) is where the
        adapter weights are taken from; None: the model's own."""
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
        root = os.path.realpath(save_directory)
        folders = {}
        for name in names:
            check_adapter_name(name, "adapter name")
            folders[name] = os.path.realpath(root if name == "default" else os.path.join(root, name))
            if os.path.commonpath([root, folders[name]]) != root:
                raise ValueError(
                    f"adapter {name!r} would be saved to {folders[name]!r}, outside save_directory {root!r}"
                    " (its sub-folder is a symlink out of it); nothing was saved"
                )
        save_experts = getattr(type(self._tuner), "save_expert_folders", None)
        if callable(save_experts):  # X-LoRA: each expert as a LoRA folder beside the classifier
            save_experts(self._tuner, root, safe_serialization)
        for name, folder in folders.items():
            weights = get_peft_model_state_dict(
                self, state_dict, adapter_name=name, save_embedding_layers=save_embedding_layers
            )
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            save_adapter_folder(folder, weights, config, safe_serialization=safe_serialization)

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
        """Load an adapter folder (HF peft's or ours) onto `model`. If this raises, `model` is
        left as it was (no adapter layers, no `peft_config`)."""
        adapters = kwargs.pop("adapters", None)  # X-LoRA's expert folders (HF peft's keyword)
        if kwargs:
            raise TypeError(f"from_pretrained got unsupported arguments: {sorted(kwargs)}")
        check_adapter_name(adapter_name)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        config, weights = _read_adapter(model_id, config, _load_device(model))
        config_for_load = getattr(registered_method(config.peft_type).model_cls, "config_for_load", None)
        if callable(config_for_load):
            config_for_load(config, str(model_id), adapters)
        elif adapters is not None:
            raise TypeError(f"adapters= is for X-LoRA adapter folders; {str(model_id)!r} holds {config.peft_type}")
        _check_loadable(config, is_trainable)
        target_cls = cls
        if cls is PeftModel and config.task_type is not None:
            target_cls = TASK_MODELS.get(config.task_type, PeftModel)
        with _all_or_nothing(model.modules(), [config]):
            config.inference_mode = not is_trainable
            peft_model = target_cls(
                model,
                config,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
            set_peft_model_state_dict(
                peft_model, weights, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
            )
            if not is_trainable:
                peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load an adapter folder under `adapter_name`: a new adapter (inactive until `set_adapter`),
        or, as in HF peft (the HF Trainer resumes this way), new weights for an existing adapter,
        whose config stays; the file's weights must fit it exactly. If this raises, the model is
        left as it was: configs, modules, parameters, active adapter."""
        if kwargs:
            raise TypeError(f"load_adapter got unsupported arguments: {sorted(kwargs)}")
        check_adapter_name(adapter_name)
        config, weights = _read_adapter(model_id, None, _load_device(self))
        _check_loadable(config, is_trainable)
        if adapter_name in self.peft_config:
            existing = self.peft_config[adapter_name].peft_type
            if config.peft_type != existing:
                raise ValueError(
                    f"adapter {adapter_name!r} is {existing.value}; the folder {str(model_id)!r} holds a"
                    f" {config.peft_type.value} adapter"
                )
            # set_peft_model_state_dict checks every key and shape before it copies anything.
            result = set_peft_model_state_dict(
                self, weights, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
            )
            if not is_trainable:
                self.eval()
            return result
        config.inference_mode = not is_trainable
        with _all_or_nothing(self.modules(), self._rollback_objects()):
            self.add_adapter(
                adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype
            )
            result = set_peft_model_state_dict(
                self, weights, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
            )
            if not is_trainable:
                self.eval()
        return result


def _read_adapter(
    model_id: str | os.PathLike, config: PeftConfig | None, device: torch.device
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config (unless given) and weights, read under one shared lock so
    that both come from the same save."""
    folder = str(model_id)
    if not os.path.isdir(folder):
        raise ValueError(f"adapter folder {folder!r} does not exist (peft_fast loads adapters from local folders only)")
    with folder_lock(folder, shared=True):
        if config is None:
            config = PeftConfig.from_pretrained(folder)
        return config, load_peft_weights(folder, device=device)


class _GenerativePeftModel(PeftModel):
    """Task wrappers whose base model generates text."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        model = self.get_base_model()
        if not hasattr(model, "generate"):
            raise AttributeError(f"{type(model).__name__} has no generate()")
        if self._prompts_active:
            with self._peft_forward(kwargs) as kw, self._prompt_generation_hook(model):
                return self._prompt_generate(model, *args, **kw)
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
        if getattr(self._tuner, "generate_without_cache", False):
            kwargs["use_cache"] = False  # X-LoRA, as HF peft: each step reruns the whole sequence
        with self._peft_forward(kwargs, encoder_adapter_names) as kw:
            return model.generate(*args, **kw)

    # -- prompt learning ------------------------------------------------------------------------
    @contextmanager
    def _prompt_generation_hook(self, model: nn.Module) -> Iterator[None]:
        """While generating, each step's inputs go through `_prepare_prompt_inputs` (as in HF peft)."""
        original = model.prepare_inputs_for_generation
        had_own = "prepare_inputs_for_generation" in vars(model)
        model.prepare_inputs_for_generation = functools.partial(self._prepare_prompt_inputs, original)
        try:
            yield
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def _prompt_generate(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return model.generate(*args, **kwargs)

    def _prepare_prompt_inputs(self, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover - per task


class PeftModelForCausalLM(_GenerativePeftModel):
    prompt_pads_labels = True

    def _prepare_prompt_inputs(self, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One generation step's model inputs: the first step puts the virtual tokens in (as
        embeddings, or as the prefix cache); every step's attention mask covers them."""
        config = self.active_peft_config
        model_kwargs = original(*args, **kwargs)
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("generate() with a prompt-learning adapter needs input_ids, not inputs_embeds")
        cache = model_kwargs.get("past_key_values")
        cached = cache.get_seq_length() if cache is not None else 0
        if cached >= input_ids.shape[1]:  # the cache holds the virtual tokens too: only new tokens go in
            model_kwargs["input_ids"] = input_ids = input_ids[:, -1:]
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(
                    "generate() with a prompt-learning adapter needs 2-D attention masks (a dynamic cache, not a static one)"  # noqa: E501
                )
            model_kwargs["attention_mask"] = prepend(mask, config.num_virtual_tokens, 1)
        self._adjust_prompt_kwargs(model_kwargs, warn=False)
        if cached == 0:
            if config.peft_type == PeftType.PREFIX_TUNING:
                model_kwargs["past_key_values"] = self.get_prompt(input_ids.shape[0])
            else:
                model_kwargs["inputs_embeds"] = self._prompt_input_embeds(input_ids, None)
                model_kwargs["input_ids"] = None
        return model_kwargs


class PeftModelForSeq2SeqLM(_GenerativePeftModel):
    def _prompt_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """As HF peft: prefix tuning's virtual tokens go into the decoder's self-attention (the
        decoder mask covers them); prompt tuning's and P-tuning's in front of the encoder input."""
        model = self.get_base_model()
        n = self.active_peft_config.num_virtual_tokens
        self._adjust_prompt_kwargs(kwargs)
        if self.active_peft_config.peft_type == PeftType.PREFIX_TUNING:
            return model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_attention_mask=prepend(decoder_attention_mask, n, 1),
                past_key_values=self.get_prompt(_batch_size(input_ids, inputs_embeds)),
                **kwargs,
            )
        return model(
            inputs_embeds=self._prompt_input_embeds(input_ids, inputs_embeds),
            attention_mask=prepend(attention_mask, n, 1),
            decoder_attention_mask=decoder_attention_mask,
            **kwargs,
        )

    def _prompt_generate(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Prompt tuning and P-tuning hand generate the encoder's input embeddings with the virtual tokens in front."""
        config = self.active_peft_config
        if args or "input_ids" not in kwargs:
            raise ValueError(
                "generate() of a seq2seq model with a prompt-learning adapter needs input_ids=... as a keyword"
            )
        self._adjust_prompt_kwargs(kwargs)
        if config.peft_type == PeftType.PREFIX_TUNING:
            return model.generate(**kwargs)
        kwargs["inputs_embeds"] = self._prompt_input_embeds(kwargs.pop("input_ids"), None)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = prepend(kwargs["attention_mask"], config.num_virtual_tokens, 1)
        return model.generate(**kwargs)

    def _prepare_prompt_inputs(self, original: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Prefix tuning: the first generation step gets the prefix cache."""
        model_kwargs = original(*args, **kwargs)
        if self.active_peft_config.peft_type == PeftType.PREFIX_TUNING:
            first = kwargs.get("is_first_iteration")
            if first is None:
                cache = model_kwargs.get("past_key_values")
                first = cache is None or cache.get_seq_length() == 0
            if first:
                model_kwargs["past_key_values"] = self.get_prompt(model_kwargs["decoder_input_ids"].shape[0])
        return model_kwargs


class PeftModelForSequenceClassification(PeftModel):
    task_head_names = SEQ_CLS_HEAD_NAMES
    prompt_keeps_token_type_ids = True


class PeftModelForTokenClassification(PeftModel):
    """With prompt tuning or P-tuning the logits keep one row per input token: the virtual
    tokens' rows are cut off (and their labels ignored). HF peft returns them too."""

    task_head_names = SEQ_CLS_HEAD_NAMES
    prompt_keeps_token_type_ids = True
    prompt_pads_labels = True
    prompt_drops_virtual_outputs = ("logits",)


class PeftModelForQuestionAnswering(PeftModel):
    """With prompt tuning or P-tuning the start/end logits keep one entry per input token, and
    the loss is computed on those (HF peft returns the virtual tokens' entries too, and reads
    start/end positions as positions in the longer sequence)."""

    task_head_names = ("qa_outputs",)
    prompt_keeps_token_type_ids = True
    prompt_drops_virtual_outputs = ("start_logits", "end_logits")

    def _prompt_forward(
        self,
        *args: Any,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super()._prompt_forward(*args, **kwargs)
        if start_positions is None or end_positions is None or output.get("start_logits") is None:
            return output
        loss = _span_loss(output["start_logits"], output["end_logits"], start_positions, end_positions)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})


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
