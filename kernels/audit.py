"""Static audit: what every kernel variant will be on a GPU, read off its compiled code on a CPU machine.

Triton compiles for a GPU that is not there (`triton.compile(ASTSource(...), target=GPUTarget(...))`),
and the wheel ships `cuobjdump` and `nvdisasm`, which read the cubin. For every launch the launchers
in this folder can make (each constexpr combination they pass: dtype, bias, dropout, reduce modes,
segment lengths; with each GPU family's rows of `configs.py`), this module:

1. records the launch without running it: the launcher is called on small CPU tensors while
   `JITFunction.run` is replaced by a recorder and `configs.gpu_family` reports the family audited,
   so the launcher picks exactly the blocks, warps, stages and constexprs it would pick on that GPU;
2. specializes the arguments as the JIT does (integers equal to 1 become constexpr 1; pointers and
   integers divisible by 16 get `tt.divisibility`) and compiles for sm_90a and/or sm_80;
3. reports registers, stack and local (spill) bytes, shared memory, tensor-core instructions
   (HGMMA = Hopper warpgroup MMA, HMMA = Ampere-style MMA), TMA loads (UTMALDG) and SASS size.

`check(rows)` lists what CI refuses: a spill, shared memory over the family's limit, a variant that
does not compile, or a bf16/fp16 matmul-shaped variant with tiles of at least 64 rows and no HGMMA on
sm_90a. Registers and spills are facts about the code the GPU will run; the roofline times of
`peft_fast.audit_model` are a model, to be checked against the first GPU measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import configs

ARCHS = {"sm90": 90, "sm80": 80}
# Largest dynamic shared memory one block may use (bytes): H100/H200 227 KiB, A100 163 KiB.
SMEM_LIMIT = {"sm90": 232448, "sm80": 166912}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TRITON_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch, specialized as the JIT would: enough to compile it anywhere."""

    module: str  # where the @triton.jit function lives
    kernel: str  # its name in that module
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list[list[Any]]]
    options: dict[str, int]


@dataclass
class Row:
    """The audit of one variant on one architecture."""

    variant: str
    kernel: str
    arch: str
    dtype: str
    matmul_shaped: bool  # a tile product whose tiles have at least 64 rows: HGMMA expected on sm_90a
    blocks: dict[str, Any] = field(default_factory=dict)
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    hgmma: int | None = None
    hmma: int | None = None
    tma: int | None = None
    sass_instructions: int | None = None
    error: str | None = None


# ---- recording launches ------------------------------------------------------------------------


