"""Argument checks every kernel backend (Triton, CUDA) shares: op argument validation with
errors that name the argument, and the backend-neutral part of "can a kernel take this call".

Every backend's public function runs these before its kernels, so a bad argument gets the
same error whatever the backend.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from peft_fast.kernels.row_groups import RowGroups

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensors_reason(named: dict[str, torch.Tensor | None]) -> tuple[str | None, torch.device | None]:
    """(None, device) when every tensor in `named` (Nones skipped) is fp16/bf16/fp32 and all
    share one device; else (why not, None)."""
    tensors = {k: t for k, t in named.items() if t is not None}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor ({type(t).__name__})", None
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} has dtype {t.dtype}; kernels take {KERNEL_DTYPES}", None
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        return f"tensors on several devices: {sorted(map(str, devices))}", None
    return None, next(iter(devices))


def size_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when x, weight and the (..., out) output stay below 2**31 elements (the kernels'
    int32 offsets), else why not. Shapes are not validated here."""
    if weight.dim() != 2 or x.dim() < 1:
        return None
    rows = x.numel() // max(1, x.shape[-1])
    biggest = max(x.numel(), weight.numel(), rows * weight.shape[0])
    if biggest >= 2**31:
        return f"a tensor of {biggest} elements exceeds the kernels' int32 offsets"
    return None


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer's arguments; ValueError/TypeError
    naming the argument when x (..., in), weight (out, in) or bias (out,) do not fit."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (..., in_features), got {getattr(x, 'shape', x)!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got {getattr(weight, 'shape', weight)!r}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension must be weight's in_features {in_f}, got {x.shape[-1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    return in_f, out_f


def check_adapter_factors(
    lora_A, lora_B, in_f: int, out_f: int, scaling, names: tuple[str, str] = ("lora_A", "lora_B")
) -> int:
    """The rank r of a low-rank pair; ValueError/TypeError naming the argument when lora_A
    (r, in) with r >= 1, lora_B (out, r) or scaling (a real number) do not fit."""
    a_name, b_name = names
    if not isinstance(lora_A, torch.Tensor) or lora_A.dim() != 2 or lora_A.shape[1] != in_f or lora_A.shape[0] < 1:
        raise ValueError(f"{a_name} must be (r, {in_f}) with r >= 1, got {tuple(getattr(lora_A, 'shape', ()))}")
    r = lora_A.shape[0]
    if not isinstance(lora_B, torch.Tensor) or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"{b_name} must be ({out_f}, {r}), got {tuple(getattr(lora_B, 'shape', ()))}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    return r


def check_dropout_p(dropout_p) -> None:
    """ValueError unless dropout_p is a probability in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def check_magnitude(magnitude, features: int) -> None:
    """ValueError/TypeError unless DoRA's magnitude is a floating (features,) tensor."""
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (features,):
        raise ValueError(
            f"magnitude must be a ({features},) tensor (one value per output feature), "
            f"got {tuple(getattr(magnitude, 'shape', ())) or type(magnitude).__name__}"
        )
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude must be a floating tensor, got {magnitude.dtype}")


def check_embedding_result(result, input_ids: torch.Tensor, weight: torch.Tensor) -> None:
    """ValueError unless `result` (an embedding output computed elsewhere) has the lookup's shape
    (*input_ids.shape, embedding_dim)."""
    want = (*input_ids.shape, weight.shape[1])
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != want:
        raise ValueError(f"result must have the lookup's shape {want}, got {tuple(getattr(result, 'shape', ()))}")


def check_lora_args(
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, names: tuple[str, str] = ("lora_A", "lora_B")
) -> int:
    """The rank r of one adapter; ValueError/TypeError naming the argument when the linear
    arguments, lora_A (r, in), lora_B (out, r), scaling or dropout_p do not fit."""
    in_f, out_f = check_linear_args(x, weight, bias)
    r = check_adapter_factors(lora_A, lora_B, in_f, out_f, scaling, names)
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    check_dropout_p(dropout_p)
    return r


