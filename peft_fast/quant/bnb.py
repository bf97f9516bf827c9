"""The optional bridge to bitsandbytes' quantized layers (`Linear4bit`, `Linear8bitLt`).

bitsandbytes is never imported by `import peft_fast`; these helpers import it on first use and
say what to install when it is missing. Reading a 4-bit weight needs only its tensors
(`state_of`); writing one back after a merge goes through bitsandbytes' own `Params4bit`, as
HF peft does, so the merged layer stays a bitsandbytes layer.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Literal

import torch
from torch import nn

from .formats import QuantState4bit, dequantize_absmax
from .formats import dequantize_4bit as dequantize_4bit_torch

INSTALL_HINT = "pip install bitsandbytes (>= 0.46 runs 4-bit and 8-bit layers on CPU too)"
_QUANT_PARAMS = {"Params4bit": "4bit", "Int8Params": "8bit"}


def bnb() -> ModuleType | None:
    """bitsandbytes, or None when it is not importable."""
    try:
        return importlib.import_module("bitsandbytes")
    except Exception:  # ImportError, or a broken install (missing native library, ...)
        return None


def quantized_kind(module: nn.Module, key: str) -> Literal["4bit", "8bit"] | None:
    """'4bit' / '8bit' for bitsandbytes' quantized linear layers, None for a plain float layer.

    A linear layer whose weight is not floating point (bitsandbytes' packed uint8 / int8) when
    bitsandbytes is not importable is refused with what to install, rather than being treated
    as nn.Linear (which fails later with a shape error)."""
    weight = getattr(module, "weight", None)
    kind = _QUANT_PARAMS.get(type(weight).__name__)
    lib = bnb()
    if lib is not None:
        if isinstance(module, lib.nn.Linear4bit):
            return "4bit"
        if isinstance(module, lib.nn.Linear8bitLt):
            return "8bit"
    if kind is None and not (isinstance(weight, torch.Tensor) and not weight.is_floating_point()):
        return None
    if lib is None:
        raise ValueError(
            f"target module {key!r} ({type(module).__name__}) holds a quantized {getattr(weight, 'dtype', '?')} weight "
            f"(bitsandbytes 4-bit / 8-bit) but bitsandbytes is not importable: {INSTALL_HINT}"
        )
    raise ValueError(
        f"target module {key!r} is a {type(module).__name__} with a {type(weight).__name__} "
        f"{getattr(weight, 'dtype', '?')} weight; peft_fast supports bitsandbytes' Linear4bit and Linear8bitLt"
    )


def layer_name(layer: nn.Module) -> str:
    """How errors name an adapter layer over a quantized base: its class and module name."""
    return f"{type(layer).__name__} {getattr(layer, '_peft_key', '')}".strip()


def state_of(layer: nn.Module, where: str = "weight") -> QuantState4bit:
    """The QuantState4bit of a bitsandbytes Linear4bit (its tensors, not copies), checked.

    A weight bitsandbytes repacked for its CPU inference kernel (AVX512-BF16, eval mode) is put
    back in the standard layout first, as bitsandbytes does before saving it."""
    weight = layer.weight
    qs = getattr(weight, "quant_state", None) or getattr(layer, "quant_state", None)
    if qs is None:
        raise ValueError(f"{where}: the 4-bit weight has no quant_state (was the layer quantized?)")
    if getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, qs = _convert_weight_packed_for_cpu_inverse(weight.data, qs)
        weight.quant_state = qs
    state2 = getattr(qs, "state2", None)
    state = QuantState4bit(
        packed=weight.data,
        absmax=qs.absmax,
        shape=tuple(qs.shape),
        dtype=qs.dtype,
        blocksize=qs.blocksize,
        quant_type=qs.quant_type,
        offset=qs.offset if state2 is not None else None,
        absmax2=state2.absmax if state2 is not None else None,
        code2=state2.code if state2 is not None else None,
        blocksize2=state2.blocksize if state2 is not None else 256,
    )
    state.check(where)
    return state


NATIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _native_dequantizer_reason(state: QuantState4bit) -> str | None:
    """None when bitsandbytes' native CPU dequantizer gives `formats.dequantize_4bit`'s exact
    bytes for `state`, else why it is not used."""
    if state.packed.device.type != "cpu":
        return "not a CPU tensor (the GPU backends have their own dequantizer)"
    if state.shape[1] % state.blocksize:
        # bitsandbytes 0.50.2's C kernel walks rows, and mis-reads blocks that straddle two
        # rows (tests/quant/test_formats.py::test_bnb_cpu_dequantizer_bug).
        return "rows are not a whole number of blocks"
    if state.blocksize >= 2048:
        # bitsandbytes sends these to its torch.compile'd fallback (seconds to compile).
        return "blocksize >= 2048"
    lib = bnb()
    if lib is None or not hasattr(torch.ops, "bitsandbytes"):
        return "bitsandbytes is not importable"
    return None


def dequantize_4bit(state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`formats.dequantize_4bit` (the same bytes), through bitsandbytes' native CPU kernel where
    it is installed and reads this layout right (about 10x faster than the torch composition
    on CPU), else through the torch composition."""
    dtype = state.dtype if dtype is None else dtype
    # bitsandbytes' C kernel writes fp16, bf16 and fp32 only (a float64 output came back wrong).
    if dtype not in NATIVE_DTYPES or _native_dequantizer_reason(state) is not None:
        return dequantize_4bit_torch(state, dtype)
    absmax = dequantize_absmax(state)
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        state.packed_bytes(), absmax, state.blocksize, state.quant_type, list(state.shape), dtype
    )