@contextlib.contextmanager
def recording(family: str) -> Iterator[list[Launch]]:
    """Within the block, launches of @triton.jit kernels are recorded, not run, and launchers see
    `family` ("sm90", "sm80") as the GPU family of every device."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append(specialize(self, args, kwargs))

    saved_run, saved_family = JITFunction.run, configs.gpu_family
    JITFunction.run = record  # type: ignore[method-assign]
    configs.gpu_family = lambda device: family
    try:
        yield launches
    finally:
        JITFunction.run = saved_run  # type: ignore[method-assign]
        configs.gpu_family = saved_family


def specialize(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Launch:
    """The signature, constexprs and attributes the JIT would give `fn` for this call."""
    kwargs = dict(kwargs)
    options = {k: int(kwargs.pop(k)) for k in ("num_warps", "num_stages") if k in kwargs}
    sig: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, p in enumerate(fn.params):
        value = args[i] if i < len(args) else kwargs[p.name]
        if p.is_constexpr or value is None:
            sig[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not p.do_not_specialize:
                sig[p.name] = "constexpr"
                constexprs[p.name] = 1
            else:
                sig[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0 and not p.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialize argument {p.name}={value!r}")
    return Launch(fn.fn.__module__, fn.__name__, sig, constexprs, attrs, options)


# ---- the variants the launchers make ----------------------------------------------------------

# Sizes the launches are recorded at: multiples of 16, as real model sizes are (only divisibility
# and the launchers' choices depend on them, never the compiled code's size).
M, K, N, RANK = 256, 256, 256, 16


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def _seed() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int64)


def _keep(rows: int, cols: int) -> torch.Tensor:
    """Keep bytes of a rows × cols dropout mask (dropout.py)."""
    from .dropout import keep_bytes_shape

    return torch.zeros(keep_bytes_shape(rows, cols), dtype=torch.uint8)


def _lora_shrink(dtype: torch.dtype, mode: str) -> None:
    from .lora_shrink import lora_shrink

    if mode == "bwd_dh":  # dh = s · dy B, B read through its transpose view
        lora_shrink(_t(M, N, dtype=dtype), _t(N, RANK, dtype=dtype).t(), 2.0)
    elif mode == "dropout_store":  # training forward: draws the mask and stores its keep bytes
        lora_shrink(_t(M, K, dtype=dtype), _t(RANK, K, dtype=dtype), 1.0, 0.1, _seed(), _keep(M, K))
    elif mode == "dropout_keep_in":  # r above the rank block: keep bytes drawn first, then read
        lora_shrink(_t(M, K, dtype=dtype), _t(8 * RANK, K, dtype=dtype), 1.0, 0.1, _seed(), _keep(M, K))
    else:  # no dropout, or dropout without grad (drawn, not stored)
        lora_shrink(_t(M, K, dtype=dtype), _t(RANK, K, dtype=dtype), 1.0, 0.1 if mode == "dropout" else 0.0, _seed())


def _xlora(dtype: torch.dtype, mode: str) -> None:
    """X-LoRA's launches (ops/triton/xlora.py): the stacked shrink, and lora_expand_add_ at the stacked rank."""
    from .xlora_shrink import xlora_shrink

    experts = 8
    expert_of_rank = torch.zeros(experts * RANK, dtype=torch.int32)
    coeff = _t(M, experts, dtype=dtype)
    if mode == "bwd":  # dh = (dy B) ⊙ G and raw = dy B, the stacked B read through its transpose view
        xlora_shrink(_t(M, N, dtype=dtype), _t(N, experts * RANK, dtype=dtype).t(), coeff, expert_of_rank, True)
    elif mode == "expand_add":  # y += hs Bᵀ with the stacked B (the rank of 8 experts)
        from .lora_expand import lora_expand_add_

        lora_expand_add_(_t(M, N, dtype=dtype), _t(M, experts * RANK), _t(N, experts * RANK, dtype=dtype))
    elif mode == "bwd_dx_add":  # dx += dh A, A read through its transpose view
        from .lora_expand import lora_expand_add_

        lora_expand_add_(_t(M, K, dtype=dtype), _t(M, experts * RANK), _t(experts * RANK, K, dtype=dtype).t())
    else:  # fwd: inference skips all-zero tiles; fwd_raw keeps x Aᵀ for the coefficients' gradient
        store = mode == "fwd_raw"
        a = _t(experts * RANK, K, dtype=dtype)
        xlora_shrink(_t(M, K, dtype=dtype), a, coeff, expert_of_rank, store_raw=store, skip_zero=not store)


def _lora_expand(dtype: torch.dtype, mode: str) -> None:
    from .lora_expand import lora_expand, lora_expand_add_

    if mode == "bwd_dx_dropout":  # dx = dy W + mask ⊙ (dh A) / (1-p), W and A through transposes
        w_t, a_t = _t(N, K, dtype=dtype).t(), _t(RANK, K, dtype=dtype).t()
        lora_expand(_t(M, N, dtype=dtype), w_t, None, _t(M, RANK), a_t, 1.25, _keep(M, K))
    elif mode == "add_fwd":  # the composite's forward epilogue: y += s · h Bᵀ into cuBLAS's y
        lora_expand_add_(_t(M, N, dtype=dtype), _t(M, RANK), _t(N, RANK, dtype=dtype), 2.0)
    elif mode == "add_bwd_dx_dropout":  # the composite's dx += mask ⊙ (dh A) / (1-p) into cuBLAS's dy W
        lora_expand_add_(_t(M, K, dtype=dtype), _t(M, RANK), _t(RANK, K, dtype=dtype).t(), 1.25, _keep(M, K))
    else:
        b = _t(N, dtype=dtype) if mode == "fwd_bias" else None
        lora_expand(_t(M, K, dtype=dtype), _t(N, K, dtype=dtype), b, _t(M, RANK), _t(N, RANK, dtype=dtype), 2.0)


