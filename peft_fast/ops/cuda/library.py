"""The CUDA backend's library layer: loads `peft_fast._C` (build.load), gives its C++ ops fake
kernels for torch.compile, and holds the segmented LoRA forward/backward passes that lora.py
(one adapter: one segment) and mixed.py (a batch mixing adapters) both wrap in custom ops.

    forward   y = x Wᵀ + b                       cuBLAS (F.linear)
              keep bytes of x's dropout mask     keep_bytes_cuda: Philox once per 8 elements,
                                                 each segment with its own p (dropout.py)
              h = dropout(x) Aᵀ / (1-p)          sgmv_shrink_cuda, fp32 (M × max_rank)
              y += s · h Bᵀ                      sgmv_expand_cuda_ (expand-accumulate, in place)
    backward  dh = s · dy B                      sgmv_shrink_cuda with Bᵀ
              dBᵀ = s · hᵀ dy                    sgmv_adapter_grad_cuda
              dA = dhᵀ dropout(x) / (1-p)        sgmv_adapter_grad_cuda, mask read from the bytes
              dx = dy W  (cuBLAS);  dx += mask ⊙ (dh A) / (1-p)   sgmv_expand_cuda_
Saved for backward: x, h and the keep bytes (1 bit per element of x); never a byte mask or
the dropped copy of x. Only keep_bytes_cuda evaluates Philox (the same bytes as the Triton
kernels' `draw_keep_bytes` for the same seed).

Segments (rows grouped by adapter) come as plain lists: `seg_starts` (S + 1 positions into
`rows`, or into x's rows when `rows` is None), and per segment `rank_offsets`, `ranks`,
`scalings`, `dropout_ps`; the adapters' weights are stacked, A as (R_total, in) and B as
(out, R_total).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import size_reason, tensors_reason
from .build import load
from .dropout import PER_DRAW, report_keep_draws

load()


# ---- fake kernels of the C++ ops (shapes only) ---------------------------------------------


@torch.library.register_fake("peft_fast::sgmv_shrink_cuda")
def _(x, w, rows, seg_starts, rank_offsets, ranks, scales, dropout_ps, keep, max_rank):
    return x.new_empty((x.shape[0], max_rank), dtype=torch.float32)


@torch.library.register_fake("peft_fast::sgmv_expand_cuda_")
def _(out, h, w, rows, seg_starts, rank_offsets, ranks, alphas, dropout_ps, keep):
    return None


@torch.library.register_fake("peft_fast::sgmv_adapter_grad_cuda")
def _(p, q, rows, seg_starts, rank_offsets, ranks, scales, dropout_ps, keep, total_rank, dtype):
    return q.new_empty((total_rank, q.shape[1]), dtype=dtype)


@torch.library.register_fake("peft_fast::keep_bytes_cuda")
def _(seed, M, K, rows, seg_starts, dropout_ps):
    return seed.new_empty((M, -(-K // PER_DRAW)), dtype=torch.uint8)


@torch.library.register_fake("peft_fast::ia3_scale_cuda")
def _(t, scale):
    return torch.empty_like(t)


@torch.library.register_fake("peft_fast::ia3_scale_grad_cuda")
def _(g, r, scale):
    return torch.empty_like(g), g.new_empty((g.shape[1],), dtype=torch.float32)


def inner_contiguous(t: Tensor) -> Tensor:
    """`t` itself when its last dimension has stride 1 (what the kernels read), else a contiguous copy."""
    return t if t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1) else t.contiguous()


# ---- LoRA forward / backward over segments (the bodies of lora.py's and mixed.py's ops) ------


def segmented_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    rows: Tensor | None,
    seg_starts: list[int],
    rank_offsets: list[int],
    ranks: list[int],
    scalings: list[float],
    dropout_ps: list[float],
    seed: Tensor | None,
    max_rank: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, keep) for 2-D x: y (M, out) in x's dtype, h = dropout(x)Aᵀ/(1-p) (M, max_rank)
    fp32, keep the keep bytes of x's dropout mask (M, ceil(K/8)) uint8, drawn once here from
    `seed` (an empty tensor when no segment has dropout)."""
    y = torch.nn.functional.linear(x, weight, bias).contiguous()
    rescale = [1.0 / (1.0 - p) for p in dropout_ps]
    no_dropout = [0.0] * len(ranks)
    M, K = x.shape
    if any(p > 0.0 for p in dropout_ps):
        if seed is None:
            raise ValueError("seed is required when a dropout probability is > 0")
        keep = torch.ops.peft_fast.keep_bytes_cuda(seed, M, K, rows, seg_starts, dropout_ps)
        report_keep_draws(seg_starts, dropout_ps, K)
        mask_ps, mask = dropout_ps, keep
    else:
        keep = x.new_empty((0,), dtype=torch.uint8)
        mask_ps, mask = no_dropout, None
    h = torch.ops.peft_fast.sgmv_shrink_cuda(
        inner_contiguous(x), lora_A.contiguous(), rows, seg_starts, rank_offsets, ranks, rescale, mask_ps, mask,
        max_rank,
    )  # fmt: skip
    torch.ops.peft_fast.sgmv_expand_cuda_(
        y, h, lora_B.contiguous(), rows, seg_starts, rank_offsets, ranks, scalings, no_dropout, None
    )
    return y, h, keep