def keep_standard_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking `model`'s 4-bit weights for its AVX512-BF16 CPU inference
    kernel (which it does on the first eval-mode, no-grad forward, and which breaks a later
    training step through the same layer); returns how many layers it set. Training jobs that
    evaluate between steps need this; the weights and their numbers are unchanged."""
    lib = bnb()
    count = 0
    if lib is not None:
        for module in model.modules():
            if isinstance(module, lib.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
                count += 1
    return count


def compute_dtype_for(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit computes in for input `x` (its `set_compute_type` rule,
    applied once to the layer exactly as its own forward does)."""
    if not getattr(layer, "compute_type_is_set", True):
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    return layer.compute_dtype if layer.compute_dtype is not None else x.dtype


def replace_4bit_weight(layer: nn.Module, w_data: torch.Tensor) -> None:
    """Requantize `w_data` into the layer's 4-bit weight with its own settings (HF peft's merge)."""
    lib = bnb()
    assert lib is not None
    weight = layer.weight
    kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_")}
    if "bnb_quantized" in kwargs:
        kwargs["bnb_quantized"] = False
    kwargs["requires_grad"] = False
    kwargs.pop("data", None)
    layer.weight = lib.nn.Params4bit(w_data.to("cpu"), **kwargs).to(weight.device)


def dequantize_8bit(layer: nn.Module) -> torch.Tensor:
    """The float weight of a bitsandbytes Linear8bitLt (HF peft's `dequantize_bnb_weight`)."""
    lib = bnb()
    assert lib is not None
    weight, state = layer.weight, layer.state
    if state.SCB is None:
        state.SCB = weight.SCB
    return lib.functional.int8_vectorwise_dequant(weight.data, state.SCB.to(weight.data.device))


def replace_8bit_weight(layer: nn.Module, w_data: torch.Tensor) -> None:
    """Requantize `w_data` into the layer's int8 weight (HF peft's merge)."""
    lib = bnb()
    assert lib is not None
    weight = layer.weight
    w = lib.nn.Int8Params(w_data.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights)
    layer.weight = w.to(weight.device)
    layer.state.reset_grads()


def warn_rounding(action: str, bits: int) -> None:
    """HF peft's warning on merging into (or unmerging from) a quantized weight."""
    message = f"{action} lora module to {bits}-bit linear may get different generations due to rounding errors."
    warnings.warn(message, stacklevel=3)
