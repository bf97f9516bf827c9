"""Route a Hugging Face peft model's LoRA, DoRA and IA³ layers through peft_fast's ops.

`patch_peft(model)` replaces, on each eligible layer instance, `forward` with one that calls
peft_fast's ops (and so whatever backend dispatch picks). It touches nothing else:
parameters, module names, state-dict keys, peft's config and its save/load all stay as they
were, so `save_pretrained` and the HF Trainer keep working.

Each call checks whether the ops compute exactly what HF peft's own forward would; when they
do not, the call goes to peft's forward unchanged (never wrong, sometimes slow).

- `lora.Linear`: the active adapters the layer holds run in HF's order (several of them too,
  plain LoRA and DoRA in any mix): the first through `ops.lora_linear` / `ops.dora_linear`,
  each later one through `ops.lora_add` / `ops.dora_add` on the output so far (a later DoRA
  adapter rescales what its predecessors added, as HF's `base_result = result - bias` does).
  GPT-2's `Conv1D` stores its weight as (in, out): the ops get a transposed view.
- `lora.bnb.Linear4bit` (QLoRA): the first adapter through `ops.lora_linear_4bit` /
  `ops.dora_linear_4bit` (the packed 4-bit weight read directly), later ones through
  `ops.lora_add` / `ops.dora_add`; `lora.bnb.Linear8bitLt`: bitsandbytes' int8 product, then
  every adapter through `ops.lora_add` / `ops.dora_add`. DoRA's norm (and, with dropout,
  `dropout(x)·Wᵀ`) uses the dequantized weight, as HF peft's bnb DoRA does.
- `lora.Embedding` with one active DoRA adapter (HF's `DoraEmbeddingVariant`):
  `ops.dora_embedding`, on a plain `nn.Embedding` base that applies no scale of its own
  (`_get_embed_scale()` is None); plain LoRA Embedding layers keep peft's forward.
- `ia3.Linear` with one active adapter: `ops.ia3_linear`.

DoRA is HF peft's own (`DoraLinearVariant` / `DoraEmbeddingVariant` with their DoRA layer
classes); its norm is recomputed at each call, as HF peft does without its opt-in cache.

peft's forward runs for: LoRA variants other than DoRA, LoRA bias (`lora_bias=True`), adapter
A/B that are not bias-free `nn.Linear`, dropout modules other than `nn.Identity` /
`nn.Dropout` (or hooked ones), a DoRA adapter whose `nn.Dropout` does not drop exactly when
its layer trains (HF's DoRA decides on the layer's mode, the ops on the mask), HF's DoRA
caching switched on (`peft.helpers.DoraCaching`) in eval mode, merged or disabled adapters, no active adapter on
the layer, a mixed batch (`adapter_names=`), extra forward arguments, input-dtype casting
switched off with mismatched dtypes, active adapters of different dtypes, on `lora.Linear` a
chain whose input, adapters and magnitudes do not all share one dtype (HF sums a chain's
updates in the promoted dtype and rounds once; the ops round after each adapter), bnb layers
under autocast (where HF peft skips its input cast), several active adapters on Embedding
or IA³ layers, and base layers that are not a plain `nn.Linear`, transformers `Conv1D`,
`nn.Embedding` or bitsandbytes layer (hooked or offloaded layers included; an 8-bit base with
plain LoRA only is called as HF calls it, hooks and all).
"""

from __future__ import annotations

import types
from typing import Any, NamedTuple

import torch
from torch import nn

from .ops import (
    dequantize_4bit,
    dora_add,
    dora_embedding,
    dora_linear,
    dora_linear_4bit,
    ia3_linear,
    lora_add,
    lora_linear,
    lora_linear_4bit,
)

__all__ = ["patch_peft", "patched_layers", "unpatch_peft"]

_MARK = "_peft_fast_patched"


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or moved: no Conv1D support, never wrong
        return None
    return Conv1D


