"""VeraModel: puts VeRA layers into a model around one pair of shared frozen projections.

`vera_A` / `vera_B` are created once per model (at the first adapter, sized for the largest
targeted layer, from `projection_prng_key` with HF peft's Kaiming-uniform draw), live in
`self.vera_A` / `self.vera_B` (BufferDicts, persistent when `save_projection`), and every layer
refers to them. Adapter files store them once, as `base_model.vera_A` / `base_model.vera_B`,
when `save_projection` (HF peft's keys)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ...config import PeftConfig
from ..base import LINEAR_TYPES, AdapterLayer, BaseTuner, fan_in_fan_out_for, is_target, linear_features
from ..targets import VERA_TARGETS
from .config import VeraConfig
from .layer import BufferDict, VeraLinear


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """HF peft's `_kaiming_init`: uniform in ±sqrt(3) · sqrt(2 / fan_in), drawn from `generator`."""
    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


class VeraModel(BaseTuner):
    """HF peft's VeraModel: VeRA layers on nn.Linear and Conv1D, trainable `vera_lambda_*`."""

    prefix = "vera_lambda_"
    shorten_targets = True
    layer_cls = VeraLinear
    target_module_mapping = VERA_TARGETS

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        assert isinstance(config, VeraConfig)
        if "vera_A" not in self._modules:
            self._init_projections(model, config, adapter_name)
        super().inject_adapter(model, adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)

    def _init_projections(self, model: nn.Module, config: VeraConfig, adapter_name: str) -> None:
        """vera_A (r, largest in) and vera_B (largest out, r) for the targets of the first adapter."""
        config = self._prepare_config(config, model)
        shapes = [
            linear_features(m)
            for key, m in model.named_modules()
            if key and isinstance(m, LINEAR_TYPES) and is_target(config, key)
        ]
        if not shapes:
            raise ValueError(
                f"no layer VeRA can adapt (nn.Linear or Conv1D) matches target_modules {config.target_modules!r}"
            )
        in_dim, out_dim = max(s[0] for s in shapes), max(s[1] for s in shapes)
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        self.vera_A = BufferDict(persistent=config.save_projection)
        self.vera_B = BufferDict(persistent=config.save_projection)
        self.vera_A[adapter_name] = kaiming_uniform((config.r, in_dim), generator)
        self.vera_B[adapter_name] = kaiming_uniform((out_dim, config.r), generator)

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        super()._check_new_adapter_config(config)
        assert isinstance(config, VeraConfig)
        for existing in self.peft_config.values():
            if existing is not config and existing.projection_prng_key != config.projection_prng_key:
                raise ValueError(
                    f"VeRA adapters of one model share projections: projection_prng_key must be"
                    f" {existing.projection_prng_key} (the first adapter's), got {config.projection_prng_key}"
                )
            if existing is not config and existing.save_projection != config.save_projection:
                raise ValueError(
                    "VeRA projections must be saved for all adapters or none: save_projection is"
                    f" {existing.save_projection} for the first adapter, got {config.save_projection}"
                )

    def _create_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, key: str) -> AdapterLayer:
        if not isinstance(target, LINEAR_TYPES):
            raise TypeError(
                f"target module {key!r} is a {type(target).__name__}; VeRA supports nn.Linear and transformers'"
                " Conv1D (as HF peft; its quantized layers are not implemented in peft_fast)"
            )
        layer = VeraLinear(target, fan_in_fan_out=fan_in_fan_out_for(target, config, key))
        self._update_layer(layer, adapter_name, config, key)
        return layer

    def _update_layer(self, layer: AdapterLayer, adapter_name: str, config: PeftConfig, key: str) -> None:
        assert isinstance(config, VeraConfig)
        if not isinstance(layer, VeraLinear):
            raise ValueError(f"module {key!r} already carries an adapter of another method ({type(layer).__name__})")
        layer.update_layer(
            adapter_name, self.vera_A, self.vera_B, config.r, config.vera_dropout, config.init_weights, config.d_initial
        )

    def _mark_trainable(self, model: nn.Module, adapter_name: str) -> None:
        super()._mark_trainable(model, adapter_name)
        for config in self.peft_config.values():
            if config.bias == "all":
                for n, p in model.named_parameters():
                    if "bias" in n:
                        p.requires_grad_(True)
            elif config.bias == "vera_only":
                for m in model.modules():
                    if isinstance(m, VeraLinear) and getattr(m.base_layer, "bias", None) is not None:
                        m.base_layer.bias.requires_grad_(True)

    # -- files ------------------------------------------------------------------------------------
    def shared_adapter_keys(self, adapter_name: str) -> dict[str, str]:
        """The projections, stored once per adapter file (`vera_A` -> `vera_A.<adapter>`), when
        the adapter saves them."""
        config = self.peft_config[adapter_name]
        if not config.save_projection or adapter_name not in self.vera_A:
            return {}
        return {"vera_A": f"vera_A.{adapter_name}", "vera_B": f"vera_B.{adapter_name}"}

    def prepare_adapter_load(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF peft's load: with save_projection=False, projections in the file are not used
        (warned) and the ones rebuilt from projection_prng_key stay."""
        if self.peft_config[adapter_name].save_projection:
            return state
        if "base_model.vera_A" in state or "base_model.vera_B" in state:
            warnings.warn(
                "the adapter file holds vera_A/vera_B but save_projection=False: they are not loaded; the"
                " projections rebuilt from projection_prng_key are used",
                stacklevel=4,
            )
            return {k: v for k, v in state.items() if k not in ("base_model.vera_A", "base_model.vera_B")}
        warnings.warn(
            "save_projection=False: vera_A/vera_B are rebuilt from projection_prng_key, which may not give the"
            " same numbers on every system",
            stacklevel=4,
        )
        return state
