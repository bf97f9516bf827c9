"""Pure-PyTorch reference implementations: the oracle every kernel is tested against,
and the path that runs wherever no kernel backend can.

The math and dtype handling follow HF peft's LoRA and IA³ layers exactly:
the base product runs in the base weight's dtype, the adapter path in the adapter's
dtype (fp32 adapters on a bf16 base stay fp32), and the sum is cast back to the base
output's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..quant.bnb import dequantize_4bit
from ..quant.formats import QuantState4bit
from .mixed_batch import RowGroups, group_rows

__all__ = [
    "dequantize_4bit",
    "ia3_linear",
    "ia3_linear_4bit",
    "linear_4bit",
    "lora_add",
    "lora_embedding",
    "lora_linear",
    "lora_linear_4bit",
    "lora_linear_mixed",
    "xlora_linear",
]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ` with W (out, in), A (r, in), B (out, r)."""
    result = F.linear(x, weight, bias)
    out_dtype = result.dtype
    xa = x.to(lora_A.dtype)
    if dropout_p > 0.0 and training:
        xa = F.dropout(xa, p=dropout_p, training=True)
    delta = F.linear(F.linear(xa, lora_A), lora_B) * scaling
    return (result + delta).to(out_dtype)


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ia3_l: torch.Tensor,
    feedforward: bool,
) -> torch.Tensor:
    """IA³: `(x · l) Wᵀ + b` for feed-forward layers (l of shape (1, in)),
    `(x Wᵀ + b) · l` otherwise (l of shape (out, 1))."""
    scale = ia3_l.flatten()
    if feedforward:
        interm = (x.to(ia3_l.dtype) * scale).to(x.dtype)
        return F.linear(interm, weight, bias)
    result = F.linear(x, weight, bias)
    return (result * scale).to(result.dtype)


def lora_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    *,
    result: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embedding lookup (or `result`, when given) plus `scaling · A[:, ids]ᵀ Bᵀ`, with A
    (r, num_embeddings), B (dim, r)."""
    if result is None:
        result = F.embedding(input_ids, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    out_dtype = result.dtype
    after_A = F.embedding(input_ids, lora_A.T, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    return (result + (after_A @ lora_B.T) * scaling).to(out_dtype)


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: torch.Tensor,
    training: bool = True,
    *,
    plan: RowGroups | None = None,
    stack: object = None,
) -> torch.Tensor:
    """A batch whose rows use different adapters: row i (along dim 0 of x) gets adapter
    `row_adapter[i]` (an index into the lists), or none where it is -1. `plan`, the rows
    grouped by adapter (see ops.lora_linear_mixed), is used when given (its row slices have
    host-known sizes, so torch.compile traces this without a graph break), else built from
    row_adapter; `stack` is a kernel backends' hint, ignored here."""
    groups = plan if plan is not None else group_rows(row_adapter, x.device)
    result = F.linear(x, weight, bias)
    out_dtype = result.dtype
    starts = groups.seg_starts
    for s, k in enumerate(groups.present):
        A, B, scaling, p = lora_As[k], lora_Bs[k], scalings[k], dropout_ps[k]
        rows = groups.row_order[starts[s] : starts[s + 1]].long()
        xa = x.index_select(0, rows).to(A.dtype)
        if p > 0.0 and training:
            xa = F.dropout(xa, p=p, training=True)
        delta = F.linear(F.linear(xa, A), B) * scaling
        result = result.index_add(0, rows, delta.to(out_dtype))
    return result


# -- 4-bit base weights (bitsandbytes' format; peft_fast/quant/formats.py) --------------------
# The math and dtypes follow bitsandbytes' Linear4bit (x cast to the compute dtype, the weight
# dequantized to it, the output cast back to x's dtype) and HF peft's bnb layers around it.


