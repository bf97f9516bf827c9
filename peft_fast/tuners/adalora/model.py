"""AdaLoraModel: puts AdaLoRA's SVD layers into a model, allocates ranks during training
(`update_and_allocate`), adds HF peft's orthogonality penalty to the loss, and stores adapters
as HF peft does (pruned triplets removed from the file, the rank pattern in the config).

Training that cannot go wrong quietly: HF peft trains AdaLoRA as plain LoRA when nobody calls
`update_and_allocate` (HF peft issues #1801, #3373). Here the model counts its training
forward passes (training mode, gradients on, a loss computed); once more than `tinit + 1` have
run without a call, it warns once, naming the fix (the call, or `AdaLoraCallback` for the
Trainer)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ... import ops
from ...config import PeftConfig
from ..base import LINEAR_TYPES, AdapterLayer, fan_in_fan_out_for
from ..lora.model import LoraModel
from ..targets import ADALORA_TARGETS
from .allocator import RankAllocator
from .config import AdaLoraConfig
from .layer import SVDLinear

MISSING_CALL_HINT = (
    "call model.base_model.update_and_allocate(global_step) after loss.backward() (and optimizer.step()) and"
    " before optimizer.zero_grad() in every step, or pass peft_fast.integrations.AdaLoraCallback() to the"
    " Trainer's callbacks; without it AdaLoRA trains as plain LoRA and never prunes ranks"
)


class AdaLoraModel(LoraModel):
    """HF peft's AdaLoraModel: one trainable adapter (others in inference mode), SVD layers on
    nn.Linear and Conv1D, the rank allocator of the trainable adapter in `rankallocator`."""

    target_module_mapping = ADALORA_TARGETS

    def __init__(
        self, model: nn.Module, peft_config: dict[str, PeftConfig], adapter_name: str, low_cpu_mem_usage: bool = False
    ) -> None:
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        self.trainable_adapter_name: str | None = None
        self._training_forwards = 0
        self._allocate_called = False
        self._warned_missing_call = False
        config = self.peft_config[adapter_name]
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.model, config, adapter_name)
        # On the wrapped model, so that every path through it (PeftModel.forward, base_model(...)) adds it once.
        self._penalty_hook = self.model.register_forward_hook(self._add_orthogonal_penalty)

    # -- layers -------------------------------------------------------------------------------
    def inject_adapter(
        self, model: nn.Module, adapter_name: str, config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        # rank_pattern is the allocator's output ({lora_E name: [kept, ...]}, used when loading),
        # not LoRA's {pattern: rank}: LoRA's "pattern matches no module" warning does not apply.
        pattern, config.rank_pattern = config.rank_pattern, None
        try:
            super().inject_adapter(model, adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        finally:
            config.rank_pattern = pattern

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        super()._check_new_adapter_config(config)
        trainable = sum(not c.inference_mode for c in self.peft_config.values()) + (not config.inference_mode)
        if trainable > 1:
            raise ValueError(
                "AdaLoraModel supports only 1 trainable adapter; set inference_mode=True in the configs of all"
                " adapters but the one you train"
            )

    def _create_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, key: str) -> AdapterLayer:
        assert isinstance(config, AdaLoraConfig)
        if not isinstance(target, LINEAR_TYPES):
            raise TypeError(
                f"target module {key!r} is a {type(target).__name__}; AdaLoRA in peft_fast supports nn.Linear and"
                " transformers' Conv1D (HF peft's SVDConv2d for nn.Conv2d and its quantized layers are not"
                " implemented)"
            )
        layer = SVDLinear(target, fan_in_fan_out=fan_in_fan_out_for(target, config, key))
        self._update_layer(layer, adapter_name, config, key)
        return layer

    def _update_layer(self, layer: AdapterLayer, adapter_name: str, config: PeftConfig, key: str) -> None:
        assert isinstance(config, AdaLoraConfig)
        if not isinstance(layer, SVDLinear):
            raise ValueError(f"module {key!r} already carries an adapter of another method ({type(layer).__name__})")
        layer.update_layer(
            adapter_name, config.init_r, config.lora_alpha, config.lora_dropout, config.init_lora_weights
        )

    def _svd_layers(self) -> list[tuple[str, SVDLinear]]:
        return [(k, m) for k, m in self.model.named_modules() if isinstance(m, SVDLinear)]

    # -- the orthogonality penalty ---------------------------------------------------------------
    def orthogonal_penalty(self) -> torch.Tensor | float:
        """HF peft's regulariser: the mean over the trainable adapter's A and B of
        `‖A Aᵀ − I‖_F` and `‖Bᵀ B − I‖_F` (0 when there is none), through `ops.orthogonality_norms`
        (one autograd node for all factors)."""
        name = self.trainable_adapter_name
        factors = []
        for _, layer in self._svd_layers():
            if name in layer.lora_A:
                factors += [layer.lora_A[name], layer.lora_B[name].T]  # both (r, features)
        return ops.orthogonality_norms(factors) / len(factors) if factors else 0

    def _add_orthogonal_penalty(self, module: nn.Module, args: Any, outputs: Any) -> Any:
        loss = getattr(outputs, "loss", None)
        if not isinstance(loss, torch.Tensor) or self.trainable_adapter_name is None:
            return outputs
        if module.training and torch.is_grad_enabled():
            self._count_training_forward()
        weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
        outputs.loss = loss + weight * self.orthogonal_penalty()
        return outputs

    def _count_training_forward(self) -> None:
        self._training_forwards += 1
        tinit = self.peft_config[self.trainable_adapter_name].tinit
        if not self._allocate_called and not self._warned_missing_call and self._training_forwards > tinit + 1:
            self._warned_missing_call = True
            warnings.warn(
                f"AdaLoRA: {self._training_forwards} training steps have run (tinit={tinit}) and"
                f" update_and_allocate was never called: {MISSING_CALL_HINT}",
                RuntimeWarning,
                stacklevel=4,
            )

    # -- rank allocation ------------------------------------------------------------------------
    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and the masks of the trainable adapter at `global_step`
        (HF peft's method: call it every step after loss.backward(), before zero_grad())."""
        if self.trainable_adapter_name is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter; all are in inference mode")
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an integer >= 0, got {global_step!r}")
        self._allocate_called = True
        config = self.peft_config[self.trainable_adapter_name]
        final_start = config.total_step - config.tfinal
        if global_step < final_start:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step)
            if rank_pattern:
                config.rank_pattern = rank_pattern
        elif global_step == final_start:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step, force_mask=True)
            config.rank_pattern = rank_pattern
            self.rankallocator.reset_ipt()
        else:
            self.rankallocator.mask_using_rank_pattern(self.model, config.rank_pattern)

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: Any = None) -> nn.Module:
        model = super()._unload(merge, safe_merge=safe_merge, adapter_names=adapter_names)
        self._penalty_hook.remove()  # the plain model no longer adds AdaLoRA's penalty
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; deleting the trainable one leaves no allocator (HF peft keeps a dangling
        name and fails with KeyError at the next loss)."""
        super().delete_adapter(adapter_name)
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name = None
            self.__dict__.pop("rankallocator", None)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported for AdaLoRA (as in HF peft)."""
        raise TypeError("AdaLoraModel does not support add_weighted_adapter; use LoRA")

    # -- files ------------------------------------------------------------------------------------
    def adapter_state_for_save(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF peft's save: the config's rank pattern loses the adapter name from its keys, and
        each lora_A/E/B keeps only the triplets the pattern keeps. `state` has file keys."""
        config = self.peft_config[adapter_name]
        if config.rank_pattern is None:
            return state
        config.rank_pattern = {k.replace(f".{adapter_name}", ""): v for k, v in config.rank_pattern.items()}
        state = dict(state)
        for name, kept in config.rank_pattern.items():
            prefix = "base_model.model." + name.rsplit(".", 1)[0]
            mask = torch.tensor(kept, dtype=torch.bool)
            rank = int(mask.sum())
            for part, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
                key = f"{prefix}.{part}"
                if key in state and state[key].shape[dim] != rank:
                    state[key] = state[key].index_select(dim, mask.nonzero().flatten().to(state[key].device))
        return state

    def prepare_adapter_load(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF peft's load: layers shrink to the rank pattern of the adapter's config (ranknum,
        and so the scaling, stays that of the initial rank) before the weights are copied."""
        config = self.peft_config[adapter_name]
        if not config.rank_pattern:
            return state
        for name, kept in config.rank_pattern.items():
            key = name.replace(f".{adapter_name}", "").rsplit(".", 1)[0]
            try:
                layer = self.model.get_submodule(key)
            except AttributeError:
                raise ValueError(f"rank_pattern names {name!r}, but the model has no module {key!r}") from None
            if not isinstance(layer, SVDLinear) or adapter_name not in layer.lora_E:
                raise ValueError(f"rank_pattern names {name!r}, but {key!r} has no AdaLoRA adapter {adapter_name!r}")
            rank = sum(bool(k) for k in kept)
            if layer.r[adapter_name] == rank or layer.r[adapter_name] != len(kept):
                continue  # already at the pattern's rank (the weights' shapes are checked by the load)
            ranknum = layer._ranknum_value[adapter_name]
            trainable = layer.lora_A[adapter_name].requires_grad
            layer.update_layer(adapter_name, rank, config.lora_alpha, config.lora_dropout, config.init_lora_weights)
            layer.set_ranknum(adapter_name, ranknum)
            for part in (layer.lora_A, layer.lora_E, layer.lora_B):
                part[adapter_name].requires_grad_(trainable)
        return state
