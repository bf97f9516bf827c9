"""XLoraModel: HF peft 0.21's X-LoRA (a mixture of LoRA experts) on peft_fast's LoRA layers.

Structure and state-dict keys are HF peft's: the tuner holds `lora_model` (a LoraModel with
the experts as adapters "0", "1", ... in the order of `config.adapters`, whatever the
experts' names; HF peft 0.21.2 needs the names themselves to be "0", "1", ...) and
`internal_xlora_classifier`. A forward pre-hook on the base model runs the scaling pass
(under no_grad, every scaling = scaling_pass_value, its loss not computed), feeds the last
hidden state to the classifier, and the model's own forward then runs with those scalings
(see layer.py).

Files: the adapter file holds the classifier (`base_model.internal_xlora_classifier.*`,
HF peft's keys, all of them: HF peft 0.21.2's save drops the keys holding ".0."), and
save_pretrained writes each expert as a LoRA adapter folder in a sub-folder named after it,
so a saved X-LoRA folder loads without `adapters=` (HF peft's `adapters=` works too).
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ..base import BaseTuner
from ..lora.config import LoraConfig
from ..lora.layer import LoraLayer, LoraLinear
from ..lora.model import LoraModel
from .classifier import XLoraClassifier
from .config import XLoraConfig, check_top_k
from .layer import XLoraLinearLayer

CLASSIFIER = "internal_xlora_classifier"


def _expert_error(name: str, path: str, why: str) -> ValueError:
    return ValueError(f"X-LoRA expert {name!r} ({path!r}): {why}")


def _read_expert(name: str, path: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An expert folder's LoraConfig and weights; ValueError naming the expert otherwise."""
    from ...save_and_load import load_peft_weights

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise _expert_error(name, str(path), "the folder does not exist (experts load from local LoRA folders)")
    try:
        config = PeftConfig.from_pretrained(path)
        weights = load_peft_weights(path)
    except ValueError as e:
        raise _expert_error(name, str(path), str(e)) from e
    if not isinstance(config, LoraConfig):
        raise _expert_error(name, str(path), f"X-LoRA experts must be LoRA adapters, got {config.peft_type}")
    return config, weights


