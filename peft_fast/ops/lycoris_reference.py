"""Pure-PyTorch LoHa and LoKr (the LyCORIS family): the oracle and the CPU path.

Each op returns only the adapter's contribution to the layer output (the layer adds it to the
base output, as HF peft does). The input is cast to the adapter's dtype first (HF peft's
`_cast_input_dtype`), and the result stays in that dtype.

Every op can run in two forms that give the same numbers up to rounding:

- "delta_weight": build ΔW (out × in) and apply it, as HF peft does on every forward.
- "factored": never build ΔW.
  - LoHa: `(a1 b1ᵀ) ⊙ (a2 b2ᵀ) = (a1 • a2)(b1 • b2)ᵀ`, with `•` the row-wise Khatri-Rao product,
    so ΔW x is a rank-r² product: `x (B1 • B2)ᵀ (A1 • A2)ᵀ`, factors (r², in) and (out, r²).
  - LoKr: `kron(w1, w2) x` with w1 (a, c), w2 (b, d) is `w1 · X · w2ᵀ` with x viewed as (c, d).

`row_scale` (shape (out,)) multiplies each output feature: HF peft's rank dropout drops rows of
ΔW, which is the same as scaling the adapter output's features, so it keeps its meaning in
every form.

The choice (`loha_form`, `lokr_form`) compares a cost in flops, counting each element that a
form writes to memory and reads back (ΔW and its two Hadamard factors, or the rank-r²
activation) as BYTE_COST flops. Both forms' backward passes cost about twice their forward
(one matmul for the input gradient, one for the weights'), so the forward's count decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Form = Literal["factored", "delta_weight"]
FORMS: tuple[str, ...] = ("factored", "delta_weight")

# Flops that moving one element through memory is worth in the form choice (a round number
# between a CPU's and a GPU's flops-per-byte ratio: an element is 2 bytes in bf16, 4 in fp32).
BYTE_COST = 8

__all__ = [
    "BYTE_COST",
    "FORMS",
    "loha_conv",
    "loha_delta_weight",
    "loha_form",
    "loha_linear",
    "lokr_conv",
    "lokr_delta_weight",
    "lokr_form",
    "lokr_linear",
]


def _check_form(form: str | None) -> None:
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or None (choose by cost), got {form!r}")


def _conv(ndim: int):
    if ndim == 1:
        return F.conv1d
    if ndim == 2:
        return F.conv2d
    raise ValueError(f"LoHa/LoKr convolutions take Conv1d or Conv2d weights, got {ndim} spatial dimensions")


def _scale_rows(dw: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    """ΔW with row o (output feature or channel o) times row_scale[o]: HF peft's rank dropout."""
    if row_scale is None:
        return dw
    return dw * row_scale.to(dw.dtype).view(-1, *[1] * (dw.dim() - 1))