def _lora_adapter_grad(dtype: torch.dtype, mode: str) -> None:
    from .lora_adapter_grad import lora_adapter_grad

    if mode == "dB":
        lora_adapter_grad(_t(M, RANK), _t(M, N, dtype=dtype), dtype, 2.0, transpose=True)
    else:  # dA = dhᵀ dropout(x) / (1-p)
        keep = _keep(M, K) if mode == "dA_dropout" else None
        lora_adapter_grad(_t(M, RANK), _t(M, K, dtype=dtype), dtype, 1.25, keep)


def _lora_grad_dy(dtype: torch.dtype) -> None:
    from .lora_grad_dy import lora_grad_dy

    lora_grad_dy(_t(M, N, dtype=dtype), _t(N, RANK, dtype=dtype), _t(M, RANK), 2.0)


def _ia3(dtype: torch.dtype, mode: str) -> None:
    from .ia3_scale import ia3_scaled_matmul

    x, w, dy = _t(M, K, dtype=dtype), _t(N, K, dtype=dtype), _t(M, N, dtype=dtype)
    scale_k, scale_n, bias = _t(K), _t(N), _t(N, dtype=dtype)
    if mode == "ff_fwd":
        ia3_scaled_matmul(x, w, bias, in_scale=scale_k)
    elif mode in ("attn_fwd", "attn_fwd_save_z"):
        ia3_scaled_matmul(x, w, bias, out_scale=scale_n, store_z=mode == "attn_fwd_save_z")
    elif mode == "ff_bwd":  # dx = (dy W) ⊙ l and Σ_m (dy W) ⊙ x for dl
        ia3_scaled_matmul(dy, w.t(), out_scale=scale_k, epilogue_reduce=x)
    else:  # attn_bwd: dx = (dy ⊙ l) W and Σ_m dy ⊙ z for dl
        ia3_scaled_matmul(dy, w.t(), in_scale=scale_n, prologue_reduce=_t(M, N, dtype=dtype))


def _segments(seg_rows: int):
    from .row_groups import RowGroups
    from .segments import StackedRanks

    n_seg = M // seg_rows
    i32 = torch.int32
    segs = RowGroups(  # M rows of one token, seg_rows consecutive rows per adapter
        torch.arange(M, dtype=i32) // seg_rows,
        torch.arange(M, dtype=i32),
        torch.arange(n_seg, dtype=i32),
        torch.arange(0, M + 1, seg_rows, dtype=i32),
        tuple(range(n_seg)),
        (seg_rows,) * n_seg,
    )
    ranks = StackedRanks(torch.full((n_seg,), RANK, dtype=i32), torch.arange(0, n_seg * RANK, RANK, dtype=i32), RANK)
    return segs, ranks, n_seg


def _sgmv(kind: str, dtype: torch.dtype, dropout: bool, seg_rows: int) -> None:
    from .sgmv_adapter_grad import sgmv_adapter_grad
    from .sgmv_expand import sgmv_expand
    from .sgmv_shrink import sgmv_shrink

    segs, ranks, n = _segments(seg_rows)
    keep = _keep(M, K) if dropout else None
    scales = _t(n) + 1
    if kind == "shrink":  # forward h (dropout) or backward dh = s · dy B (B through its transpose)
        if dropout:
            sgmv_shrink(_t(M, K, dtype=dtype), _t(n * RANK, K, dtype=dtype), segs, ranks, scales, keep)
        else:
            sgmv_shrink(_t(M, N, dtype=dtype), _t(N, n * RANK, dtype=dtype).t(), segs, ranks, scales)
    elif kind == "expand":  # forward y += s · h B, or backward dx += mask ⊙ (dh A) / (1-p)
        if dropout:
            b = _t(n * RANK, K, dtype=dtype).t()
            sgmv_expand(_t(M, K, dtype=dtype), _t(M, RANK), b, segs, ranks, scales, keep)
        else:
            sgmv_expand(_t(M, N, dtype=dtype), _t(M, RANK), _t(N, n * RANK, dtype=dtype), segs, ranks, scales)
    else:  # dB from (h, dy), dA from (dh, dropout(x))
        sgmv_adapter_grad(_t(M, RANK), _t(M, K, dtype=dtype), n * RANK, segs, ranks, scales, dtype, keep)