class XLoraModel(BaseTuner):
    """X-LoRA over LoRA experts (HF peft's XLoraModel: same attributes, keys and methods)."""

    prefix = "xlora_"
    # Generation runs without a KV cache: every step's scaling pass needs the whole sequence.
    generate_without_cache = True

    def __init__(
        self, model: nn.Module, peft_config: dict[str, PeftConfig], adapter_name: str, low_cpu_mem_usage: bool = False
    ) -> None:
        nn.Module.__init__(self)
        conf = peft_config[adapter_name]
        if not isinstance(conf, XLoraConfig):
            raise TypeError(f"XLoraModel needs an XLoraConfig, got {type(conf).__name__}")
        if getattr(getattr(model, "config", None), "use_cache", False):
            raise ValueError("`use_cache` must be False")
        if not conf.adapters:
            raise ValueError("adapters must name at least one LoRA expert folder, got an empty dict")
        check_top_k(conf.top_k_lora, len(conf.adapters))
        self.peft_config: dict[str, PeftConfig] = {adapter_name: conf}
        self.active_adapter = adapter_name
        self.xlora_config = conf
        self.lora_model = self._load_experts(model, conf, low_cpu_mem_usage)
        self.expert_names = list(conf.adapters)
        self._maybe_freeze_all_adapters()

        experts = [str(i) for i in range(len(self.expert_names))]
        self._xlora_layers: list[XLoraLinearLayer] = []
        device = None
        for key, module in model.named_modules():
            if isinstance(module, LoraLinear) and type(module) is LoraLinear:
                layer = XLoraLinearLayer(self, module, len(self._xlora_layers), experts)
                module.forward = layer.forward  # type: ignore[method-assign]
                self._xlora_layers.append(layer)
                device = module.lora_A[experts[0]].weight.device
            elif isinstance(module, LoraLayer):
                raise ValueError(
                    f"X-LoRA supports experts on nn.Linear / Conv1D layers; {key!r} is a {type(module).__name__}"
                )
        self.classifier_dtype = next(model.parameters()).dtype
        self.internal_xlora_classifier = XLoraClassifier(
            conf, len(experts), len(self._xlora_layers), device, self.classifier_dtype
        )
        self.internal_xlora_scalings: torch.Tensor | None = None
        self.disabled = False
        self._pass: str | None = None  # None (no X-LoRA forward), "scaling" or "real"
        self._in_scaling_pass = False
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward),
        ]
        self.eval()

    # -- experts -------------------------------------------------------------------------------
    @staticmethod
    def _load_experts(model: nn.Module, conf: XLoraConfig, low_cpu_mem_usage: bool) -> LoraModel:
        """A LoraModel holding every expert as adapter "0", "1", ... with its weights loaded.
        ValueError naming the expert when its folder is missing or unreadable, it is not LoRA,
        it adapts other modules than the first expert, or was trained on another base model."""
        from ...peft_model import _all_or_nothing  # the model's modules come back as they were on error

        with _all_or_nothing(model.modules()):
            return XLoraModel._inject_experts(model, conf, low_cpu_mem_usage)

    @staticmethod
    def _inject_experts(model: nn.Module, conf: XLoraConfig, low_cpu_mem_usage: bool) -> LoraModel:
        from ...save_and_load import set_peft_model_state_dict

        # Every folder is read and checked before the model is touched.
        read = {name: _read_expert(name, path) for name, path in conf.adapters.items()}
        base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        bases = {name: config.base_model_name_or_path for name, (config, _) in read.items()}
        first_name = next(iter(read))
        for name, base in bases.items():
            if base and base_name and base != base_name:
                raise _expert_error(
                    name, conf.adapters[name], f"trained on base model {base!r}, but the model is {base_name!r}"
                )
            first_base = bases[first_name]
            if base and first_base and base != first_base:
                raise _expert_error(
                    name,
                    conf.adapters[name],
                    f"trained on base model {base!r}, expert {first_name!r} on {first_base!r}",
                )
        lora_model: LoraModel | None = None
        first: tuple[str, set[str]] | None = None
        for i, (name, (config, weights)) in enumerate(read.items()):
            path = conf.adapters[name]
            config = copy.deepcopy(config)
            config.inference_mode = False
            adapter = str(i)
            try:
                if lora_model is None:
                    lora_model = LoraModel(model, {adapter: config}, adapter, low_cpu_mem_usage=low_cpu_mem_usage)
                else:
                    lora_model.inject_adapter(model, adapter, config, low_cpu_mem_usage=low_cpu_mem_usage)
                stripped = {k.removeprefix("base_model."): v for k, v in weights.items()}
                set_peft_model_state_dict(lora_model, stripped, adapter_name=adapter)
            except ValueError as e:
                raise _expert_error(name, path, str(e)) from e
            adapted = {k for k, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}
            if first is None:
                first = (name, adapted)
            elif adapted != first[1]:
                diff = sorted(adapted ^ first[1])
                raise _expert_error(
                    name,
                    path,
                    f"adapts other modules than expert {first[0]!r} (target modules differ, e.g. {diff[:3]});"
                    " X-LoRA experts must adapt the same modules",
                )
        assert lora_model is not None
        experts = [str(i) for i in range(len(conf.adapters))]
        lora_model.set_adapter(experts)
        for m in lora_model.adapter_layers():  # HF peft's autocast_adapter_dtype: fp16/bf16 experts become fp32
            for p in list(m.lora_A.parameters()) + list(m.lora_B.parameters()):
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
        return lora_model

    def _maybe_freeze_all_adapters(self) -> None:
        """Freeze the experts unless `use_trainable_adapters` (HF peft's rule: names with '.lora_')."""
        if not self.xlora_config.use_trainable_adapters:
            for name, param in self.lora_model.named_parameters():
                if ".lora_" in f".{name}":
                    param.requires_grad_(False)

    # -- what BaseTuner and PeftModel expect ------------------------------------------------------
    @property
    def model(self) -> nn.Module:  # type: ignore[override]
        """The wrapped transformers model (held by `lora_model`, as in HF peft)."""
        return self.lora_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self.active_adapter]:
            raise ValueError(f"an X-LoRA model has the one adapter {self.active_adapter!r}; got {adapter_name!r}")

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("an X-LoRA model holds one X-LoRA adapter; list more experts in XLoraConfig.adapters instead")

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError("the X-LoRA adapter cannot be deleted; unload() returns the base model")

    def enable_adapter_layers(self) -> None:
        self.disabled = False

    def disable_adapter_layers(self) -> None:
        self.disabled = True

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("X-LoRA mixes its experts per token; it cannot be merged into the base weights")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError("X-LoRA mixes its experts per token; it cannot be merged into the base weights")

    def unload(self) -> nn.Module:
        """The base model without experts, classifier or the X-LoRA hooks."""
        for hook in self._hooks:
            hook.remove()
        for layer in self._xlora_layers:
            layer.target.__dict__.pop("forward", None)
        return self.lora_model.unload()

    # -- the two passes ----------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Before the base model's forward: the scaling pass and the classifier."""
        if self.disabled or self._in_scaling_pass:
            return None
        scaling_kwargs = dict(kwargs)
        scaling_kwargs.pop("labels", None)  # only the hidden states are needed: no loss
        scaling_kwargs["output_hidden_states"] = True
        scaling_kwargs["return_dict"] = True
        if self._takes_logits_to_keep:  # only the hidden states are read: one position's logits suffice
            scaling_kwargs["logits_to_keep"] = 1
        self._in_scaling_pass, self._pass = True, "scaling"
        try:
            with torch.no_grad():
                output = module(*args, **scaling_kwargs)
        finally:
            self._in_scaling_pass, self._pass = False, None
        hidden = output.hidden_states[-1]
        scalings = self.internal_xlora_classifier(hidden.to(self.classifier_dtype))
        self.internal_xlora_scalings = scalings
        self._pass = "real"
        return None

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._in_scaling_pass:
            self._pass = None
        return None

    # -- HF peft's X-LoRA methods ------------------------------------------------------------------
    def set_topk_lora(self, value: int | None) -> None:
        """Keep only the top `value` experts per token (None: all). Kept in the config."""
        check_top_k(value, len(self.expert_names))
        self.internal_xlora_classifier.config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiply every expert's output by `weight` (default 1). Kept in the config."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"weight must be a number, got {weight!r}")
        self.internal_xlora_classifier.config.global_scaling_weight = weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """The scalings' value during the scaling pass; None means 1 / n_experts."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"value must be a number or None, got {value!r}")
        self.internal_xlora_classifier.set_override_scaling_pass_value(value)

    def get_global_scaling_weight(self) -> float:
        return self.internal_xlora_classifier.config.global_scaling_weight

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The last scalings predicted, (batch, seq, n_layers, n_experts), or None before any forward."""
        return self.internal_xlora_scalings

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the list of logged scalings (the tensors themselves are not copied)."""
        return self.internal_xlora_classifier.log_scalings.copy()

    def enable_scalings_logging(self) -> None:
        self.internal_xlora_classifier.scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging; the log is kept."""
        self.internal_xlora_classifier.scalings_logging = False

    def clear_scalings_log(self) -> None:
        self.internal_xlora_classifier.log_scalings.clear()

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: {seq_len: (positions in the log, scalings)}."""
        return self.internal_xlora_classifier.bucketed_scalings()

    # -- files -------------------------------------------------------------------------------------
    def adapter_state_keys(self, adapter_name: str) -> list[str]:
        """This tuner's own weights an adapter file holds (keys relative to the tuner): the classifier."""
        return [f"{CLASSIFIER}.{k}" for k in self.internal_xlora_classifier.state_dict()]

    def save_expert_folders(self, root: str, safe_serialization: bool) -> None:
        """Write each expert as a LoRA adapter folder `root/<expert name>` (HF peft's LoRA format);
        ValueError before writing anything when an expert's name is not a plain folder name."""
        from ...save_and_load import adapter_key_map, check_adapter_name, save_adapter_folder

        for name in self.expert_names:  # all checked before anything is written
            check_adapter_name(name, "X-LoRA expert name (it names the expert's sub-folder)")
        state = self.lora_model.state_dict()
        for i, name in enumerate(self.expert_names):
            adapter = str(i)
            weights = {f"base_model.{fk}": state[mk] for fk, mk in adapter_key_map(self.lora_model, adapter).items()}
            config = copy.deepcopy(self.lora_model.peft_config[adapter])
            config.inference_mode = True
            save_adapter_folder(os.path.join(root, name), weights, config, safe_serialization=safe_serialization)

    @staticmethod
    def config_for_load(config: PeftConfig, model_id: str, adapters: dict[str, str] | None) -> None:
        """Where a loaded X-LoRA config's experts are: `adapters` (HF peft's keyword) when given,
        else the sub-folders save_pretrained wrote (`model_id/<expert name>`)."""
        assert isinstance(config, XLoraConfig)
        if adapters is not None:
            if not isinstance(adapters, dict):
                raise TypeError(f"adapters must be a dict {{expert name: LoRA folder}}, got {type(adapters).__name__}")
            config.adapters = dict(adapters)
            return
        folders = {}
        for name in config.adapters:
            folder = os.path.join(str(model_id), name)
            if not os.path.isdir(folder):
                raise _expert_error(
                    name,
                    folder,
                    "no such sub-folder in the saved X-LoRA folder; pass adapters={name: folder} to from_pretrained",
                )
            folders[name] = folder
        config.adapters = folders


def warn_missing_classifier_keys(missing: list[str]) -> None:
    """The X-LoRA file lacks some classifier weights (HF peft 0.21.2 does not save keys holding
    '.0.'): they keep their current values, as HF peft leaves them."""
    warnings.warn(
        f"the X-LoRA adapter file lacks classifier weights {missing}; they keep their current (initial) values"
        " (HF peft 0.21.2's save_pretrained drops the classifier keys that contain '.0.')",
        RuntimeWarning,
        stacklevel=4,
    )