def _rows_of_conv(x: torch.Tensor, stride: Sequence[int]) -> int:
    """About how many output positions a convolution of x produces (for the cost model only)."""
    n = x.shape[0]
    for size, s in zip(x.shape[2:], stride):
        n *= max(1, size // s)
    return n


# -- LoHa ----------------------------------------------------------------------------------------


def loha_form(rows: int, n_in: int, n_out: int, rank: int) -> Form:
    """The cheaper LoHa form for `rows` input rows through an (n_out × n_in) layer at this rank.

    delta_weight: two rank-r products and their Hadamard (4·r·out·in + out·in flops, three
    out × in matrices through memory), then the matmul (2·rows·in·out).
    factored: the Khatri-Rao factors ((in + out)·r² flops and elements), then two matmuls
    through the rank-r² activation (2·rows·r²·(in + out) flops, rows·r² elements)."""
    r2 = rank * rank
    delta = 4 * rank * n_out * n_in + n_out * n_in + 2 * rows * n_in * n_out + BYTE_COST * 3 * n_out * n_in
    factored = (1 + BYTE_COST) * r2 * (n_in + n_out) + 2 * rows * r2 * (n_in + n_out) + BYTE_COST * rows * r2
    return "factored" if factored < delta else "delta_weight"


def loha_delta_weight(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scaling: float,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF peft's LoHa ΔW: `(w1a w1b) ⊙ (w2a w2b) · scaling`, (out, in) with w1a (out, r), w1b (r, in).

    With the CP tensors t1, t2 (r, r, kh, kw) (use_effective_conv2d) the factors are w1a (r, out),
    w1b (r, in) and ΔW is (out, in, kh, kw)."""
    if (t1 is None) != (t2 is None):
        raise ValueError("t1 and t2 are given together (use_effective_conv2d) or not at all")
    if t1 is None:
        return (w1a @ w1b) * (w2a @ w2b) * scaling
    rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
    rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    return rebuild1 * rebuild2 * scaling


def _khatri_rao_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri-Rao product: (n, r1) and (n, r2) -> (n, r1·r2), row i = a[i] ⊗ b[i]."""
    return (a.unsqueeze(2) * b.unsqueeze(1)).reshape(a.shape[0], -1)


def _loha_factors(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, out_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with ΔW = up @ down: up (out, r²) carries the output scale, down (r², in)."""
    up = _khatri_rao_rows(w1a, w2a)
    up = up * (out_scale.unsqueeze(1) if isinstance(out_scale, torch.Tensor) else out_scale)
    down = _khatri_rao_rows(w1b.T, w2b.T).T
    return up, down


def _out_scale(scaling: float, row_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
    return scaling if row_scale is None else row_scale.to(dtype) * scaling


def loha_linear(
    x: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scaling: float,
    row_scale: torch.Tensor | None = None,
    form: Form | None = None,
) -> torch.Tensor:
    """LoHa's output on a Linear layer: `x ΔWᵀ · row_scale`, ΔW from `loha_delta_weight`.

    x (..., in); w1a, w2a (out, r); w1b, w2b (r, in); row_scale (out,) or None.
    `form` None picks the cheaper form (`loha_form`)."""
    _check_form(form)
    x = x.to(w1a.dtype)
    n_out, rank = w1a.shape
    n_in = w1b.shape[1]
    if form is None:
        form = loha_form(x.numel() // max(1, n_in), n_in, n_out, rank)
    if form == "delta_weight":
        return F.linear(x, _scale_rows(loha_delta_weight(w1a, w1b, w2a, w2b, scaling), row_scale))
    up, down = _loha_factors(w1a, w1b, w2a, w2b, _out_scale(scaling, row_scale, w1a.dtype))
    return F.linear(F.linear(x, down), up)


def loha_conv(
    x: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scaling: float,
    row_scale: torch.Tensor | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    groups: int,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    form: Form | None = None,
) -> torch.Tensor:
    """LoHa's output on a Conv1d/Conv2d layer whose weight has `weight_shape` (out, in/groups, *k).

    Without t1/t2 the factors are w1a, w2a (out, r) and w1b, w2b (r, in/groups·prod(k)); ΔW is
    reshaped to `weight_shape`. The factored form (groups == 1, no CP tensors) is a convolution
    with the r² Khatri-Rao filters followed by a 1×1 convolution; the CP form
    (use_effective_conv2d) always builds ΔW."""
    _check_form(form)
    conv = _conv(len(weight_shape) - 2)
    x = x.to(w1a.dtype)
    can_factor = t1 is None and groups == 1
    if form == "factored" and not can_factor:
        raise ValueError("the factored LoHa convolution needs groups == 1 and no CP tensors (use_effective_conv2d)")
    if form is None:
        if can_factor:
            n_out, rank = w1a.shape
            form = loha_form(_rows_of_conv(x, stride), w1b.shape[1], n_out, rank)
        else:
            form = "delta_weight"
    if form == "delta_weight":
        dw = _scale_rows(loha_delta_weight(w1a, w1b, w2a, w2b, scaling, t1, t2).reshape(weight_shape), row_scale)
        return conv(x, dw, stride=stride, padding=padding, dilation=dilation, groups=groups)
    up, down = _loha_factors(w1a, w1b, w2a, w2b, _out_scale(scaling, row_scale, w1a.dtype))
    spatial = len(weight_shape) - 2
    h = conv(x, down.reshape(down.shape[0], *weight_shape[1:]), stride=stride, padding=padding, dilation=dilation)
    return conv(h, up.reshape(*up.shape, *[1] * spatial))


# -- LoKr ----------------------------------------------------------------------------------------


def lokr_form(rows: int, w1_shape: Sequence[int], w2_shape: Sequence[int], kernel: int = 1) -> Form:
    """The cheaper LoKr form for `rows` input rows, w1 (a, c), w2 (b, d) (times `kernel` taps).

    delta_weight: the Kronecker product (a·b·c·d·kernel flops and elements), then the matmul
    (2·rows·a·b·c·d·kernel). factored: two small matmuls in the cheaper order,
    min(2·rows·c·d·b·kernel + 2·rows·a·c·b, 2·rows·a·c·d + 2·rows·a·d·b·kernel), through an
    intermediate of rows·c·b (or rows·a·d) elements."""
    a, c = w1_shape[0], w1_shape[1]
    b, d = w2_shape[0], w2_shape[1]
    full = a * b * c * d * kernel
    delta = full * (1 + BYTE_COST) + 2 * rows * full
    w2_first = 2 * rows * (c * d * b * kernel + a * c * b) + BYTE_COST * rows * c * b
    w1_first = 2 * rows * (a * c * d + a * d * b * kernel) + BYTE_COST * rows * a * d
    return "factored" if min(w2_first, w1_first) < delta else "delta_weight"


def lokr_delta_weight(w1: torch.Tensor, w2: torch.Tensor, scaling: float) -> torch.Tensor:
    """HF peft's LoKr ΔW: `kron(w1, w2) · scaling` (w1 gains two trailing axes when w2 is 4-D),
    before the layer reshapes it to the base weight's shape."""
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    # Fresh standard strides: torch.kron fails on some "contiguous" einsum outputs whose size-1
    # axes carry odd strides (HF peft's LoKr on Conv1d with use_effective_conv2d hits this).
    return torch.kron(w1, w2.flatten().reshape(w2.shape)) * scaling


def lokr_linear(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    scaling: float,
    row_scale: torch.Tensor | None = None,
    form: Form | None = None,
) -> torch.Tensor:
    """LoKr's output on a Linear layer: `x kron(w1, w2)ᵀ · scaling · row_scale`.

    w1 (a, c), w2 (b, d), x (..., c·d) -> (..., a·b); row_scale (a·b,) or None."""
    _check_form(form)
    x = x.to(w1.dtype)
    a, c = w1.shape
    b, d = w2.shape
    if x.shape[-1] != c * d:
        raise ValueError(f"x has {x.shape[-1]} features but kron(w1, w2) takes {c}·{d} = {c * d}")
    rows = x.numel() // max(1, c * d)
    if form is None:
        form = lokr_form(rows, (a, c), (b, d))
    if form == "delta_weight":
        return F.linear(x, _scale_rows(lokr_delta_weight(w1, w2, scaling), row_scale))
    lead = x.shape[:-1]
    w1s = w1 * scaling
    # Plain 2-D GEMMs over all rows at once (a batched matmul of M tiny matrices is several
    # times slower on CPU), with one transposed copy of the intermediate between them.
    if c * d * b + a * c * b <= a * c * d + a * d * b:
        t = (x.reshape(-1, d) @ w2.T).view(rows, c, b)  # X w2ᵀ: (M, c, b)
        y = (t.transpose(1, 2).reshape(rows * b, c) @ w1s.T).view(rows, b, a).transpose(1, 2)
    else:
        xt = x.reshape(rows, c, d).transpose(1, 2).reshape(rows * d, c)
        t = (xt @ w1s.T).view(rows, d, a).transpose(1, 2)  # w1 X: (M, a, d)
        y = t.reshape(rows * a, d) @ w2.T
    y = y.reshape(*lead, a * b)
    if row_scale is not None:
        y = y * row_scale.to(y.dtype)
    return y


def lokr_conv(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    scaling: float,
    row_scale: torch.Tensor | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    groups: int,
    form: Form | None = None,
) -> torch.Tensor:
    """LoKr's output on a Conv1d/Conv2d layer whose weight has `weight_shape` (out, in/groups, *k).

    ΔW is `lokr_delta_weight(w1, w2)` reshaped to `weight_shape`, exactly as HF peft builds it.
    The factored form (Conv2d, groups == 1, w2 (b, d, kh, kw) or (b, d·kh·kw)) views x's
    channels as (c, d), convolves each of the c groups with w2, then mixes them with w1;
    Conv1d and grouped convolutions always build ΔW."""
    _check_form(form)
    spatial = len(weight_shape) - 2
    conv = _conv(spatial)
    x = x.to(w1.dtype)
    a, c = w1.shape[0], w1.shape[1]
    b = w2.shape[0]
    d = weight_shape[1] // c
    kernel = 1
    for k in weight_shape[2:]:
        kernel *= k
    can_factor = spatial == 2 and groups == 1 and w2.dim() in (2, 4) and a * b == weight_shape[0]
    if form == "factored" and not can_factor:
        raise ValueError("the factored LoKr convolution needs a Conv2d with groups == 1")
    if form is None:
        form = lokr_form(_rows_of_conv(x, stride), (a, c), (b, d), kernel) if can_factor else "delta_weight"
    if form == "delta_weight":
        dw = _scale_rows(lokr_delta_weight(w1, w2, scaling).reshape(weight_shape), row_scale)
        return conv(x, dw, stride=stride, padding=padding, dilation=dilation, groups=groups)
    n = x.shape[0]
    filters = w2.reshape(b, d, *weight_shape[2:])
    h = conv(x.reshape(n * c, d, *x.shape[2:]), filters, stride=stride, padding=padding, dilation=dilation)
    out_spatial = h.shape[2:]
    h = h.reshape(n, c, b, -1)
    y = torch.einsum("ac,ncbs->nabs", w1 * scaling, h).reshape(n, a * b, *out_spatial)
    if row_scale is not None:
        y = y * row_scale.to(y.dtype).view(-1, *[1] * spatial)
    return y