def _plain_base_weight(base: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a plain nn.Linear / Conv1D base layer without hooks, else None."""
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook") or "forward" in vars(base):
        return None
    if type(base) is nn.Linear:
        return base.weight
    conv1d = _conv1d_type()
    if conv1d is not None and type(base) is conv1d:
        return base.weight.t()
    return None


def _single_active(layer: nn.Module, store: nn.ModuleDict | nn.ParameterDict) -> str | None:
    """The one active adapter that has weights in `store`, or None (none or several)."""
    active = [name for name in layer.active_adapters if name in store.keys()]
    return active[0] if len(active) == 1 else None


def _unhooked(base: nn.Module, cls: type) -> bool:
    no_hooks = not (base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"))
    return type(base) is cls and no_hooks and "forward" not in vars(base)


def _hf_dora_cached(dora: nn.Module) -> bool:
    """Whether HF peft's opt-in DoRA caching (`peft.helpers.DoraCaching`) is on for this DoRA
    layer's next call: then HF may reuse a norm computed before a weight changed."""
    from peft.tuners.lora import dora as hf_dora

    return bool(getattr(hf_dora, "ENABLE_DORA_CACHING", False)) and not dora.training


def _dora_embedding_args(layer: nn.Module, x: Any, args: tuple, kwargs: dict) -> tuple | None:
    """Arguments of `dora_embedding` equivalent to this HF peft lora.Embedding forward call (one
    active DoRA adapter, HF's own DoRA classes, a plain nn.Embedding base, no embed scale), or None."""
    try:
        from peft.tuners.lora.dora import DoraEmbeddingLayer
        from peft.tuners.lora.variants import DoraEmbeddingVariant
    except ImportError:  # another peft version: never wrong, peft's forward runs
        return None
    if args or kwargs or not isinstance(x, torch.Tensor) or layer.disable_adapters or layer.merged:
        return None
    name = _single_active(layer, layer.lora_embedding_A)
    if name is None:
        return None
    variant = layer.lora_variant.get(name)
    dora = layer.lora_magnitude_vector[name] if name in layer.lora_magnitude_vector else None
    if not (variant is DoraEmbeddingVariant or type(variant) is DoraEmbeddingVariant):
        return None
    if type(dora) is not DoraEmbeddingLayer or "forward" in vars(dora) or _hf_dora_cached(dora):
        return None
    base = layer.base_layer
    no_hooks = not (base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"))
    if type(base) is not nn.Embedding or not no_hooks or "forward" in vars(base):
        return None
    get_scale = getattr(layer, "_get_embed_scale", None)
    if get_scale is None or get_scale() is not None:
        return None
    scaling = layer.scaling[name]
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return None
    A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    lookup = (base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
    return (x, base.weight, A, B, dora.weight, float(scaling), *lookup)


def _lora_embedding_forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    fast = _dora_embedding_args(self, x, args, kwargs)
    if fast is None:
        return type(self).forward(self, x, *args, **kwargs)
    return dora_embedding(*fast)


def _dora_magnitude(layer: nn.Module, name: str) -> torch.Tensor | None:
    """The magnitude of `name` when it is exactly HF peft's DoRA on a Linear / Conv1D (its norm
    computed afresh, no opt-in cache), else None."""
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # another peft version: never wrong, peft's forward runs
        return None
    variant = layer.lora_variant.get(name)
    dora = layer.lora_magnitude_vector[name] if name in layer.lora_magnitude_vector else None
    is_dora = variant is DoraLinearVariant or isinstance(variant, DoraLinearVariant)
    if not is_dora or type(dora) is not DoraLinearLayer or "forward" in vars(dora) or _hf_dora_cached(dora):
        return None
    if bool(dora.fan_in_fan_out) != bool(getattr(layer, "fan_in_fan_out", False)):
        return None
    return dora.weight


class _Adapter(NamedTuple):
    """One active LoRA / DoRA adapter as the ops take it; `magnitude` is None for plain LoRA."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    p: float
    magnitude: torch.Tensor | None


def _adapter(layer: nn.Module, name: str, x: torch.Tensor) -> _Adapter | None:
    """Adapter `name` of `layer` when the ops compute exactly what HF peft's forward does with it
    (plain LoRA or HF's own DoRA variant, bias-free nn.Linear A and B, Identity or nn.Dropout),
    else None."""
    magnitude = None
    if name in layer.lora_variant or layer.use_dora.get(name, False):
        magnitude = _dora_magnitude(layer, name)
        if magnitude is None:
            return None
    A, B, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return None
    if B.weight.dtype != A.weight.dtype:
        return None
    if x.dtype != A.weight.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    if type(drop) is nn.Identity:
        p = 0.0
    elif type(drop) is nn.Dropout and not drop._forward_hooks and not drop._forward_pre_hooks:
        p = float(drop.p) if drop.training else 0.0
    else:
        return None
    # HF's DoRA recomputes x'Wᵀ (and drops x) exactly when the layer trains with a Dropout
    # module; the ops do when they drop: a Dropout whose mode (or p = 0) disagrees differs.
    if magnitude is not None and (type(drop) is nn.Dropout and layer.training) != (p > 0.0):
        return None
    scaling = layer.scaling[name]
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return None
    return _Adapter(A.weight, B.weight, float(scaling), p, magnitude)


def _active_adapters(layer: nn.Module, x: Any, args: tuple, kwargs: dict) -> list[_Adapter] | None:
    """The adapters this HF peft LoRA forward call applies, in HF's order (its active adapters
    that the layer holds), when the ops can reproduce the call; else None (also for none)."""
    if args or kwargs or not isinstance(x, torch.Tensor) or layer.disable_adapters or layer.merged:
        return None
    names = [name for name in layer.active_adapters if name in layer.lora_A.keys()]
    adapters = [_adapter(layer, name, x) for name in names]
    if not adapters or any(a is None for a in adapters):
        return None
    if len({a.A.dtype for a in adapters}) > 1:  # HF casts x to each adapter's dtype in turn
        return None
    return adapters


def _add_adapters(
    result: torch.Tensor,
    x: torch.Tensor,
    adapters: list[_Adapter],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`result` with `adapters` applied one after the other, as HF peft chains them: plain LoRA
    through `ops.lora_add`, DoRA through `ops.dora_add` over the (out, in) base `weight`."""
    for a in adapters:
        if a.magnitude is None:
            result = lora_add(result, x, a.A, a.B, a.scaling, a.p, a.p > 0.0)
        else:
            assert weight is not None
            result = dora_add(result, x, weight, bias, a.A, a.B, a.magnitude, a.scaling, a.p, a.p > 0.0)
    return result


def _uniform_dtype(x: torch.Tensor, adapters: list[_Adapter]) -> bool:
    """x, every A, B and magnitude in one dtype: HF's plain Linear sums a chain's updates in the
    promoted dtype and rounds once at the end, where the ops round after each adapter."""
    tensors = [t for a in adapters for t in (a.A, a.B, a.magnitude) if t is not None]
    return all(t.dtype == x.dtype for t in tensors)


def _lora_forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    adapters = _active_adapters(self, x, args, kwargs)
    weight = _plain_base_weight(self.base_layer)
    if adapters is None or weight is None or x.dtype != weight.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    if len(adapters) > 1 and not _uniform_dtype(x, adapters):
        return type(self).forward(self, x, *args, **kwargs)
    bias = self.base_layer.bias
    (A, B, scaling, p, magnitude), rest = adapters[0], adapters[1:]
    if magnitude is None:
        result = lora_linear(x, weight, bias, A, B, scaling, p, p > 0.0)
    else:
        result = dora_linear(x, weight, bias, A, B, magnitude, scaling, p, p > 0.0)
    return _add_adapters(result, x, rest, weight, bias)


def _lora_4bit_forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    from .quant import bnb as qbnb

    adapters = _active_adapters(self, x, args, kwargs)
    base = self.base_layer
    lib = qbnb.bnb()
    if adapters is None or torch.is_autocast_enabled() or lib is None or not _unhooked(base, lib.nn.Linear4bit):
        return type(self).forward(self, x, *args, **kwargs)
    state = qbnb.state_of(base, "base_layer")
    compute_dtype = qbnb.compute_dtype_for(base, x)
    (A, B, scaling, p, magnitude), rest = adapters[0], adapters[1:]
    if magnitude is None:
        result = lora_linear_4bit(x, state, base.bias, A, B, scaling, p, p > 0.0, compute_dtype)
    else:
        result = dora_linear_4bit(x, state, base.bias, A, B, magnitude, scaling, p, p > 0.0, compute_dtype)
    # HF's DoRA takes the norm (and, with dropout, x'Wᵀ) of the dequantized weight
    weight = dequantize_4bit(state) if any(a.magnitude is not None for a in rest) else None
    return _add_adapters(result, x, rest, weight, base.bias)


def _lora_8bit_forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    from .quant import bnb as qbnb

    adapters = _active_adapters(self, x, args, kwargs)
    base = self.base_layer
    if adapters is None or torch.is_autocast_enabled():
        return type(self).forward(self, x, *args, **kwargs)
    dora = any(a.magnitude is not None for a in adapters)
    lib = qbnb.bnb()
    if dora and (lib is None or not _unhooked(base, lib.nn.Linear8bitLt)):
        return type(self).forward(self, x, *args, **kwargs)
    result = base(x)  # bitsandbytes' int8 product, as HF peft's layer computes it
    weight = qbnb.dequantize_8bit(base) if dora else None  # HF's DoRA: the dequantized weight
    return _add_adapters(result, x, adapters, weight, base.bias)


def _ia3_fast_args(layer: nn.Module, x: Any, args: tuple, kwargs: dict) -> tuple | None:
    """Arguments of `ia3_linear` equivalent to this peft forward call, or None."""
    if args or kwargs or not isinstance(x, torch.Tensor) or layer.disable_adapters or layer.merged:
        return None
    name = _single_active(layer, layer.ia3_l)
    weight = _plain_base_weight(layer.base_layer)
    if name is None or weight is None or x.dtype != weight.dtype:
        return None
    return x, weight, layer.base_layer.bias, layer.ia3_l[name], bool(layer.is_feedforward)


def _ia3_forward(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    fast = _ia3_fast_args(self, x, args, kwargs)
    if fast is None:
        return type(self).forward(self, x, *args, **kwargs)
    return ia3_linear(*fast)


def _peft_layer_types() -> dict[type, Any]:
    try:
        from peft.tuners.ia3 import layer as ia3_layer
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:
        raise ImportError(f"patch_peft needs Hugging Face peft installed ({e})") from e
    forwards = {
        lora_layer.Linear: _lora_forward,
        lora_layer.Embedding: _lora_embedding_forward,
        ia3_layer.Linear: _ia3_forward,
    }
    try:  # HF peft defines its bnb layers only where bitsandbytes imports
        from peft.tuners.lora import bnb as lora_bnb
    except Exception:
        return forwards
    if hasattr(lora_bnb, "Linear4bit"):
        forwards[lora_bnb.Linear4bit] = _lora_4bit_forward
    if hasattr(lora_bnb, "Linear8bitLt"):
        forwards[lora_bnb.Linear8bitLt] = _lora_8bit_forward
    return forwards


def patch_peft(model: nn.Module) -> nn.Module:
    """Make every HF peft `lora.Linear`, `lora.Embedding` and `ia3.Linear` layer (and LoRA's
    bitsandbytes `Linear4bit` / `Linear8bitLt` layers), with plain LoRA, DoRA or several active
    adapters, of `model` run through peft_fast's ops (in place; returns `model`). Outputs and
    gradients are HF peft's: calls the ops cannot reproduce exactly go to peft's own forward.
    Patching twice is harmless; `unpatch_peft` undoes it.

    Raises TypeError when `model` is not an nn.Module, ValueError when it has no such layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    forwards = _peft_layer_types()
    count = 0
    for module in model.modules():
        fn = forwards.get(type(module))
        if fn is None:
            continue
        module.forward = types.MethodType(fn, module)
        setattr(module, _MARK, True)
        count += 1
    if count == 0:
        raise ValueError("model has no HF peft lora.Linear, lora.Embedding or ia3.Linear layer to patch")
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Give every layer `patch_peft` touched its HF peft forward back (in place; returns `model`)."""
    for module in model.modules():
        if module.__dict__.pop(_MARK, False):
            module.__dict__.pop("forward", None)
    return model


def patched_layers(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that `patch_peft` routed through peft_fast."""
    return [name for name, m in model.named_modules() if m.__dict__.get(_MARK, False)]
