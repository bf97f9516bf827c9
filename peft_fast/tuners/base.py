"""What every layer-injecting method (LoRA, IA³) shares: finding target modules, swapping
in adapter layers, trainable-parameter bookkeeping, adapter switching, merging and unloading.

Module structure and parameter names follow HF peft, so that state-dict keys are the same:
`<target>.base_layer.weight`, `<target>.lora_A.<adapter>.weight`, `<target>.ia3_l.<adapter>`,
`<head>.modules_to_save.<adapter>.weight`, ...
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..ops.mixed_batch import RowGroups, group_rows

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
SEQ_CLS_HEAD_NAMES = ("classifier", "score")
BASE_ADAPTER = "__base__"


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def fan_in_fan_out_for(target: nn.Module, config: PeftConfig, key: str) -> bool:
    """How a Linear-like target stores its weight: Conv1D is (in, out), so it always needs
    fan_in_fan_out (set on the config too, as HF peft does, without a warning); nn.Linear is
    (out, in), so a config that says otherwise is corrected with a warning."""
    if is_conv1d(target):
        config.fan_in_fan_out = True
        return True
    if getattr(config, "fan_in_fan_out", False):
        warnings.warn(
            f"fan_in_fan_out=True but {key!r} is an nn.Linear (weight stored (out, in)); using False for it",
            stacklevel=3,
        )
    return False


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is (in, out))."""
    if is_conv1d(layer):
        n_in, n_out = layer.weight.shape
        return n_in, n_out
    return layer.in_features, layer.out_features


def _name_matches(key: str, names: str | Iterable[str]) -> bool:
    """HF peft's rule: a string is a regex that must match the whole key; a list matches a key
    equal to an entry or ending in `.entry`."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith(f".{n}") for n in names)


def _layer_index(config: PeftConfig, key: str) -> int | None:
    """The index of the layer (block) module `key` sits in, as HF peft finds it: the number
    after `layers_pattern` (or after the first two name parts), or None."""
    pattern = getattr(config, "layers_pattern", None)
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return None if match is None else int(match.group("idx"))


def _layers_to_transform(config: PeftConfig) -> list[int] | None:
    """`layers_to_transform` as a list, or None where it selects every layer."""
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return None
    return [indexes] if isinstance(indexes, int) else list(indexes)


def _layer_index_allowed(config: PeftConfig, key: str) -> bool:
    indexes = _layers_to_transform(config)
    return indexes is None or _layer_index(config, key) in indexes


def pattern_matches(pattern: str, key: str) -> bool:
    """HF peft's rule for rank_pattern/alpha_pattern keys: the pattern matches the key's end."""
    return re.match(rf"(.*\.)?({pattern})$", key) is not None


def is_target(config: PeftConfig, key: str) -> bool:
    """Whether the module named `key` gets an adapter under `config` (HF peft's matching)."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _name_matches(key, exclude):
        return False
    mts = getattr(config, "modules_to_save", None)
    if mts and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in mts):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return _name_matches(key, targets) and _layer_index_allowed(config, key)


# From this many listed targets on, LoRA stores them as the shortest name suffixes that
# still pick out exactly the same modules (as HF peft does, so configs match).
MIN_TARGETS_TO_SHORTEN = 20