def check_ia3_args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ia3_l: torch.Tensor, feedforward: bool
) -> None:
    """ValueError naming the argument when the linear arguments or ia3_l ((1, in) for a
    feed-forward layer, (out, 1) otherwise) do not fit."""
    in_f, out_f = check_linear_args(x, weight, bias)
    expected = (1, in_f) if feedforward else (out_f, 1)
    if not isinstance(ia3_l, torch.Tensor) or tuple(ia3_l.shape) != expected:
        kind = "feed-forward" if feedforward else "non-feed-forward"
        raise ValueError(
            f"ia3_l must have shape {expected} for a {kind} layer, got {tuple(getattr(ia3_l, 'shape', ()))}"
        )


def mixed_adapter_reason(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
) -> tuple[dict[str, torch.Tensor | None], str | None]:
    """For a mixed-adapter call: every tensor by argument name (for a backend's device
    check), and why stacked-adapter kernels cannot take the adapters (None if they can):
    none given, or several dtypes (kernels stack all adapters in one tensor)."""
    named: dict[str, torch.Tensor | None] = {"x": x, "weight": weight, "bias": bias}
    named.update({f"lora_As[{k}]": t for k, t in enumerate(lora_As)})
    named.update({f"lora_Bs[{k}]": t for k, t in enumerate(lora_Bs)})
    if not lora_As:
        return named, "no adapters given"
    if len({t.dtype for t in (*lora_As, *lora_Bs)}) != 1:
        return named, "the adapters do not share one dtype (kernels stack their weights)"
    return named, None


def check_mixed_args(
    in_features: int,
    out_features: int,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: torch.Tensor,
    batch: int,
) -> None:
    """ValueError/TypeError naming the argument when the per-adapter lists or row_adapter
    do not fit a layer in_features → out_features and a batch of `batch` rows."""
    n = len(lora_As)
    for name, seq in (("lora_Bs", lora_Bs), ("scalings", scalings), ("dropout_ps", dropout_ps)):
        if len(seq) != n:
            raise ValueError(f"{name} must have one entry per adapter ({n}), got {len(seq)}")
    for k, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[1] != in_features or A.shape[0] < 1:
            raise ValueError(f"lora_As[{k}] must be (r, {in_features}) with r >= 1, got {getattr(A, 'shape', A)!r}")
        if not isinstance(B, torch.Tensor) or tuple(B.shape) != (out_features, A.shape[0]):
            raise ValueError(f"lora_Bs[{k}] must be ({out_features}, {A.shape[0]}), got {getattr(B, 'shape', B)!r}")
    for k, (s, p) in enumerate(zip(scalings, dropout_ps)):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"scalings[{k}] must be a real number, got {type(s).__name__}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_ps[{k}] must be in [0, 1), got {p!r}")
    if not isinstance(row_adapter, torch.Tensor) or row_adapter.shape != (batch,):
        raise ValueError(
            f"row_adapter must have shape ({batch},) (one entry per row of x), got {getattr(row_adapter, 'shape', row_adapter)!r}"  # noqa: E501
        )


def check_mixed_call(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: torch.Tensor,
    groups: RowGroups,
    same_dtype: bool = True,
) -> tuple[int, int]:
    """(in_features, out_features) of a `lora_linear_mixed` call whose rows are grouped by
    `groups`; ValueError/TypeError naming the argument when x (batch, ..., in), the linear
    arguments, the per-adapter lists, row_adapter or the grouping do not fit, or (with
    `same_dtype`, what the kernels that stack the adapters need) when the adapters do not share
    one dtype."""
    in_f, out_f = check_linear_args(x, weight, bias)
    if x.dim() < 2:
        raise ValueError(f"x must be (batch, ..., in_features) with a batch dimension, got shape {tuple(x.shape)}")
    check_mixed_args(in_f, out_f, lora_As, lora_Bs, scalings, dropout_ps, row_adapter, x.shape[0])
    if groups.batch_size != x.shape[0]:
        raise ValueError(f"plan groups {groups.batch_size} rows but x has {x.shape[0]}")
    if groups.present and max(groups.present) >= len(lora_As):
        raise ValueError(f"row_adapter refers to adapter {max(groups.present)} but only {len(lora_As)} are given")
    dtypes = {t.dtype for t in (*lora_As, *lora_Bs)}
    if same_dtype and len(dtypes) > 1:
        raise TypeError(f"all lora_As and lora_Bs must share one dtype, got {sorted(map(str, dtypes))}")
    return in_f, out_f