def segmented_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    h: Tensor,
    rows: Tensor | None,
    seg_starts: list[int],
    rank_offsets: list[int],
    ranks: list[int],
    scalings: list[float],
    dropout_ps: list[float],
    keep: Tensor,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of `segmented_forward`'s y, the dropout mask read from its keep bytes
    `keep` (unread when no segment has dropout); dA/dB are the stacked adapters' gradients in
    their dtype (zero for adapters without rows); dx is an empty tensor when not `need_dx`."""
    dy = inner_contiguous(dy)
    x = inner_contiguous(x)
    total_rank = lora_A.shape[0]
    no_dropout = [0.0] * len(ranks)
    rescale = [1.0 / (1.0 - p) for p in dropout_ps]
    dropout = any(p > 0.0 for p in dropout_ps)
    mask_ps, mask = (dropout_ps, keep) if dropout else (no_dropout, None)
    segs = (rows, seg_starts, rank_offsets, ranks)
    dh = torch.ops.peft_fast.sgmv_shrink_cuda(
        dy, lora_B.t().contiguous(), *segs, scalings, no_dropout, None, h.shape[1]
    )
    dBt = torch.ops.peft_fast.sgmv_adapter_grad_cuda(h, dy, *segs, scalings, no_dropout, None, total_rank, lora_B.dtype)
    dA = torch.ops.peft_fast.sgmv_adapter_grad_cuda(dh, x, *segs, rescale, mask_ps, mask, total_rank, lora_A.dtype)
    if need_dx:
        dx = dy.mm(weight).contiguous()
        torch.ops.peft_fast.sgmv_expand_cuda_(dx, dh, lora_A.t().contiguous(), *segs, rescale, mask_ps, mask)
    else:
        dx = dy.new_empty((0,))
    return dx, dA, dBt.t().contiguous()


def cuda_reason(named: dict[str, Tensor | None], x: Tensor, weight: Tensor) -> str | None:
    """None when the CUDA kernels can take these tensors: fp16/bf16/fp32 on one CUDA device,
    no autocast, sizes within int32 offsets; else why not (dispatch falls back)."""
    why, device = tensors_reason(named)
    if why is not None:
        return why
    if device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, got {device}"
    if torch.is_autocast_enabled("cuda"):
        return "autocast is enabled on cuda; the torch path follows its casting rules"
    return size_reason(x, weight)


def adapter_dtype_reason(x: Tensor, adapter: Tensor, name: str) -> str | None:
    """None when the adapter dtype is x's or float32 (the instantiated kernel pairs), else why not."""
    if adapter.dtype not in (x.dtype, torch.float32):
        return f"{name} has dtype {adapter.dtype}; the CUDA kernels take x's dtype {x.dtype} or float32"
    return None
