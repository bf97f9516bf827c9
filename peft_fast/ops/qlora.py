"""QLoRA ops: LoRA, DoRA and IA³ on a base weight stored in bitsandbytes' 4-bit format, the 4-bit
dequantizer, and the LoRA update added to a base output computed elsewhere (8-bit layers,
whose int8 product stays bitsandbytes'). Each dispatches to a backend (see dispatch.py); the
"torch" backend is `reference.py`: dequantize, `F.linear`, then the adapter."""

from __future__ import annotations

import torch

from ..quant.formats import QuantState4bit
from . import dispatch, reference
from .checks import check_adapter_factors, check_dropout_p, check_magnitude
from .dora_reference import dora_linear_4bit as _dora_linear_4bit_reference

dispatch.register("dequantize_4bit", "torch", reference.dequantize_4bit)
dispatch.register("lora_linear_4bit", "torch", reference.lora_linear_4bit)
dispatch.register("ia3_linear_4bit", "torch", reference.ia3_linear_4bit)
dispatch.register("lora_add", "torch", reference.lora_add)
dispatch.register("dora_linear_4bit", "torch", _dora_linear_4bit_reference)


def dequantize_4bit(state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) weight in `dtype` (default: the dtype it was quantized from), bit-identical
    to `bitsandbytes.functional.dequantize_4bit` on every backend."""
    fn = dispatch.select("dequantize_4bit", state.packed, state, dtype)
    return fn(state, dtype)


def lora_linear_4bit(
    x: torch.Tensor,
    state: QuantState4bit,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ` with W (out, in) in 4 bits.

    The base product runs in `compute_dtype` (default x's dtype) and comes back in x's dtype,
    as bitsandbytes' Linear4bit computes it; the update runs in the adapter's dtype and is
    cast to the base output's before the sum, as HF peft's bnb LoRA layer does."""
    compute_dtype = x.dtype if compute_dtype is None else compute_dtype
    args = (x, state, bias, lora_A, lora_B, scaling, dropout_p, training, compute_dtype)
    return dispatch.select("lora_linear_4bit", *args)(*args)


def dora_linear_4bit(
    x: torch.Tensor,
    state: QuantState4bit,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    compute_dtype: torch.dtype | None = None,
    *,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA with W (out, in) in 4 bits: `y = x Wᵀ + b + (m/‖W + s·B·A‖ − 1) ⊙ x'Wᵀ + m/‖W + s·B·A‖ ⊙ s·x'AᵀBᵀ`.

    The base product is bitsandbytes' Linear4bit (in `compute_dtype`, default x's dtype, back in
    x's dtype); the norm and, with dropout, x'Wᵀ use the dequantized weight, as HF peft's bnb
    DoRA does. `norm` (out,) is the weight norm when the caller holds it (then, without dropout,
    the weight is not dequantized at all). Returns (..., out) in x's dtype."""
    if not isinstance(state, QuantState4bit):
        raise TypeError(f"state must be a QuantState4bit, got {type(state).__name__}")
    out_f, in_f = state.shape
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must be (..., {in_f}), got {tuple(getattr(x, 'shape', ()))}")
    check_magnitude(magnitude, out_f)
    check_dropout_p(dropout_p)
    check_adapter_factors(lora_A, lora_B, in_f, out_f, scaling)
    if norm is not None and tuple(norm.shape) != (out_f,):
        raise ValueError(f"norm must be ({out_f},), got {tuple(norm.shape)}")
    compute_dtype = x.dtype if compute_dtype is None else compute_dtype
    # No norm given: the backend takes it of the weight it dequantizes anyway (once per call).
    args = (x, state, bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p), training, compute_dtype)
    return dispatch.select("dora_linear_4bit", *args, norm=norm)(*args, norm=norm)


def ia3_linear_4bit(
    x: torch.Tensor,
    state: QuantState4bit,
    bias: torch.Tensor | None,
    ia3_l: torch.Tensor,
    feedforward: bool,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """IA³ on a 4-bit linear layer; ia3_l as HF peft stores it ((1, in) feed-forward, else (out, 1))."""
    compute_dtype = x.dtype if compute_dtype is None else compute_dtype
    args = (x, state, bias, ia3_l, feedforward, compute_dtype)
    return dispatch.select("ia3_linear_4bit", *args)(*args)


def lora_add(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`result + scaling · dropout(x) Aᵀ Bᵀ` for a base output `result` computed elsewhere."""
    args = (result, x, lora_A, lora_B, scaling, dropout_p, training)
    return dispatch.select("lora_add", *args)(*args)
