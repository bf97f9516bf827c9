"""How clients that special-case HF peft's classes recognise peft_fast's models.

transformers' Trainer, TRL's trainers and accelerate take their PEFT code paths (adapter-only
checkpoints, resuming through `load_adapter`, the LM head patched on `get_base_model()`, the
DPO reference computed with the adapter switched off) only when `isinstance(model,
peft.PeftModel)` holds, and TRL refuses an adapter on the LM head by testing `isinstance(layer,
BaseTunerLayer)`. Where HF peft is installed, peft_fast's models therefore pass these checks:

- `PeftModel` subclasses `hf_peft_model_base()`: HF peft's `PeftModel` with every member it
  (and its `PushToHubMixin`) defines hidden. A hidden name looks up as if HF peft's class were
  not in the MRO: peft_fast's own member where it has one, else `PeftModel.__getattr__`
  (delegation to the base model). None of HF peft's code runs on a peft_fast model.
- `register_layer_types` registers peft_fast's adapter layers as virtual subclasses of HF
  peft's `BaseTunerLayer` (an ABC, which supports exactly this).

Without HF peft installed the clients have no PEFT path at all, and `PeftModel` is a plain
`nn.Module` subclass.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Dunder members of HF peft's classes that stay: class bookkeeping, not behaviour.
_KEPT = frozenset({"__dict__", "__doc__", "__module__", "__qualname__", "__weakref__"})


class _Hidden:
    """A class attribute that looks up as missing: instance lookup goes on to `__getattr__`,
    `hasattr(cls, name)` is False."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        raise AttributeError(self.name)


def _hf_peft_model() -> type[nn.Module] | None:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def hidden_hf_members(hf_cls: type) -> set[str]:
    """The members of HF peft's `PeftModel` (and its bases other than `nn.Module`) that the
    base returned by `hf_peft_model_base` hides."""
    own = [c for c in hf_cls.__mro__ if c not in nn.Module.__mro__]
    return {name for c in own for name in vars(c) if name not in _KEPT}


def hf_peft_model_base() -> type[nn.Module]:
    """The base class of peft_fast's `PeftModel`: HF peft's `PeftModel` with its members
    hidden (its `__init__` and `__getattr__` are `nn.Module`'s), or `nn.Module` without HF peft."""
    hf_cls = _hf_peft_model()
    if hf_cls is None:
        return nn.Module
    namespace: dict[str, Any] = {name: _Hidden(name) for name in hidden_hf_members(hf_cls)}
    namespace.update(
        __init__=nn.Module.__init__,
        __getattr__=nn.Module.__getattr__,
        __module__=__name__,
        __doc__="HF peft's PeftModel, for isinstance checks only: every member it defines is hidden.",
    )
    return type("HFPeftModelIdentity", (hf_cls,), namespace)


def register_layer_types(*layer_types: type) -> None:
    """Make `isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer)` hold for these types
    (no-op without HF peft)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    for layer_type in layer_types:
        BaseTunerLayer.register(layer_type)