def _bgmv(kind: str, dtype: torch.dtype, dropout: bool) -> None:
    from .bgmv_expand import bgmv_expand
    from .bgmv_shrink import bgmv_shrink

    _, ranks, n = _segments(16)
    rows = torch.arange(M, dtype=torch.int32) % n
    scales = _t(n) + 1
    if kind == "shrink":
        keep = _keep(M, K) if dropout else None
        bgmv_shrink(_t(M, K, dtype=dtype), _t(n * RANK, K, dtype=dtype), rows, 1, ranks, scales, keep)
    else:
        keep = _keep(M, N) if dropout else None
        bgmv_expand(_t(M, N, dtype=dtype), _t(M, RANK), _t(N, n * RANK, dtype=dtype), rows, 1, ranks, scales, keep)


LOHA_RANK = 8  # HF peft's default r: r² = 64 columns, one chunk on GPUs
LOKR_SIDE = 64  # a = b = c = d = 64: factorization(4096), a Llama-7B projection


def _loha(kind: str, dtype: torch.dtype, mode: str) -> None:
    from .loha_expand import loha_expand
    from .loha_factor_grad import loha_factor_grad
    from .loha_shrink import loha_shrink

    r = LOHA_RANK
    w_out, w_in = _t(N, r, dtype=dtype), _t(r, K, dtype=dtype)  # w1a/w2a (out, r), w1b/w2b (r, in)
    row_scale = _t(N, dtype=dtype)
    if kind == "shrink":
        if mode == "fwd":  # h = x (w1b • w2b)ᵀ, the factors through their transposes
            loha_shrink(_t(M, K, dtype=dtype), w_in.t(), w_in.t())
        else:  # bwd_dh: dh = s (dy ⊙ row_scale) (w1a • w2a)
            loha_shrink(_t(M, N, dtype=dtype), w_out, w_out, row_scale, 2.0)
    elif kind == "expand":
        if mode == "fwd":  # y = s row_scale ⊙ h (w1a • w2a)ᵀ
            loha_expand(_t(M, r * r), w_out, w_out, row_scale, 2.0)
        else:  # bwd_dx: dx = dh (w1b • w2b)
            loha_expand(_t(M, r * r), w_in.t(), w_in.t())
    elif mode == "out_side":  # dw1a, dw2a from dyᵀ h, row_scale and s
        loha_factor_grad(_t(M, r * r), _t(M, N, dtype=dtype), w_out, w_out, row_scale, 2.0)
    else:  # in_side: dw1b, dw2b from dhᵀ x
        loha_factor_grad(_t(M, r * r), _t(M, K, dtype=dtype), w_in.t(), w_in.t())


def _lokr(dtype: torch.dtype, mode: str) -> None:
    from .lokr_apply import lokr_apply

    s = LOKR_SIDE
    w1, w2 = _t(s, s, dtype=dtype), _t(s, s, dtype=dtype)
    if mode == "fwd":  # y = s row_scale ⊙ (w1 X w2ᵀ)
        lokr_apply(_t(M, s * s, dtype=dtype), w1, w2, 2.0, out_scale=_t(s * s))
    else:  # bwd_dx: dx = w1ᵀ (s row_scale ⊙ dY) w2
        lokr_apply(_t(M, s * s, dtype=dtype), w1.t(), w2.t(), 2.0, in_scale=_t(s * s))