class _Linear4bit(torch.autograd.Function):
    """`x Wᵀ + b` with W dequantized from 4 bits for the product and dropped right after;
    backward dequantizes again, so no full-precision copy of W lives between the passes
    (what bitsandbytes' MatMul4Bit does, with the same roundings). The dequantizer is
    bitsandbytes' native one where it is installed and exact for the layout (quant/bnb.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, state: QuantState4bit) -> torch.Tensor:
        ctx.state = state
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, dequantize_4bit(state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # bitsandbytes: dequantize to the weight's original dtype, then cast to grad's.
            grad_x = grad @ dequantize_4bit(ctx.state).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=ctx.bias_dtype)
        return grad_x, grad_bias, None


def linear_4bit(
    x: torch.Tensor, state: QuantState4bit, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes' Linear4bit forward: `(x Wᵀ + b)` computed in `compute_dtype`, returned in x's dtype."""
    inp_dtype = x.dtype
    x = x.to(compute_dtype)
    if bias is not None:
        bias = bias.to(compute_dtype)
    return _Linear4bit.apply(x, bias, state).to(inp_dtype)


def lora_add(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`result + scaling · dropout(x) Aᵀ Bᵀ`, the update computed in the adapter's dtype and
    cast to result's before the sum (HF peft's bnb layers)."""
    xa = x.to(lora_A.dtype)
    if dropout_p > 0.0 and training:
        xa = F.dropout(xa, p=dropout_p, training=True)
    delta = F.linear(F.linear(xa, lora_A), lora_B) * scaling
    return result + delta.to(result.dtype)


def lora_linear_4bit(
    x: torch.Tensor,
    state: QuantState4bit,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """LoRA on a 4-bit base: bitsandbytes' Linear4bit output plus the LoRA update."""
    return lora_add(linear_4bit(x, state, bias, compute_dtype), x, lora_A, lora_B, scaling, dropout_p, training)


def ia3_linear_4bit(
    x: torch.Tensor,
    state: QuantState4bit,
    bias: torch.Tensor | None,
    ia3_l: torch.Tensor,
    feedforward: bool,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """IA³ on a 4-bit base as HF peft's bnb IA³ layer computes it: x goes to fp32 first (outside
    autocast), the vector scales the input (feed-forward) or the output, the result stays fp32."""
    scale = ia3_l.flatten()
    if not torch.is_autocast_enabled() and x.dtype != torch.float32:
        x = x.float()
    if feedforward:
        return linear_4bit(x * scale, state, bias, compute_dtype)
    return linear_4bit(x, state, bias, compute_dtype) * scale


def xlora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: Sequence[int],
    token_scalings: torch.Tensor,
    dropout_ps: Sequence[float],
    training: bool = True,
) -> torch.Tensor:
    """X-LoRA's mixture of experts, stacked: `x Wᵀ + b + ((dropout(x) Aᵀ) ⊙ G) Bᵀ` where A
    (Σr, in) and B (out, Σr) hold every expert stacked along the rank and G (..., Σr) repeats
    each expert's per-token coefficient `token_scalings[..., i]` over its rank slice.

    One shrink and one expand for all experts. With dropout active (training, some p > 0)
    each expert's slice of the shrink sees its own mask, as HF peft draws one per expert."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    result = F.linear(x2, weight, bias)
    xa = x2.to(lora_A.dtype)
    if training and any(p > 0.0 for p in dropout_ps):
        slices = torch.split(lora_A, list(ranks), dim=0)
        h = torch.cat([F.linear(F.dropout(xa, p=p, training=True), a) for a, p in zip(slices, dropout_ps)], -1)
    else:
        h = F.linear(xa, lora_A)
    g = token_scalings.reshape(-1, len(ranks)).to(h.dtype).index_select(-1, expert_of_rank(tuple(ranks), h.device))
    if result.dtype == h.dtype:  # the expand accumulates into the base output (one addmm)
        out = torch.addmm(result, h * g, lora_B.t())
    else:
        out = (result + F.linear(h * g, lora_B)).to(result.dtype)
    return out.reshape(*lead, out.shape[-1])


@functools.lru_cache(maxsize=256)
def expert_of_rank(ranks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(Σr,) int64 on `device`: the index of the expert owning each stacked rank."""
    return torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)).to(device)
