"""Triton backend of `lora_linear_mixed`: a batch whose rows use different LoRA adapters
(or none), registered with dispatch as the "triton" implementation.

Forward, with a = the adapter of each token's batch row, s_a its scaling, p_a its dropout:
    y = x Wᵀ + b                                  cuBLAS (F.linear): the base product is the
                                                  same for every row, nothing to fuse per adapter
    h = dropout_a(x) A_aᵀ / (1 - p_a)             sgmv_shrink | bgmv_shrink, fp32 (M × max r)
    y += s_a · h B_aᵀ                             sgmv_expand | bgmv_expand, in place
Backward (saves x, h and the dropout seed; never the mask or the dropped x):
    dh = s_a · dy B_a                             shrink with the stacked Bᵀ view
    dB_a = s_a · dy_aᵀ h_a, dA_a = dh_aᵀ dropout_a(x_a)/(1-p_a)
                                                  sgmv_adapter_grad, each adapter over its
                                                  own tokens, mask regenerated
    dx = dy W + mask_a ⊙ (dh A_a)/(1-p_a)         torch mm + expand with the stacked Aᵀ view
    dW = dyᵀ x, db = Σ dy                         torch, only when W / b require grad

Two paths, chosen per batch by `choose_path`: SGMV (tokens grouped into one segment per
adapter, `tl.dot` tiles of BLOCK_M tokens: prefill, popular adapters) and BGMV (one program
per token: decode with many adapters, where segments are shorter than a 16-row tile).
Adapter weights come stacked along the rank (`ops.sgmv.LoraStackCache`): one launch serves
every adapter and rank, with no padding to the largest rank.

An autograd Function, not a torch.library custom op: the grouping (`MixedPlan`) carries host
tuples that size the grids, which a custom op's schema cannot take; torch.compile treats
this op as a graph break.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from peft_fast.kernels.bgmv_expand import bgmv_expand
from peft_fast.kernels.bgmv_shrink import bgmv_shrink
from peft_fast.kernels.dropout import MAX_ELEMENTS
from peft_fast.kernels.segments import Segments, StackedRanks
from peft_fast.kernels.sgmv_adapter_grad import sgmv_adapter_grad
from peft_fast.kernels.sgmv_expand import sgmv_expand
from peft_fast.kernels.sgmv_shrink import sgmv_shrink

from . import dispatch
from .checks import mixed_adapter_reason
from .sgmv import LoraStackCache, MixedPlan, StackedLora, check_mixed_args, plan_mixed_batch
from .triton_support import check_linear_args, device_reason, size_reason

PATHS = ("sgmv", "bgmv")
# BGMV when rows are single tokens and segments average fewer rows than a tl.dot tile.
BGMV_MAX_MEAN_SEGMENT = 16


def choose_path(plan: MixedPlan, tokens_per_row: int) -> str:
    """ "bgmv" for decode-shaped batches (one token per row, segments averaging fewer than
    BGMV_MAX_MEAN_SEGMENT rows), "sgmv" otherwise. Depends on the batch only."""
    if tokens_per_row == 1 and plan.num_adapted_rows < BGMV_MAX_MEAN_SEGMENT * plan.num_segments:
        return "bgmv"
    return "sgmv"


class _Launch:
    """Everything the kernels need besides the operands, for one call."""

    def __init__(self, plan: MixedPlan, st: StackedLora, T: int, seed: Tensor | None, path: str) -> None:
        self.plan, self.st, self.seed, self.path, self.T = plan, st, seed, path, T
        max_rank = max((st.ranks[a] for a in plan.present), default=0)
        self.segs = Segments(plan.row_order, plan.seg_adapter, plan.seg_start, plan.max_seg_rows, T)
        self.ranks = StackedRanks(st.rank, st.offset, max_rank)
        self.ps = st.dropout_p if seed is not None else None
        self.keep_scale = st.keep_scale if seed is not None else st.ones

    def shrink(self, x: Tensor, a_stacked: Tensor, scales: Tensor, dropout: bool) -> Tensor:
        ps, seed = (self.ps, self.seed) if dropout else (None, None)
        if self.path == "bgmv":
            return bgmv_shrink(x, a_stacked, self.plan.row_adapter, self.T, self.ranks, scales, ps, seed)
        return sgmv_shrink(x, a_stacked, self.segs, self.ranks, scales, ps, seed)

    def expand(self, out: Tensor, h: Tensor, b_stacked: Tensor, scales: Tensor, dropout: bool) -> Tensor:
        ps, seed = (self.ps, self.seed) if dropout else (None, None)
        if self.path == "bgmv":
            return bgmv_expand(out, h, b_stacked, self.plan.row_adapter, self.T, self.ranks, scales, ps, seed)
        return sgmv_expand(out, h, b_stacked, self.segs, self.ranks, scales, ps, seed)


class _MixedLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, launch: _Launch):  # type: ignore[override]
        st = launch.st
        y = F.linear(x, weight, bias)
        h = launch.shrink(x, A, launch.keep_scale, dropout=True)
        launch.expand(y, h, B, st.scaling, dropout=False)
        ctx.save_for_backward(x, weight, A, B, h)
        ctx.launch = launch
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, A, B, h = ctx.saved_tensors
        launch: _Launch = ctx.launch
        st = launch.st
        need = ctx.needs_input_grad
        r_total = A.shape[0]
        dh = launch.shrink(dy, B.t(), st.scaling, dropout=False)
        dA = dB = dx = None
        if need[4]:
            dB = sgmv_adapter_grad(h, dy, r_total, launch.segs, launch.ranks, st.scaling, B.dtype).t()
        if need[3]:
            dA = sgmv_adapter_grad(
                dh, x, r_total, launch.segs, launch.ranks, launch.keep_scale, A.dtype, launch.ps, launch.seed
            )
        if need[0]:
            dx = launch.expand(dy.mm(weight), dh, A.t(), launch.keep_scale, dropout=True)
        dW = dy.t().mm(x) if need[1] else None
        db = dy.sum(0) if need[2] else None
        return dx, dW, db, dA, dB, None


def tokens_per_row(x: Tensor) -> int:
    """Tokens per batch row of x (batch, ..., in): the product of its middle dimensions."""
    T = 1
    for d in x.shape[1:-1]:
        T *= d
    return T


def lora_linear_mixed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: Tensor,
    training: bool = True,
    *,
    plan: MixedPlan | None = None,
    stack: LoraStackCache | None = None,
    path: str | None = None,
) -> Tensor:
    """Same contract as `peft_fast.ops.lora_linear_mixed`, on the SGMV/BGMV Triton kernels.

    x: (batch, ..., in) with row i (dim 0) on adapter `row_adapter[i]` (-1 = base only);
    all its tokens (the middle dims) use that adapter. `plan` (the batch's grouping) and
    `stack` (the layer's stacked-weight cache) are optional: without them they are built for
    this call. `path` forces "sgmv" or "bgmv" (default: `choose_path`). Gradients reach x,
    each adapter's A and B (from its own rows only), and weight/bias when they require grad.
    """
    in_f, out_f = check_linear_args(x, weight, bias)
    if x.dim() < 2:
        raise ValueError(f"x must be (batch, ..., in_features) with a batch dimension, got shape {tuple(x.shape)}")
    check_mixed_args(in_f, out_f, lora_As, lora_Bs, scalings, dropout_ps, row_adapter, x.shape[0])
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    if plan is None:
        plan = plan_mixed_batch(row_adapter, x.device)
    elif plan.batch_size != x.shape[0]:
        raise ValueError(f"plan groups {plan.batch_size} rows but x has {x.shape[0]}")
    if plan.present and max(plan.present) >= len(lora_As):
        raise ValueError(f"row_adapter refers to adapter {max(plan.present)} but only {len(lora_As)} are given")
    if not plan.present:
        return F.linear(x, weight, bias)
    dtypes = {t.dtype for t in list(lora_As) + list(lora_Bs)}
    if len(dtypes) != 1:
        raise TypeError(f"all lora_As and lora_Bs must share one dtype, got {sorted(map(str, dtypes))}")
    autograd = torch.is_grad_enabled() and any(t.requires_grad for t in list(lora_As) + list(lora_Bs))
    st = (stack or LoraStackCache()).get(lora_As, lora_Bs, scalings, dropout_ps, plan.present if autograd else None)
    T = tokens_per_row(x)
    seed = None
    if training and any(dropout_ps[a] > 0.0 for a in plan.present):
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    launch = _Launch(plan, st, T, seed, path or choose_path(plan, T))
    y = _MixedLora.apply(x.reshape(-1, in_f), weight, bias, st.A, st.B, launch)
    return y.reshape(*x.shape[:-1], out_f)


def supports(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_ps: Sequence[float],
    row_adapter: Tensor,
    training: bool = True,
    **_: object,
) -> str | None:
    """None when the Triton kernels can take this call, else the reason (dispatch falls back)."""
    named, adapters_why = mixed_adapter_reason(x, weight, bias, lora_As, lora_Bs)
    why = device_reason(named) or adapters_why
    if why is not None:
        return why
    if x.dim() < 2:
        return "x has no batch dimension"
    if isinstance(row_adapter, Tensor) and row_adapter.device.type not in ("cpu", x.device.type):
        return f"row_adapter is on {row_adapter.device}"
    if training and any(p > 0.0 for p in dropout_ps) and x.numel() > MAX_ELEMENTS:
        return f"dropout on {x.numel()} elements exceeds the kernels' int32 mask numbering"
    return size_reason(x, weight)


dispatch.register("lora_linear_mixed", "triton", lora_linear_mixed, supports)
