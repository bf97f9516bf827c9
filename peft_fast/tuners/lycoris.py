"""What LoHa and LoKr share (HF peft's `lycoris_utils`): config fields, the layer's forward with
HF peft's module and rank dropout, merging, and the tuner that wraps Linear, Conv1d and Conv2d.

HF peft draws its dropout masks from torch's global generator in a fixed order (per active
adapter: one `torch.rand(1)` for module dropout in training, then `torch.rand(out)` for rank
dropout); this layer draws the same numbers in the same order, so a seeded training step gives
HF peft's result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from .base import AdapterLayer, BaseTuner, is_conv1d
from .lora.model import _pattern_value
from .targets import LORA_TARGETS, normalize_targets

# The base layers HF peft 0.21 gives LoHa/LoKr adapters (transformers' Conv1D is not one).
SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHaConfig and LoKrConfig share (HF peft's names and defaults)."""

    r: int = 8
    alpha: int = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("r", self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise TypeError(f"alpha must be a number, got {self.alpha!r}")
        if not (isinstance(self.rank_dropout, (int, float)) and 0.0 <= self.rank_dropout < 1.0):
            raise ValueError(f"rank_dropout must be in [0, 1), got {self.rank_dropout!r}")
        if not (isinstance(self.module_dropout, (int, float)) and 0.0 <= self.module_dropout <= 1.0):
            raise ValueError(f"module_dropout must be in [0, 1], got {self.module_dropout!r}")
        normalize_targets(self)
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict of {{module name pattern: value}}, got {getattr(self, name)!r}")
        for key, value in self.rank_pattern.items():
            _check_positive_int(f"rank_pattern[{key!r}]", value)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def conv_flat_shape(base: nn.Module) -> tuple[int, int]:
    """(out, in/groups · prod(kernel)): the 2-D shape of a convolution's weight as a matrix."""
    w = base.weight
    return w.shape[0], w[0].numel()


class LycorisLayer(AdapterLayer):
    """A Linear, Conv1d or Conv2d base layer with LoHa or LoKr adapters.

    Subclasses create the parameters (`update_layer`), give ΔW (`delta_weight`), the adapter's
    output (`_delta_activations`) and the rank-dropout row scale (`_rank_dropout_rows`)."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
            raise TypeError(unsupported_layer_message(base_layer, type(self).__name__))
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self.is_conv = isinstance(base_layer, (nn.Conv1d, nn.Conv2d))
        if self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _set_numbers(self, adapter_name: str, r: int, alpha: float, config: LycorisConfig) -> None:
        _check_positive_int("r", r)
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = getattr(config, "rank_dropout_scale", False)

    def _finish_new_adapter(self, adapter_name: str, params: dict[str, nn.Parameter]) -> None:
        """Store freshly initialised (fp32, CPU) parameters, moved to the base weight's device
        and floating dtype as HF peft does, and keep the active adapters as they were."""
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else None
        for container, p in params.items():
            getattr(self, container)[adapter_name] = nn.Parameter(p.to(device=w.device, dtype=dtype))
        self.set_adapter(self.active_adapters or [adapter_name])

    # -- what subclasses give -----------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover - abstract
        """ΔW in the base weight's shape, in the adapter's dtype (HF peft's get_delta_weight)."""
        raise NotImplementedError

    def _delta_activations(
        self, adapter_name: str, x: torch.Tensor, row_scale: torch.Tensor | None
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rank_dropout_rows(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype:
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                return container[adapter_name].dtype
        raise KeyError(adapter_name)

    # -- forward ------------------------------------------------------------------------------
    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        names = [a for a in self.active_adapters if a in self.r]
        if not names:
            return None
        result = self.base_layer(x)
        for name in names:
            # HF peft draws this number in training even when module_dropout is 0.
            if self.training and not bool(torch.rand(1) > self.module_dropout[name]):
                continue
            row_scale = None
            if self.training and self.rank_dropout[name]:
                row_scale = self._rank_dropout_rows(name, self._adapter_dtype(name))
            result = result + self._delta_activations(name, x, row_scale)
        return result.to(x.dtype)

    def _conv_args(self) -> dict[str, Any]:
        base = self.base_layer
        return {
            "weight_shape": tuple(base.weight.shape),
            "stride": base.stride,
            "padding": base.padding,
            "dilation": base.dilation,
            "groups": base.groups,
        }

    # -- merging ------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Add ΔW of the adapters (the active ones by default) into the base weight, in place."""
        weight = self.base_layer.weight
        for name in self._adapters_to_merge(adapter_names):
            if name not in self.r:
                continue
            if safe_merge:
                merged = weight.data.clone()
                merged += self.delta_weight(name)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
                weight.data = merged
            else:
                weight.data += self.delta_weight(name)
            self.merged_adapters.append(name)

    def _unmerge(self) -> None:
        """Subtract the merged adapters' ΔW again, last merged first."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.r:
                weight.data -= self.delta_weight(name)

    # -- scaling (HF peft's API) -----------------------------------------------------------------
    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the adapter's scaling to `scale · alpha / r`."""
        if adapter in self.r:
            self.scaling[adapter] = scale * self.alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        """Multiply the active adapters' scaling by `scale`."""
        for name in self.active_adapters:
            if name in self.r:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scaling by `scale`, or reset it to alpha / r when None."""
        for name in self.active_adapters:
            if name in self.r:
                self.scaling[name] = self.alpha[name] / self.r[name] if scale is None else self.scaling[name] / scale


def unsupported_layer_message(target: nn.Module, method: str, key: str | None = None) -> str:
    where = f"target module {key!r}" if key else "the base layer"
    hint = (
        " (transformers' Conv1D, as in GPT-2, is not supported by HF peft's LoHa/LoKr either; target other modules)"
        if is_conv1d(target)
        else ""
    )
    return f"{where} is a {type(target).__name__}; {method} supports nn.Linear, nn.Conv1d and nn.Conv2d{hint}"


class LycorisTuner(BaseTuner):
    """Injects LoHa or LoKr layers (`layer_cls`) into Linear, Conv1d and Conv2d modules."""

    shorten_targets = True
    target_module_mapping = LORA_TARGETS  # HF peft's default target modules for LoHa/LoKr are LoRA's
    method_name = ""

    def _create_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, key: str) -> AdapterLayer:
        if not isinstance(target, SUPPORTED_BASE_LAYERS):
            raise TypeError(unsupported_layer_message(target, self.method_name, key))
        layer = self.layer_cls(target)
        self._update_layer(layer, adapter_name, config, key)
        return layer

    def _update_layer(self, layer: AdapterLayer, adapter_name: str, config: PeftConfig, key: str) -> None:
        assert isinstance(config, LycorisConfig) and isinstance(layer, LycorisLayer)
        r = _pattern_value(config.rank_pattern, key, config.r)
        alpha = _pattern_value(config.alpha_pattern, key, config.alpha)
        layer.update_layer(adapter_name, r, alpha, config, key=key)
