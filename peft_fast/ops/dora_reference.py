"""DoRA on the torch path: the reference every DoRA kernel is tested against, and the CPU path.

The math is HF peft 0.21's (`peft/tuners/lora/dora.py`): with x' = dropout(x) in training,

    norm  = ‖W + s·B·A‖ per output row, treated as a constant (no gradient), as HF does
    scale = m / norm
    y     = x Wᵀ + b + (scale − 1) ⊙ x' Wᵀ + scale ⊙ s · x' Aᵀ Bᵀ

and, without dropout (eval, or p = 0), x' Wᵀ is the base output itself, so y = scale ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b.

What this path does differently from HF peft, for speed and memory (the values are the same up
to rounding):

* the norm is never built from `W + s·B·A`: `‖w_o‖² + 2s·⟨w_o, (B A)_o⟩ + s²·‖(B A)_o‖²` needs
  only `W Aᵀ` (out × r), `A Aᵀ` (r × r) and row sums, computed in fp32 in row blocks (no
  identity-matrix product, no out × in temporary beyond one block of 2**22 elements);
* forward and backward are one autograd Function: without dropout it runs one base matmul
  forward and one backward (HF: the same), with dropout two each (HF: the same count, but
  also the out × in norm temporaries and several M × out intermediates);
* it saves for backward x (already alive in the model), a bool keep-mask (1 byte an element,
  where HF keeps the fp32 dropped copy and the fp32 dropout noise), h = x'Aᵀ (M × r) and one
  M × out tensor `u = x'Wᵀ + s·x'AᵀBᵀ` (HF keeps two: x'Wᵀ and x'AᵀBᵀ).

The dropout mask is drawn exactly as `F.dropout` draws it on CPU (`bernoulli_(1 − p)` on a
tensor of x's shape and the adapter's dtype), so with the same seed it is HF peft's mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.formats import QuantState4bit
from .reference import dequantize_4bit, linear_4bit

__all__ = [
    "dora_add",
    "dora_embedding",
    "dora_linear",
    "dora_linear_4bit",
    "dora_weight_norm",
    "dora_weight_norm_float64",
]

# Elements of W per block of the norm computation (bounds its fp32 temporaries to 16 MiB).
NORM_BLOCK_ELEMENTS = 2**22


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row of W (out, in), A (r, in), B (out, r), as an fp32 (out,) tensor without
    gradient; `W + s·B·A` is never built (see the module docstring)."""
    with torch.no_grad():
        A = lora_A.float()
        B = lora_B.float()
        s = float(scaling)
        gram = A @ A.t()  # (r, r)
        rows = max(1, NORM_BLOCK_ELEMENTS // max(1, weight.shape[1]))
        parts = []
        for r0 in range(0, weight.shape[0], rows):
            w = weight[r0 : r0 + rows].float()
            b = B[r0 : r0 + rows]
            # 2s·W Aᵀ + s²·B (A Aᵀ), dotted with B row by row: 2s⟨w, (BA)⟩ + s²‖BA‖²
            cross = F.linear(w, A).mul_(2.0 * s).addmm_(b, gram, alpha=s * s)
            sq = torch.linalg.vecdot(cross, b).add_(torch.linalg.vector_norm(w, dim=1).square_())
            parts.append(sq.clamp_min_(0.0).sqrt_())
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def dora_weight_norm_float64(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The plain definition, `torch.linalg.norm(W + s·B·A, dim=1)` in float64: the test oracle."""
    with torch.no_grad():
        w = weight.double() + float(scaling) * (lora_B.double() @ lora_A.double())
        return torch.linalg.norm(w, dim=1)


class _DoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + (scale − 1) ⊙ x'Wᵀ + scale ⊙ s·x'AᵀBᵀ for 2-D x, W frozen (see module docstring).

    Written as y = scale ⊙ u + (x Wᵀ − x'Wᵀ) + b with u = x'Wᵀ + s·x'AᵀBᵀ (u is what the
    magnitude's gradient needs), so the M × out work is three elementwise passes (two without
    dropout), and the scale folds into B's rows (out × r) in backward instead of into dy."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p):
        lora_dtype = lora_A.dtype
        base = F.linear(x, weight)
        xa = x.to(lora_dtype)
        scale = magnitude / norm.to(magnitude.dtype)
        keep = None
        if dropout_p > 0.0:
            noise = torch.empty_like(xa).bernoulli_(1.0 - dropout_p)  # F.dropout's draw on CPU
            keep = noise.bool()
            xd = xa * noise.div_(1.0 - dropout_p)
            del noise
            v = F.linear(xd, weight.to(lora_dtype))
        else:
            xd = xa
            v = base
        h = F.linear(xd, lora_A)
        del xd
        u = torch.addmm(v, h, lora_B.t(), alpha=scaling) if v.dtype == h.dtype else v + F.linear(h, lora_B) * scaling
        y = u * scale if keep is None else (base - v).addcmul_(u, scale)
        if bias is not None:
            y = y.add_(bias)
        ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, norm, scale, h, u, keep)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.has_bias = bias is not None
        return y.to(base.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, magnitude, norm, scale, h, u, keep = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        need = ctx.needs_input_grad
        g = dy.to(u.dtype)
        dmag = (g * u).sum(0).div_(norm.to(u.dtype)).to(magnitude.dtype) if need[5] else None
        row = (scale * s).to(lora_B.dtype)[:, None]  # dL/d(x'AᵀBᵀ) = dy ⊙ scale·s: folded into B's rows
        dB = (g.t().to(lora_B.dtype) @ h.to(lora_B.dtype)).mul_(row) if need[4] else None
        dh = g.to(lora_B.dtype) @ (lora_B * row)
        xa = x.to(lora_A.dtype)
        dA = None
        if need[3]:
            xd = xa if keep is None else (xa * keep).div_(1.0 - p)
            dA = dh.t() @ xd
        dx = None
        if need[0]:
            w, a = weight.to(g.dtype), lora_A.to(g.dtype)
            if keep is None:
                dx = torch.addmm(dh.to(g.dtype) @ a, g * scale.to(g.dtype), w)
            else:
                inner = torch.addmm(dh.to(g.dtype) @ a, g * (scale - 1).to(g.dtype), w)
                dx = (dy @ weight.to(dy.dtype)).add_(torch.where(keep, inner, 0.0), alpha=1.0 / (1.0 - p))
            dx = dx.to(x.dtype)
        db = dy.sum(0) if ctx.has_bias and need[2] else None
        return dx, None, db, dA, dB, dmag, None, None, None


def _dora_linear_composed(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p):
    """HF peft's composition with plain autograd: used when the base weight itself trains."""
    result = F.linear(x, weight, bias)
    xa = x.to(lora_A.dtype)
    scale = magnitude / norm.to(magnitude.dtype)
    if dropout_p > 0.0:
        xa = F.dropout(xa, p=dropout_p, training=True)
        v = F.linear(xa, weight.to(xa.dtype))
    else:
        v = result if bias is None else result - bias
    lora = F.linear(F.linear(xa, lora_A), lora_B)
    return (result + ((scale - 1) * v + scale * lora * scaling)).to(result.dtype)


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
    """DoRA on a linear layer (see the module docstring); `norm` is ‖W + s·B·A‖ per row when the
    caller has it (a cache), else it is computed here."""
    if norm is None:
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    p = float(dropout_p) if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    args = (x2, weight, bias, lora_A, lora_B, magnitude, norm, float(scaling), p)
    if weight.requires_grad:
        y = _dora_linear_composed(*args)
    else:
        y = _DoraLinear.apply(*args)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def dora_add(
    result: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
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
    """HF peft's DoRA variant on an output computed elsewhere (`result`: a quantized base layer's
    output, or the base output with earlier adapters already added), with plain autograd:
    `result + (scale − 1) ⊙ base + scale ⊙ s · x'AᵀBᵀ`, scale = m / ‖W + s·B·A‖, where
    base = result − b without dropout (so earlier adapters' updates are rescaled too, as in
    HF peft) and base = x'Wᵀ with it (x' = dropout(x), drawn as `F.dropout` draws it).
    `weight` is read only for the norm (when none is given) and for x'Wᵀ: it may be None when
    `norm` is given and nothing is dropped."""
    if norm is None:
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    xa = x.to(lora_A.dtype)
    scale = magnitude / norm.to(magnitude.dtype)
    if dropout_p > 0.0 and training:
        xa = F.dropout(xa, p=dropout_p, training=True)
        base = F.linear(xa, weight.to(xa.dtype))
    else:
        base = result if bias is None else result - bias
    lora = F.linear(F.linear(xa, lora_A), lora_B)
    return (result + ((scale - 1) * base + scale * lora * scaling)).to(result.dtype)


def dora_linear_4bit(
    x: torch.Tensor,
    state: QuantState4bit,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    compute_dtype: torch.dtype,
    *,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA on a 4-bit base as HF peft's bnb Linear4bit computes it: bitsandbytes' Linear4bit
    output, then the DoRA update with the dequantized weight (its norm, and x'Wᵀ with dropout).
    The weight is dequantized once for both, as HF peft does, and not at all when the caller
    holds the norm and nothing is dropped."""
    dropping = dropout_p > 0.0 and training
    weight = dequantize_4bit(state) if norm is None or dropping else None
    if norm is None:
        norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    result = linear_4bit(x, state, bias, compute_dtype)
    return dora_add(result, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, norm=norm)


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
    """DoRA on an embedding (HF peft's DoraEmbeddingLayer): weight (num, dim), A (r, num),
    B (dim, r); the norm runs over each embedding dimension (a column of weight), and
    `y = scale ⊙ (result + s · A[:, ids]ᵀ Bᵀ)` with scale = m / norm (dim,) and result the
    lookup E[ids] unless given (the output with earlier adapters added, as HF peft chains them)."""
    if norm is None:
        norm = dora_weight_norm(weight.t(), lora_A, lora_B, scaling)
    lookup = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    if result is None:
        result = F.embedding(input_ids, weight, *lookup)
    out_dtype = result.dtype
    scale = magnitude / norm.to(magnitude.dtype)
    after_A = F.embedding(input_ids, lora_A.T, *lookup)
    return (scale * result + scale * (after_A @ lora_B.T) * scaling).to(out_dtype)