def _dora(dtype: torch.dtype, mode: str) -> None:
    """DoRA's kernels: the weight norm, the fused forward (one or two accumulators), dx, the composite epilogue."""
    from .dora_dx import dora_dx
    from .dora_epilogue import dora_epilogue
    from .dora_linear import dora_linear
    from .dora_norm import dora_norm

    scale = _t(N)
    if mode == "norm":
        dora_norm(_t(N, K, dtype=dtype), _t(RANK, K, dtype=dtype), _t(N, RANK, dtype=dtype), 2.0)
    elif mode in ("fwd", "fwd_bias_dropout"):
        dropout = mode == "fwd_bias_dropout"
        bias = _t(N, dtype=dtype) if dropout else None
        x, w, b = _t(M, K, dtype=dtype), _t(N, K, dtype=dtype), _t(N, RANK, dtype=dtype)
        dora_linear(x, w, bias, _t(M, RANK), b, scale, 2.0, 0.1 if dropout else 0.0, _keep(M, K))
    elif mode in ("dx", "dx_dropout"):
        p = 0.1 if mode == "dx_dropout" else 0.0
        dy, w, a = _t(M, N, dtype=dtype), _t(N, K, dtype=dtype), _t(RANK, K, dtype=dtype)
        dora_dx(dy, w, scale, _t(M, RANK), a, p, _keep(M, K))
    else:  # composite epilogue, with dropout (v given) and bias
        mn = [_t(M, N, dtype=dtype) for _ in range(3)]
        dora_epilogue(*mn, scale, _t(N, dtype=dtype), 2.0)


def _dropout_mask(dtype: torch.dtype) -> None:
    from .dropout import dropout_mask

    dropout_mask(_seed(), M, K, 0.1, "cpu")


def _keep_bytes(row_p: bool) -> None:
    from .dropout import draw_keep_bytes

    draw_keep_bytes(_seed(), M, K, 0.1, "cpu", _t(M) if row_p else None)