def _suffixes(name: str) -> list[str]:
    """ "a.b.c" -> ["c", "b.c", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def shortest_target_suffixes(targets: set[str], other_names: Iterable[str]) -> set[str]:
    """A small set of name suffixes that matches every name in `targets` and none of
    `other_names`; `targets` itself where no suffix is shorter."""
    taken = {sfx for name in other_names for sfx in _suffixes(name)}
    chosen: set[str] = set()
    for name in sorted(targets, key=_suffixes):
        if any(name == c or name.endswith(f".{c}") for c in chosen):
            continue
        for sfx in _suffixes(name):
            if sfx not in taken and sfx not in chosen:
                chosen.add(sfx)
                break
    return chosen or set(targets)


class AdapterLayer(nn.Module):
    """A wrapped base layer that carries one or more named adapters.

    Subclasses name their per-adapter containers in `adapter_layer_names` (parameters) and
    `other_param_names` (plain per-adapter numbers)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Set by the model for the length of one mixed-batch forward (see BaseTuner.mixed_batch).
        self._mixed_batch: MixedBatch | None = None

    # -- what HF peft's BaseTunerLayer offers ------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else list(self._active_adapters)

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for n in getattr(self, attr).keys():
                if n not in names:
                    names.append(n)
        return names

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Activate these adapters; their parameters become trainable, all others frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for key, item in container.items():
                item.requires_grad_(key in names)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Enable or disable the adapters; as in HF peft, disabling freezes every adapter
        parameter and enabling makes the active adapters trainable again."""
        if enabled:
            self.set_adapter(self._active_adapters)
        else:
            for attr in self.adapter_layer_names:
                for item in getattr(self, attr).values():
                    item.requires_grad_(False)
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        if adapter_name in self._active_adapters:
            remaining = self.adapter_names()
            self._active_adapters = [a for a in self._active_adapters if a != adapter_name] or remaining[:1]
            if self._active_adapters:
                self.set_adapter(self._active_adapters)

    # -- merging -----------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adapters_to_merge(self, adapter_names: Sequence[str] | None) -> list[str]:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of adapter names, got the string {adapter_names!r}")
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if self.merged:  # HF peft's `check_adapters_to_merge`, with its warnings
            names = [n for n in names if n not in self.merged_adapters]
            if names:
                merged, more = ",".join(self.merged_adapters), ",".join(names)
                message = f"Already following adapters were merged {merged}. You are now additionally merging {more}."
                warnings.warn(message, stacklevel=3)
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
        return [n for n in names if n in self.adapter_names()]

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weights, the last merged first; with none merged,
        HF peft's "Already unmerged. Nothing to do." warning and nothing else."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._unmerge()

    def _unmerge(self) -> None:
        """Unmerge the merged adapters (there is at least one)."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self._mixed_batch is not None:
            self._mixed_batch.check_rows(x.shape[0])
            return self._mixed_forward(x, self._mixed_batch)
        if not self.merged:
            out = self._adapted_forward(x)
            if out is not None:
                return out
        return self.base_layer(x, *args, **kwargs)

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output with the active adapters applied, or None where none is active here."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _mixed_forward(self, x: torch.Tensor, mb: MixedBatch) -> torch.Tensor:
        """The output when each batch row picks its own adapter."""
        raise ValueError(f"adapter_names (mixed adapter batches) are not supported by {type(self).__name__}")

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in): a transposed view where it is stored (in, out)."""
        w = self.base_layer.weight
        return w.T if getattr(self, "fan_in_fan_out", False) else w

    def _check_mixed_batch_merged(self) -> None:
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")


class MixedBatch:
    """One forward's `adapter_names` (one per batch row), turned into indexes once per batch.

    `row_slot[i]` indexes `names`; each layer maps those slots to its own adapters with
    `rows_for`, a tiny lookup, so the grouping is computed once for all layers. `plan_for`
    gives every backend the rows grouped by adapter (`ops.mixed_batch.RowGroups`), built in
    plain Python from the names (no device read, no graph break under torch.compile) once
    per batch and adapter list."""

    def __init__(self, adapter_names: Sequence[str], device: torch.device | None = None) -> None:
        self.names: list[str] = list(dict.fromkeys(adapter_names))
        slot = {n: i for i, n in enumerate(self.names)}
        self.batch_size = len(adapter_names)
        self.row_slot = torch.tensor([slot[n] for n in adapter_names], dtype=torch.long, device=device)
        self._row_slot_host: list[int] = [slot[n] for n in adapter_names]
        self._cache: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}
        self._plans: dict[tuple[tuple[str, ...], torch.device], RowGroups] = {}

    def rows_for(self, layer_adapters: Sequence[str], device: torch.device) -> torch.Tensor:
        """Per row, the index into `layer_adapters` of its adapter, or -1 (base only)."""
        key = (tuple(layer_adapters), device)
        if key not in self._cache:
            lut = torch.tensor(
                [layer_adapters.index(n) if n in layer_adapters else -1 for n in self.names],
                dtype=torch.long,
                device=device,
            )
            self._cache[key] = lut[self.row_slot.to(device)]
        return self._cache[key]

    def plan_for(self, layer_adapters: Sequence[str], device: torch.device) -> RowGroups:
        """The rows grouped by their adapter's index in `layer_adapters` (see RowGroups)."""
        key = (tuple(layer_adapters), device)
        if key not in self._plans:
            lut = [layer_adapters.index(n) if n in layer_adapters else -1 for n in self.names]
            self._plans[key] = group_rows([lut[s] for s in self._row_slot_host], device)
        return self._plans[key]

    def check_rows(self, n_rows: int) -> None:
        if n_rows != self.batch_size:
            raise ValueError(
                f"adapter_names has {self.batch_size} entries but the batch has {n_rows} rows; "
                "pass one adapter name per row"
            )


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full per adapter (classifier heads): HF peft's `modules_to_save`."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: str | None = None
        self.disable_adapters = False
        self._mixed_batch: MixedBatch | None = None
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    @property
    def active_adapter(self) -> str | None:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if self._active_adapter is not None else []

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(f"modules_to_save can have only one active adapter, got {names}")
        name = names[0] if names else None
        for key, module in self.modules_to_save.items():
            module.requires_grad_(key == name)
        self._active_adapter = name if name in self.modules_to_save else None

    def enable_adapters(self, enabled: bool) -> None:
        """As in HF peft: disabling freezes every copy, enabling makes the active one trainable."""
        for key, module in self.modules_to_save.items():
            module.requires_grad_(enabled and key == self._active_adapter)
        self.disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = next(iter(self.modules_to_save.keys()), None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.original_module, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._mixed_batch is not None and not self.disable_adapters:
            return self._mixed_forward(x, *args, **kwargs)
        if self.disable_adapters or self._active_adapter is None:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[self._active_adapter](x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mb = self._mixed_batch
        assert mb is not None
        mb.check_rows(x.shape[0])
        names = list(self.modules_to_save.keys())
        rows_idx = mb.rows_for(names, x.device)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k in range(-1, len(names)):
            rows = (rows_idx == k).nonzero().flatten()
            if rows.numel() == 0:
                continue
            module = self.original_module if k < 0 else self.modules_to_save[names[k]]
            parts.append((rows, module(x[rows], *args, **kwargs)))
        out = parts[0][1].new_empty((x.shape[0],) + parts[0][1].shape[1:])
        for rows, y in parts:
            out[rows] = y.to(out.dtype)
        return out


class BaseTuner(nn.Module):
    """Holds the wrapped model (`self.model`) and the configs of its adapters.

    Subclasses implement `_create_layer` (wrap a target module) and `_mark_trainable`."""

    prefix: str = ""  # the parameter-name prefix of this method's adapter weights ("lora_", "ia3_")
    shorten_targets: bool = False
    layer_cls: type[AdapterLayer] = AdapterLayer
    # HF peft's default target modules per transformers model type (see targets.py).
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(
        self, model: nn.Module, peft_config: dict[str, PeftConfig], adapter_name: str, low_cpu_mem_usage: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.inject_adapter(model, adapter_name, peft_config[adapter_name], low_cpu_mem_usage=low_cpu_mem_usage)
        self.model.peft_config = self.peft_config  # as HF peft does: the base model knows its adapters

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, as HF peft's tuners do (clients call `peft_model.base_model(...)`)."""
        return self.model(*args, **kwargs)

    # -- injection ----------------------------------------------------------------------------
    def _prepare_config(self, config: PeftConfig, model: nn.Module) -> PeftConfig:
        """Fill in default target modules and expand "all-linear" (HF peft's rules)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None:
            defaults = self.target_module_mapping.get(model_type)
            if defaults is None:
                raise ValueError(
                    f"target_modules is not set and there is no default for model type {model_type!r}; "
                    "pass target_modules=[...] naming the layers to adapt"
                )
            config.target_modules = set(defaults)
        # Also with target_modules given (HF peft fills IA³'s feedforward_modules either way).
        self._fill_default_extras(config, model_type)
        if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            config.target_modules = self._all_linear_names(model, config)
        return config

    def _fill_default_extras(self, config: PeftConfig, model_type: str | None) -> None:
        """Hook for methods with more per-model defaults (IA³'s feed-forward modules)."""

    @staticmethod
    def _all_linear_names(model: nn.Module, config: PeftConfig) -> set[str]:
        names = {
            name for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES) or isinstance(m, AdapterLayer)
        }
        exclude: set[str] = set()
        get_out = getattr(model, "get_output_embeddings", None)
        out_emb = get_out() if callable(get_out) else None
        if out_emb is not None:
            exclude |= {n for n, m in model.named_modules() if m is out_emb}
        elif str(config.task_type) == "SEQ_CLS":
            for head in SEQ_CLS_HEAD_NAMES:
                mod = getattr(model, head, None)
                if mod is not None:
                    exclude |= {n for n, m in model.named_modules() if m is mod}
                    break
        for prefix, m in model.named_modules():
            if isinstance(m, AdapterLayer):
                exclude |= {f"{prefix}.{s}" for s, _ in m.named_modules() if s}
        return names - exclude

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Wrap every target module of `model` with an adapter layer carrying `adapter_name`.

        `low_cpu_mem_usage=True` is accepted for HF peft's signature, but the adapter weights are
        still created initialized on the base layers' device (HF peft leaves them empty on the meta
        device): the model is the same and usable, only this step saves no memory or time. A
        warning says so."""
        if low_cpu_mem_usage:
            warnings.warn(
                "low_cpu_mem_usage=True: peft_fast creates the adapter weights initialized on the base layers'"
                " device, not empty on the meta device as HF peft does; the model is the same, but creating it"
                " saves no memory or time",
                UserWarning,
                stacklevel=2,
            )
        config = self._prepare_config(config, model)
        self._check_new_adapter_config(config)
        targets = config.target_modules
        if self.shorten_targets and isinstance(targets, (set, list)) and len(targets) >= MIN_TARGETS_TO_SHORTEN:
            others = [k for k, _ in model.named_modules() if not _name_matches(k, targets)]
            shorter = shortest_target_suffixes(set(targets), others)
            if len(shorter) < len(targets):
                config.target_modules = shorter
        candidates = [
            key
            for key, module in model.named_modules()
            if key and not isinstance(module, ModulesToSaveWrapper) and not _inside_adapter_layer(key, model)
        ]
        _check_layers_to_transform(config, candidates)
        if not any(is_target(config, key) for key in candidates):
            raise ValueError(_why_no_target(config, candidates, model))
        self.peft_config[adapter_name] = config
        matched: list[str] = []
        for key in candidates:
            # Skip modules inside a layer wrapped earlier in this loop (a target inside a target).
            if not is_target(config, key) or _inside_adapter_layer(key, model):
                continue
            module = model.get_submodule(key)
            matched.append(key)
            parent, child_name = _parent_of(model, key)
            if isinstance(module, AdapterLayer):
                if not isinstance(module, self.layer_cls):
                    raise ValueError(
                        f"module {key!r} already carries an adapter of another method ({type(module).__name__})"
                    )
                self._update_layer(module, adapter_name, config, key)
            else:
                new = self._create_layer(module, adapter_name, config, key)
                setattr(parent, child_name, new)
        _warn_unmatched_patterns(config, matched)
        self._check_targets_found(config, matched)
        # Only the active adapters' parameters train; the caller (PeftModel) freezes adapters in inference mode.
        self._mark_trainable(model, adapter_name)

    def _check_targets_found(self, config: PeftConfig, matched: list[str]) -> None:
        """Hook: per-method checks once the matched module names are known."""

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        bias = getattr(config, "bias", "none")
        if len(self.peft_config) > 0 and bias != "none":
            raise ValueError(
                f"{type(self).__name__} supports only one adapter with bias != 'none'; got bias={bias!r} for a"
                f" second adapter"
            )

    def _create_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, key: str) -> AdapterLayer:
        raise NotImplementedError  # pragma: no cover - abstract

    def _update_layer(self, layer: AdapterLayer, adapter_name: str, config: PeftConfig, key: str) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def _mark_trainable(self, model: nn.Module, adapter_name: str) -> None:
        """Freeze everything but adapter parameters of the active adapters."""
        for n, p in model.named_parameters():
            if self.prefix not in n:
                p.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, AdapterLayer):
                m.set_adapter(self.active_adapters)

    # -- adapter files (hooks for methods whose files differ from their modules' state) -------
    def shared_adapter_keys(self, adapter_name: str) -> dict[str, str]:
        """{file key: model key}, both relative to this tuner, of adapter weights held by the
        tuner itself rather than by a layer (VeRA's shared projections); none by default."""
        return {}

    def adapter_state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's weights (file keys) as they go into the file; unchanged by default."""
        return state

    def prepare_adapter_load(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fit the model to a file's weights (file keys) before they are checked and copied, and
        return the weights to load; unchanged by default."""
        return state

    # -- layers -----------------------------------------------------------------------------
    def adapter_layers(self) -> Iterable[AdapterLayer]:
        return (m for m in self.model.modules() if isinstance(m, AdapterLayer))

    def _wrappers(self) -> Iterable[ModulesToSaveWrapper]:
        return (m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"adapter {n!r} does not exist; adapters: {list(self.peft_config)}")
        for layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()
            layer.set_adapter(names)
        activate_modules_to_save(self.model, names)
        self.active_adapter = adapter_name

    def enable_adapter_layers(self) -> None:
        for m in list(self.adapter_layers()) + list(self._wrappers()):
            m.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for m in list(self.adapter_layers()) + list(self._wrappers()):
            m.enable_adapters(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        for layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for w in self._wrappers():
            w.delete_adapter(adapter_name)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining:
            remaining = list(self.peft_config)[:1]
        # As HF peft: after a delete the tuner's active adapter is a list (PeftModel.active_adapter its first).
        self.active_adapter = remaining

    # -- merging / unloading ------------------------------------------------------------------
    def _check_mergeable(self) -> None:
        for layer in self.adapter_layers():
            if any(isinstance(p, torch.Tensor) and p.device.type == "meta" for p in layer.parameters()):
                raise ValueError("cannot merge adapters whose weights are on the meta device; load real weights first")

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' weight deltas into the base weights (in place; reversible with unmerge_adapter)."""
        self._check_mergeable()
        for layer in self.adapter_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Unmerge every adapter layer; as in HF peft, each layer with nothing merged warns."""
        for layer in self.adapter_layers():
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        if merge:
            self._check_mergeable()
        for key, module in list(self.model.named_modules()):
            if isinstance(module, AdapterLayer):
                if merge:
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                parent, child = _parent_of(self.model, key)
                setattr(parent, child, module.get_base_layer())
            elif isinstance(module, ModulesToSaveWrapper):
                parent, child = _parent_of(self.model, key)
                active = module.active_adapter
                setattr(parent, child, module.modules_to_save[active] if active is not None else module.original_module)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the active adapters into the base weights and return the plain base model."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the plain base model."""
        return self._unload(merge=False)

    # -- mixed batches ------------------------------------------------------------------------
    @contextmanager
    def mixed_batch(
        self,
        adapter_names: Sequence[str] | None,
        device: torch.device | None = None,
        encoder_adapter_names: tuple[nn.Module, Sequence[str]] | None = None,
    ):
        """For one forward: route each batch row through its own adapter (see MixedBatch).

        `encoder_adapter_names` is (encoder, names): layers inside that encoder get these
        names instead, for generation that expands the batch (beams) after the encoder ran."""
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(
                f"adapter_names must be a list with one adapter name per batch row, got {type(adapter_names).__name__}"
            )
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names contains unknown adapters {unknown}; known: {list(self.peft_config)} and {BASE_ADAPTER!r}"  # noqa: E501
            )
        layers = list(self.adapter_layers()) + list(self._wrappers())
        for layer in layers:
            if isinstance(layer, AdapterLayer):
                layer._check_mixed_batch_merged()
        mb = MixedBatch(adapter_names, device)
        for layer in layers:
            layer._mixed_batch = mb
        if encoder_adapter_names is not None:
            encoder, names = encoder_adapter_names
            encoder_mb = MixedBatch(names, device)
            for m in encoder.modules():
                if isinstance(m, (AdapterLayer, ModulesToSaveWrapper)):
                    m._mixed_batch = encoder_mb
        try:
            yield
        finally:
            for layer in layers:
                layer._mixed_batch = None


def _parent_of(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, child = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _inside_adapter_layer(key: str, model: nn.Module) -> bool:
    """True for modules that live inside an adapter layer (its base layer, lora_A, ...)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), (AdapterLayer, ModulesToSaveWrapper)):
            return True
    return False


def _check_layers_to_transform(config: PeftConfig, keys: Sequence[str]) -> None:
    """Refuse layers_to_transform entries that are not layer indexes of the model."""
    indexes = _layers_to_transform(config)
    if indexes is None:
        return
    bad = [i for i in indexes if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"layers_to_transform must be layer indexes >= 0 (an int or a list of ints), got {bad}")
    found = {_layer_index(config, k) for k in keys if _name_matches(k, config.target_modules)} - {None}
    missing = sorted(set(indexes) - found)
    if found and missing:
        pattern = getattr(config, "layers_pattern", None)
        raise ValueError(
            f"layers_to_transform names layers {missing} that the model does not have: the layers holding"
            f" target_modules are {sorted(found)}" + (f" (layers_pattern={pattern!r})" if pattern else "")
        )


def _why_no_target(config: PeftConfig, keys: Sequence[str], model: nn.Module) -> str:
    """The message for a config that adapts no module: which option removed the modules that
    target_modules names."""
    targets = config.target_modules
    shown = sorted(targets) if isinstance(targets, (set, list)) else targets
    named = [k for k in keys if (re.fullmatch(targets, k) if isinstance(targets, str) else _name_matches(k, targets))]
    if not named:
        return (
            f"target_modules {shown!r} matched no module of the base model; "
            f"modules it has include: {_some_module_names(model)}"
        )
    exclude = getattr(config, "exclude_modules", None)
    mts = getattr(config, "modules_to_save", None)
    removed = []
    left = named
    if exclude:
        kept = [k for k in left if not _name_matches(k, exclude)]
        if len(kept) < len(left):
            shown_exclude = sorted(exclude) if isinstance(exclude, (set, list)) else exclude
            removed.append(f"exclude_modules={shown_exclude!r} removes {len(left) - len(kept)}")
        left = kept
    if mts:
        kept = [k for k in left if not any(re.match(rf"(^|.*\.){m}($|\..*)", k) for m in mts)]
        if len(kept) < len(left):
            removed.append(f"modules_to_save={mts!r} removes {len(left) - len(kept)}")
        left = kept
    if left:
        pattern = getattr(config, "layers_pattern", None)
        found = sorted({_layer_index(config, k) for k in left} - {None})
        removed.append(
            f"layers_to_transform={config.layers_to_transform!r} with layers_pattern={pattern!r} removes {len(left)}"
            f" (layer indexes found: {found or 'none, layers_pattern matches no layer'})"
        )
    return (
        f"no module is adapted: target_modules {shown!r} matches {len(named)} modules (e.g. {named[:3]}), but "
        + "; ".join(removed)
    )


def _warn_unmatched_patterns(config: PeftConfig, matched: Sequence[str]) -> None:
    """Warn, as HF peft does, for rank_pattern/alpha_pattern keys that match no adapted module."""
    for attr in ("rank_pattern", "alpha_pattern"):
        unmatched = sorted(
            p for p in getattr(config, attr, None) or {} if not any(pattern_matches(p, k) for k in matched)
        )
        if unmatched:
            warnings.warn(
                f"{attr} keys {unmatched} match no adapted module and are ignored; adapted modules include"
                f" {list(matched[:3])}",
                RuntimeWarning,
                stacklevel=4,
            )


def _some_module_names(model: nn.Module, limit: int = 12) -> list[str]:
    leaves = sorted({k.rsplit(".", 1)[-1] for k, m in model.named_modules() if k and not list(m.children())})
    return leaves[:limit]


def activate_modules_to_save(model: nn.Module, adapter_names: Sequence[str]) -> None:
    """Make each modules_to_save wrapper in `model` use the first of `adapter_names` it has
    (trainable; its other copies frozen), or its original module where it has none."""
    for w in model.modules():
        if isinstance(w, ModulesToSaveWrapper):
            w.set_adapter([n for n in adapter_names if n in w.modules_to_save][:1])


def set_modules_to_save(model: nn.Module, names: Sequence[str], adapter_name: str, trainable: bool) -> list[str]:
    """Wrap (or extend) every module whose name ends with one of `names` (HF peft's rule).
    Returns the entries of `names` that matched no module."""
    unmatched = list(names)
    for key, module in list(model.named_modules()):
        if not key or _inside_adapter_layer(key, model):
            continue
        if not any(key.endswith(n) for n in names):
            continue
        unmatched = [n for n in unmatched if not key.endswith(n)]
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
            module.set_adapter(module.active_adapter or adapter_name)
        elif isinstance(module, AdapterLayer):
            continue
        else:
            parent, child = _parent_of(model, key)
            wrapper = ModulesToSaveWrapper(module, adapter_name)
            setattr(parent, child, wrapper)
            module = wrapper
        if not trainable:
            module.modules_to_save[adapter_name].requires_grad_(False)
    return unmatched
