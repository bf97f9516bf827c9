"""DoRA ops: what the DoRA layers call (`LoraConfig(use_dora=True)`).

`dora_weight_norm` is ‖W + s·B·A‖ per output row; `dora_linear` and `dora_embedding` are the
layers' outputs; `dora_add` applies DoRA to an output computed elsewhere (a quantized base
layer's, or one that earlier active adapters already changed), as HF peft chains adapters.
Each checks its arguments once, here, then dispatches (see dispatch.py): the "torch" backend
is `dora_reference.py`, the "triton" backend `ops/triton/dora.py` (`dora_linear`, the norm).

The norm is treated as a constant, as HF peft does. In eval mode a layer's `DoraNormCache`
keeps it between calls (HF peft's DoRA caching, here always on: it is one float per output
feature) and recomputes it when the base weight, A, B or the scaling change.
"""

from __future__ import annotations

import torch

from . import dispatch
from . import dora_reference as reference
from .checks import check_adapter_factors, check_dropout_p, check_embedding_result, check_lora_args, check_magnitude

dispatch.register("dora_weight_norm", "torch", reference.dora_weight_norm)
dispatch.register("dora_linear", "torch", reference.dora_linear)
dispatch.register("dora_embedding", "torch", reference.dora_embedding)
dispatch.register("dora_add", "torch", reference.dora_add)

__all__ = ["DoraNormCache", "dora_add", "dora_embedding", "dora_linear", "dora_weight_norm"]


def _fingerprint(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class DoraNormCache:
    """One layer's cached weight norm for eval mode (HF peft's DoRA caching semantics: cached
    outside training only). The entry is keyed on the base weight, A and B (storage, in-place
    version counter, shape, dtype) and the scaling, so any change through autograd-visible
    in-place ops, a new tensor or a new scaling recomputes it; writes through `.data` are not
    visible to version counters, so layers call `clear()` when they merge or unmerge."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, torch.Tensor]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, adapter: str, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """The norm for `adapter`, from the cache when nothing it depends on changed."""
        key = (_fingerprint(weight), _fingerprint(lora_A), _fingerprint(lora_B), float(scaling))
        hit = self._entries.get(adapter)
        if hit is not None and hit[0] == key:
            return hit[1]
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
        self._entries[adapter] = (key, norm)
        return norm


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row of weight (out, in), lora_A (r, in), lora_B (out, r): an fp32 (out,)
    tensor without gradient. `W + s·B·A` is never materialized."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got {getattr(weight, 'shape', weight)!r}")
    out_f, in_f = weight.shape
    check_adapter_factors(lora_A, lora_B, in_f, out_f, scaling)
    fn = dispatch.select("dora_weight_norm", weight, lora_A, lora_B, scaling)
    return fn(weight, lora_A, lora_B, float(scaling))


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA on a linear layer: `x Wᵀ + b + (m/‖W + s·B·A‖ − 1) ⊙ x'Wᵀ + m/‖W + s·B·A‖ ⊙ s·x'AᵀBᵀ`
    with x' = dropout(x) (training and dropout_p > 0) or x, as HF peft computes it.

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_A: (r, in); lora_B: (out, r);
    magnitude: (out,). `norm` (out,) is the weight norm when the caller holds it (a
    `DoraNormCache`); it must be ‖W + s·B·A‖ of these very tensors. Returns (..., out) in the
    base output's dtype; gradients reach x, A, B, magnitude and a trainable bias (and W,
    through plain autograd, when it requires grad)."""
    check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    check_magnitude(magnitude, weight.shape[0])
    if norm is None:
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    elif tuple(norm.shape) != (weight.shape[0],):
        raise ValueError(f"norm must be ({weight.shape[0]},), got {tuple(norm.shape)}")
    args = (x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training)
    fn = dispatch.select("dora_linear", *args, norm=norm)
    return fn(*args, norm=norm)


def dora_add(
    result: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF peft's DoRA update applied to `result` (..., out), an output computed elsewhere:
    `result + (m/‖W + s·B·A‖ − 1) ⊙ base + m/‖W + s·B·A‖ ⊙ s·x'AᵀBᵀ` where base is
    `result − bias` without dropout (eval or dropout_p = 0: earlier adapters' updates in
    `result` are rescaled too, as in HF peft) and `x'Wᵀ` with x' = dropout(x) otherwise.

    x: (..., in); weight: (out, in) in any floating dtype (a dequantized 4-bit or 8-bit weight
    is fine; it is frozen here); bias: (out,) or None, the bias already in `result`;
    lora_A (r, in), lora_B (out, r), magnitude (out,); `norm` (out,) as in `dora_linear`.
    Returns a tensor of result's shape and dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = getattr(weight, "shape", weight)
        raise ValueError(f"weight must be a floating (out_features, in_features) tensor, got {got!r}")
    out_f, in_f = weight.shape
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must be (..., {in_f}), got {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != (*x.shape[:-1], out_f):
        raise ValueError(f"result must be {(*x.shape[:-1], out_f)}, got {tuple(getattr(result, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_f,)):
        raise ValueError(f"bias must be ({out_f},) or None, got {tuple(getattr(bias, 'shape', ()))}")
    check_dropout_p(dropout_p)
    check_magnitude(magnitude, out_f)
    if norm is None:
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)  # checks lora_A, lora_B and scaling
    elif tuple(norm.shape) != (out_f,):
        raise ValueError(f"norm must be ({out_f},), got {tuple(norm.shape)}")
    args = (result, x, weight, bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p), training)
    fn = dispatch.select("dora_add", *args, norm=norm)
    return fn(*args, norm=norm)


def dora_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    *,
    norm: torch.Tensor | None = None,
    result: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA on an embedding (HF peft's DoraEmbeddingLayer): weight (num, dim), lora_A (r, num),
    lora_B (dim, r), magnitude (dim,); `norm` (dim,) is ‖Wᵀ + s·B·A‖ per embedding dimension
    when the caller holds it. Returns `m/norm ⊙ (result + s · A[:, ids]ᵀ Bᵀ)`, where `result`
    is the lookup E[ids] unless given (the output with earlier adapters added, HF peft's chain)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be (num_embeddings, embedding_dim), got {getattr(weight, 'shape', weight)!r}")
    check_magnitude(magnitude, weight.shape[1])
    if result is not None:
        check_embedding_result(result, input_ids, weight)
    if norm is None:
        norm = dora_weight_norm(weight.t(), lora_A, lora_B, scaling)
    fn = dispatch.select("dora_embedding", input_ids, weight, lora_A, lora_B, magnitude, scaling)
    lookup = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    return fn(input_ids, weight, lora_A, lora_B, magnitude, scaling, *lookup, norm=norm, result=result)