def _nf4_dequant(dtype: torch.dtype, nested: bool) -> None:
    from .nf4_dequant import dequantize_4bit

    blocks = M * K // 64
    absmax = torch.zeros(blocks, dtype=torch.uint8) if nested else _t(blocks)
    stats = {"absmax2": _t(1), "code2": _t(256), "offset": _t(1)} if nested else {}
    dequantize_4bit(torch.zeros(M * K // 2, dtype=torch.uint8), _t(16), absmax, (M, K), 64, dtype, **stats)


def _qlora_matmul(dtype: torch.dtype, mode: str) -> None:
    from .configs import SMALL_M
    from .qlora_matmul import qlora_matmul

    kind, quant = mode.split("/")
    blocks = N * K // 64
    absmax = torch.zeros(blocks, dtype=torch.uint8) if quant == "nested" else _t(blocks)
    stats = {"absmax2": _t(1), "code2": _t(256), "offset": _t(1)} if quant == "nested" else {}
    weight = (torch.zeros(N * K // 2, dtype=torch.uint8), _t(16), absmax, (N, K), 64)
    rows = SMALL_M // 4 if kind.startswith("decode") else M
    if kind in ("fwd", "decode"):  # y = x Wᵀ + b + s · h Bᵀ
        lora = {"h": _t(rows, RANK), "lora_B": _t(N, RANK, dtype=dtype), "alpha": 2.0}
        qlora_matmul(_t(rows, K, dtype=dtype), *weight, bias=_t(N, dtype=dtype), **lora, **stats)
    else:  # dx = dy W + dh A, W decoded untransposed, A through its transpose view
        lora = {"h": _t(rows, RANK), "lora_B": _t(RANK, K, dtype=dtype).t()}
        if kind.endswith("_dropout"):  # the adapter term gated by the forward's keep bytes
            lora["keep"] = _keep(rows, K)
        qlora_matmul(_t(rows, N, dtype=dtype), *weight, transpose=False, mid_dtype=dtype, **lora, **stats)


@dataclass(frozen=True)
class Variant:
    """A launcher call that makes one kernel variant; `matmul_shaped` marks big tile products."""

    name: str
    make: Callable[[torch.dtype], None]
    matmul_shaped: bool = False
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")


def variants() -> list[Variant]:
    """Every launch the backends make through the launchers of this folder, one Variant per
    constexpr combination and operand layout (forward, backward, dropout, bias, reduce modes)."""
    shrinks = ("fwd", "dropout", "dropout_store", "dropout_keep_in", "bwd_dh")
    out = [Variant(f"lora_shrink/{m}", lambda d, m=m: _lora_shrink(d, m)) for m in shrinks]
    xlora_modes = ("fwd", "fwd_raw", "bwd", "expand_add", "bwd_dx_add")
    out += [Variant(f"xlora/{m}", lambda d, m=m: _xlora(d, m)) for m in xlora_modes]
    for m in ("fwd", "fwd_bias", "bwd_dx_dropout", "add_fwd", "add_bwd_dx_dropout"):
        out.append(Variant(f"lora_expand/{m}", lambda d, m=m: _lora_expand(d, m), matmul_shaped=True))
    out.append(Variant("lora_grad_dy", _lora_grad_dy))
    out += [
        Variant(f"lora_adapter_grad/{m}", lambda d, m=m: _lora_adapter_grad(d, m)) for m in ("dB", "dA", "dA_dropout")
    ]
    for m in ("ff_fwd", "attn_fwd", "attn_fwd_save_z", "ff_bwd", "attn_bwd"):
        out.append(Variant(f"ia3_scale/{m}", lambda d, m=m: _ia3(d, m), matmul_shaped=True))
    for dropout in (False, True):
        tag = "dropout" if dropout else "plain"
        for kind in ("shrink", "expand", "adapter_grad"):
            for seg in (16, 256):
                out.append(
                    Variant(f"sgmv_{kind}/{tag}/seg{seg}", lambda d, k=kind, p=dropout, s=seg: _sgmv(k, d, p, s))
                )
        for kind in ("shrink", "expand"):
            out.append(Variant(f"bgmv_{kind}/{tag}", lambda d, k=kind, p=dropout: _bgmv(k, d, p)))
    for kind, modes in (
        ("shrink", ("fwd", "bwd_dh")),
        ("expand", ("fwd", "bwd_dx")),
        ("factor_grad", ("out_side", "in_side")),
    ):
        for m in modes:
            out.append(
                Variant(f"loha_{kind}/{m}", lambda d, k=kind, m=m: _loha(k, d, m), matmul_shaped=kind == "expand")
            )
    out += [Variant(f"lokr_apply/{m}", lambda d, m=m: _lokr(d, m)) for m in ("fwd", "bwd_dx")]
    for m in ("norm", "fwd", "fwd_bias_dropout", "dx", "dx_dropout"):
        out.append(Variant(f"dora/{m}", lambda d, m=m: _dora(d, m), matmul_shaped=True))
    out.append(Variant("dora/epilogue", lambda d: _dora(d, "epilogue")))
    out.append(Variant("dropout_mask", _dropout_mask, dtypes=("fp32",)))
    for row_p in (False, True):
        out.append(
            Variant("keep_bytes/" + ("row_p" if row_p else "p"), lambda d, r=row_p: _keep_bytes(r), dtypes=("fp32",))
        )
    for nested in (False, True):
        name = "nf4_dequant/" + ("nested" if nested else "plain")
        out.append(Variant(name, lambda d, n=nested: _nf4_dequant(d, n)))
    for kind in ("fwd", "bwd_dx", "bwd_dx_dropout", "decode", "decode_bwd_dx", "decode_bwd_dx_dropout"):
        for quant in ("plain", "nested"):
            mode = f"{kind}/{quant}"
            out.append(Variant(f"qlora_matmul/{mode}", lambda d, m=mode: _qlora_matmul(d, m), matmul_shaped=True))
    return out


def record_all(families: list[str], dtypes: list[str]) -> list[tuple[Variant, str, str, Launch]]:
    """(variant, family, dtype, launch) for every launch the variants make under each family."""
    out = []
    for family in families:
        for v in variants():
            for dt in v.dtypes:
                if dt not in dtypes and v.dtypes != ("fp32",):
                    continue
                with recording(family) as launches:
                    v.make(DTYPES[dt])
                for launch in launches:
                    out.append((v, family, dt, launch))
    return out


# ---- compiling and reading the cubin ----------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_launch(launch: Launch, family: str) -> Any:
    """The Triton CompiledKernel of `launch` for `family`'s GPU (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    src = ASTSource(fn=fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
    return triton.compile(src, target=GPUTarget("cuda", ARCHS[family], 32), options=dict(launch.options))


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)


def read_cubin(cubin: bytes) -> dict[str, int]:
    """registers, stack/local bytes, static shared bytes, HGMMA/HMMA/TMA counts and SASS size."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("nvdisasm"), "-hex", path], capture_output=True, text=True, check=True).stdout
    m = _RES.search(res.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line: {res.stdout[:200]!r}")
    ops = [g[1] for g in _INSTR.findall(sass)]
    return {
        "registers": int(m.group(1)),
        "stack_bytes": int(m.group(2)),
        "local_bytes": int(m.group(4)),
        "hgmma": sum(op.startswith("HGMMA") for op in ops),
        "hmma": sum(op.startswith("HMMA") for op in ops),
        "tma": sum(op.startswith("UTMALDG") for op in ops),
        "sass_instructions": len(ops),
    }


_BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "GROUP_M", "DROPOUT", "HAS_BIAS")


def _audit_one(job: tuple[str, str, str, bool, Launch]) -> Row:
    name, family, dt, matmul_shaped, launch = job
    blocks = {k: launch.constexprs[k] for k in _BLOCK_KEYS if k in launch.constexprs}
    blocks.update(launch.options)
    row = Row(name, launch.kernel, family, dt, matmul_shaped and blocks.get("BLOCK_M", 0) >= 64, blocks)
    try:
        k = compile_launch(launch, family)
        stats = read_cubin(k.asm["cubin"])
    except Exception as e:  # a compile error is a finding, reported per variant
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        return row
    for key, value in stats.items():
        setattr(row, key, value)
    row.shared_bytes = int(k.metadata.shared)
    return row


def _picklable(launch: Launch) -> Launch:
    # triton.language dtypes travel to worker processes as their names.
    import triton.language as tl

    cx = {k: (f"tl.{v.name}" if isinstance(v, tl.dtype) else v) for k, v in launch.constexprs.items()}
    return Launch(launch.module, launch.kernel, launch.signature, cx, launch.attrs, launch.options)


def _unpickle(launch: Launch) -> Launch:
    import triton.language as tl

    cx = {
        k: (tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v) for k, v in launch.constexprs.items()
    }
    return Launch(launch.module, launch.kernel, launch.signature, cx, launch.attrs, launch.options)


def _worker(job: tuple[str, str, str, bool, Launch]) -> Row:
    name, family, dt, matmul_shaped, launch = job
    return _audit_one((name, family, dt, matmul_shaped, _unpickle(launch)))


def audit_triton(families: list[str], dtypes: list[str], jobs: int = 2) -> list[Row]:
    """One Row per recorded launch of every variant, compiled for each family (sm90, sm80)."""
    recorded = record_all(families, dtypes)
    work = [(v.name, fam, dt, v.matmul_shaped, _picklable(launch)) for v, fam, dt, launch in recorded]
    # Variants that specialize to the same compiled kernel are compiled once, reported per variant.
    unique: dict[str, tuple[str, str, str, bool, Launch]] = {}
    for job in work:
        unique.setdefault(_key(job[1], job[4]), job)
    compiled = dict(zip(unique, _map(_worker, list(unique.values()), jobs)))
    rows = []
    for name, fam, dt, matmul_shaped, launch in work:
        first = compiled[_key(fam, launch)]
        big = matmul_shaped and first.blocks.get("BLOCK_M", 0) >= 64
        rows.append(dataclasses.replace(first, variant=name, dtype=dt, matmul_shaped=big))
    return rows


def _key(family: str, launch: Launch) -> str:
    return repr(
        (
            family,
            launch.module,
            launch.kernel,
            sorted(launch.signature.items()),
            sorted((k, repr(v)) for k, v in launch.constexprs.items()),
            sorted(launch.attrs),
            sorted(launch.options.items()),
        )
    )


def _map(fn: Callable[[Any], Row], jobs_list: list[Any], jobs: int) -> list[Row]:
    if jobs <= 1:
        return [fn(j) for j in jobs_list]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, jobs_list))


def check(rows: list[Row]) -> list[str]:
    """What CI refuses, one line per finding: spills, shared memory over the family's limit,
    compile failures, and no HGMMA in a bf16/fp16 matmul-shaped sm_90a variant with >= 64-row tiles."""
    bad = []
    for r in rows:
        where = f"{r.variant} [{r.kernel}] {r.arch} {r.dtype}"
        if r.error is not None:
            bad.append(f"{where}: does not compile: {r.error}")
            continue
        if (r.stack_bytes or 0) > 0 or (r.local_bytes or 0) > 0:
            bad.append(f"{where}: spills ({r.stack_bytes} stack bytes, {r.local_bytes} local bytes)")
        if (r.shared_bytes or 0) > SMEM_LIMIT[r.arch]:
            bad.append(f"{where}: {r.shared_bytes} bytes of shared memory, over {SMEM_LIMIT[r.arch]}")
        if r.arch == "sm90" and r.matmul_shaped and r.dtype != "fp32" and not r.hgmma:
            bad.append(f"{where}: a matmul-shaped variant with {r.blocks.get('BLOCK_M')}-row tiles and no HGMMA")
    return bad


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table."""
    head = (
        f"{'variant':<28} {'arch':<5} {'dt':<5} {'regs':>4} {'spill':>5} {'smem':>7} "
        f"{'HGMMA':>5} {'HMMA':>5} {'SASS':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error is not None:
            lines.append(f"{r.variant:<28} {r.arch:<5} {r.dtype:<5} compile error: {r.error[:60]}")
            continue
        spill = (r.stack_bytes or 0) + (r.local_bytes or 0)
        lines.append(
            f"{r.variant:<28} {r.arch:<5} {r.dtype:<5} {r.registers:>4} {spill:>5} {r.shared_bytes:>7} "
            f"{r.hgmma:>5} {r.hmma:>5} {r.sass_instructions:>6}"
        )
    return "\n".join(lines)


def as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    """JSON-ready rows (constexpr dtypes as strings)."""
    out = []
    for r in rows:
        d = asdict(r)
        d["blocks"] = {
            k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in r.blocks.items()
        }
        out.append(d)
    return out


def main(argv: list[str] | None = None) -> int:
    """`peft-fast audit`: compile every variant for the chosen architectures, print the table, write
    JSON; with --check, exit 1 when `check` finds anything (CI)."""
    import argparse
    import json
    import sys
    import time

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, stated to silence its warning
    parser = argparse.ArgumentParser(prog="peft-fast audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="repeatable (default: sm90 and sm80)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable (default: all three)")
    parser.add_argument("--jobs", type=int, default=2, help="compiles at once (default: %(default)s)")
    parser.add_argument("--json", help="write the rows (and the roofline model) as JSON to this path")
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill, shared memory over the limit, "
                        "a compile failure or a large bf16/fp16 product without HGMMA on sm_90a")  # fmt: skip
    args = parser.parse_args(argv)
    families = args.arch or ["sm90", "sm80"]
    dtypes = args.dtype or list(DTYPES)
    start = time.perf_counter()
    rows = audit_triton(families, dtypes, jobs=args.jobs)
    print(table(rows))
    findings = check(rows)
    print(f"\n{len(rows)} variants compiled for {', '.join(families)} in {time.perf_counter() - start:.0f} s")
    if args.json:
        import triton

        from . import roofline

        record = {
            "kind": "static prediction: compiled for a GPU that is not there; times are a roofline model",
            "triton": triton.__version__,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "peft-fast audit " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rows": as_dicts(rows),
            "findings": findings,
            "roofline": [roofline.predict(*s, gpu=gpu) for s in roofline.BENCH_SHAPES for gpu in (roofline.H100,)],
            "dropout_cost": [roofline.dropout_cost(m, k) for m, k, _, _ in roofline.BENCH_SHAPES],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    for line in findings:
        print("FINDING:", line)
    return 1 if (args.check and findings) else 0


if __name__ == "__main__":
    raise SystemExit(main())
