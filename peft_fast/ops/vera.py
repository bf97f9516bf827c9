"""VeRA op: what VeRA's layers call (`vera_linear`), dispatched like every op.

Why the "torch" backend is the reference and no kernel: VeRA's adapter is two matmuls with the
frozen shared projections, `λ_b ⊙ ((λ_d ⊙ (x A_sᵀ)) B_sᵀ)`, plus two vector scalings. Folding
the vectors into LoRA factors (A' = λ_d A_s, B' = λ_b B_s) to reuse `lora_linear`'s kernels
would make backward form the full gradients of A' (r·in·M multiplies) and B' (out·r·M), work
HF peft never does since A and B are frozen; the unfused form needs only M·r and M·out for
the two vectors. The torch path adds `λ_b ⊙ v` onto the base output in one pass (addcmul). A
fused backend can register under "vera_linear" with this signature."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .checks import check_linear_args

__all__ = ["vera_linear"]


def _vera_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    result = F.linear(x, weight, bias)
    out_dtype = result.dtype
    in_f, out_f = weight.shape[1], weight.shape[0]
    xa = x.to(lambda_d.dtype)
    if dropout_p > 0.0 and training:
        xa = F.dropout(xa, p=dropout_p, training=True)
    sliced_A = vera_A[:, :in_f].to(xa.device)
    sliced_B = vera_B[:out_f, :].to(xa.device)
    v = F.linear(lambda_d * F.linear(xa, sliced_A), sliced_B)
    if v.dtype == result.dtype:
        return torch.addcmul(result, lambda_b, v)  # λ_b ⊙ v added in one pass (HF peft: two)
    return (result + lambda_b * v).to(out_dtype)


dispatch.register("vera_linear", "torch", _vera_linear_reference)


def vera_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) A[:, :in]ᵀ)) B[:out, :]ᵀ)`: HF peft's VeRA Linear.

    x (..., in); weight (out, in); bias (out,) or None; vera_A (r, ≥ in) and vera_B (≥ out, r),
    the model's shared projections, of which the first `in` columns / `out` rows are used;
    lambda_d (r,); lambda_b (out,). Returns (..., out) in the base output's dtype."""
    in_f, out_f = check_linear_args(x, weight, bias)
    if not isinstance(lambda_d, torch.Tensor) or lambda_d.dim() != 1:
        raise ValueError(f"lambda_d must be (r,), got {tuple(getattr(lambda_d, 'shape', ()))}")
    r = lambda_d.shape[0]
    if not isinstance(vera_A, torch.Tensor) or vera_A.dim() != 2 or vera_A.shape[0] != r or vera_A.shape[1] < in_f:
        raise ValueError(f"vera_A must be ({r}, >= {in_f}), got {tuple(getattr(vera_A, 'shape', ()))}")
    if not isinstance(vera_B, torch.Tensor) or vera_B.dim() != 2 or vera_B.shape[1] != r or vera_B.shape[0] < out_f:
        raise ValueError(f"vera_B must be (>= {out_f}, {r}), got {tuple(getattr(vera_B, 'shape', ()))}")
    if not isinstance(lambda_b, torch.Tensor) or tuple(lambda_b.shape) != (out_f,):
        raise ValueError(f"lambda_b must be ({out_f},), got {tuple(getattr(lambda_b, 'shape', ()))}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    args = (x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training)
    return dispatch.select("vera_linear", *args)(*args)
