"""QLoRA per layer on a GPU (`--suite qlora` on CUDA): one LoRA layer (r=16) over a 4-bit NF4
weight with double quantization, three ways, in the same run:

  fused      peft_fast's fused 4-bit matmul: `ops.lora_linear_4bit` under `set_backend("triton")`
             (the 4-bit tiles decoded inside the matmul's K loop, the LoRA expand in its epilogue)
  hf_bnb     HF peft's LoRA layer around bitsandbytes' `Linear4bit`: bitsandbytes dequantizes the
             whole weight, cuBLAS multiplies, then HF peft adds the LoRA term
  composite  Unsloth-style: bitsandbytes' dequantizer, one cuBLAS matmul, `addmm_` for the LoRA
             term, the weight dequantized again in backward (an autograd Function below)

at 4096→4096, 4096→14336 and 14336→4096, M ∈ {1, 16, 512, 8192} tokens, bf16 activations, fp32
adapters (HF peft's default on a 4-bit base). Phases: "fwd" is inference (a forward under
`torch.no_grad`, what decoding runs), "fwd_bwd" a training forward + backward (gradients of x,
A and B). Times come from bench/timing.py (CUDA events, `triton.testing.do_bench` medians).
bitsandbytes' `Linear4bit` alone (no adapter) is timed in the inference phase too: `base_fwd_ms`.

Memory, per case, over one fwd+bwd pass (CUDA only): `peak_mib` is
`torch.cuda.max_memory_allocated()` during the pass minus the layer's weights (packed codes,
statistics, adapters); `extra_mib` is what the pass needed beyond what it holds before and after
(weights, x, dy, the output and the gradients), i.e. its transient buffers (bitsandbytes' full
dequantized weight, for one). The issue's targets, read against hf_bnb in the same run:
fwd+bwd ≥ 1.3x faster at M = 8192 (each shape), decode (fwd, M = 1) ≥ 2x faster at 4096→14336,
and peak extra memory < 10% of the layer's bf16 weight.

The "tiny" preset is a harness check on CPU: tiny shapes, fp32, the fused kernels under
Triton's interpreter (TRITON_INTERPRET=1), no memory columns; its times are not a measurement
and the record says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .timing import median_times_ms

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (in_features K, out_features N)
TOKENS = (1, 16, 512, 8192)
RANK, ALPHA = 16, 32
VARIANTS = ("fused", "hf_bnb", "composite")
PRESETS = {
    "full": {"cases": tuple((k, n, m) for k, n in SHAPES for m in TOKENS), "dtype": torch.bfloat16, "rounds": None},
    # the targets' cases (every shape at M = 1 and 8192) and 4096→14336 at every M: 8 of the 12
    "quick": {
        "cases": tuple((k, n, m) for k, n in SHAPES for m in (1, 8192)) + ((4096, 14336, 16), (4096, 14336, 512)),
        "dtype": torch.bfloat16,
        "rounds": None,
    },
    # CPU harness check, one case (the tiled path; the split-K one costs as much again under the interpreter)
    "tiny": {"cases": ((64, 96, 20),), "dtype": torch.float32, "rounds": 1},
}
TARGETS = {"fwd_bwd_speedup_at_8192": 1.3, "decode_speedup_4096x14336": 2.0, "extra_vs_bf16_weight": 0.10}
YLABEL = "HF peft + bitsandbytes fwd+bwd time / the variant's (higher is better)"
HARNESS_ONLY = "CPU harness check (tiny shapes, Triton's interpreter): no timing or memory is claimed"


@dataclass
class LayerRow:
    """One variant at one (K, N, M): median times, speedups over hf_bnb, memory, agreement."""

    K: int
    N: int
    M: int
    r: int
    dtype: str
    variant: str
    fwd_ms: float
    fwd_bwd_ms: float
    fwd_speedup: float  # hf_bnb's time / this variant's (higher is better)
    base_fwd_ms: float  # bitsandbytes' Linear4bit alone, inference forward (no adapter): the case's reference
    fwd_bwd_speedup: float
    peak_mib: float  # max_memory_allocated over fwd+bwd minus the layer's weights (CUDA)
    extra_mib: float  # the pass's transient memory beyond what it holds before and after (CUDA)
    extra_vs_bf16_weight: float  # extra_mib over the layer's bf16 weight size
    rel_err_vs_hf: float  # ||y - y_hf|| / ||y_hf|| of the training forward


class _ComposedLora4bit(torch.autograd.Function):
    """Unsloth's composition: `y = x deq(W)ᵀ; y.addmm_(x Aᵀ, Bᵀ, alpha=s)`; backward dequantizes
    W again for dx (no full-precision copy kept between the passes)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, dequantize, scaling):
        a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
        w = dequantize()
        y = x @ w.t()
        del w
        y.addmm_(x @ a.t(), b.t(), alpha=scaling)
        ctx.save_for_backward(x, a, b)
        ctx.dequantize, ctx.scaling, ctx.adapter_dtype = dequantize, scaling, lora_A.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, b = ctx.saved_tensors
        s = ctx.scaling
        dyb = dy @ b  # (M, r)
        d_a = (dyb.t() @ x).mul_(s).to(ctx.adapter_dtype)
        d_b = (dy.t() @ (x @ a.t())).mul_(s).to(ctx.adapter_dtype)
        w = ctx.dequantize()
        dx = dy @ w
        del w
        dx.addmm_(dyb, a, alpha=s)
        return dx, d_a, d_b, None, None


def _layer(k: int, n: int, dtype: torch.dtype, device: torch.device):
    """HF peft's LoRA layer (r=16, B random so the adapter term counts) over a fresh bitsandbytes
    Linear4bit (NF4, double quantization) computing in `dtype`."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as HFLoraLinear4bit

    weight = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    base = base.to(device)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=False)
    layer = HFLoraLinear4bit(base, "default", config, r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    return layer.to(device)


def _weight_bytes(layer: torch.nn.Module) -> int:
    qs = layer.base_layer.weight.quant_state
    tensors = [layer.base_layer.weight.data, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    tensors += [p for p in layer.parameters() if p.requires_grad]
    return sum(t.numel() * t.element_size() for t in tensors)


def _variants(layer: torch.nn.Module, x: torch.Tensor) -> dict:
    """name -> callable(x) -> y for the three variants of one layer."""
    import bitsandbytes.functional as bnb_f

    from peft_fast import ops
    from peft_fast.ops import dispatch
    from peft_fast.quant.bnb import state_of

    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    state = state_of(base)
    dtype = base.compute_dtype
    chosen = dispatch.select("lora_linear_4bit", x, state, None, A, B, s, 0.0, True, dtype)
    if ".triton" not in chosen.__module__:
        raise RuntimeError(f"the fused variant would run {chosen.__module__}.{chosen.__name__}, not the Triton kernel")

    def dequantize() -> torch.Tensor:
        return bnb_f.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)

    return {
        "fused": lambda x: ops.lora_linear_4bit(x, state, None, A, B, s, 0.0, True, dtype),
        "hf_bnb": layer,
        "composite": lambda x: _ComposedLora4bit.apply(x, A, B, dequantize, s),
    }


def _transient_mib(fn, dy: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor], weights: int):
    """(peak minus weights, transient) MiB of one fwd+bwd of `fn` on CUDA."""
    for t in params:
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = fn(x)
    y.backward(dy)
    torch.cuda.synchronize()
    peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    del y
    return (peak - weights) / 2**20, (peak - max(before, after)) / 2**20


def run_case(k: int, n: int, m: int, dtype: torch.dtype, device: torch.device, rounds: int | None) -> list[LayerRow]:
    """The three variants at one (K, N, M), timed in the same run; one row per variant."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    layer = _layer(k, n, dtype, device)
    x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(m, n, dtype=dtype, device=device)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    fns = _variants(layer, x)
    timing = {} if rounds is None else {"rounds": rounds}

    x_inference = x.detach()  # no grad anywhere: bitsandbytes takes its inference kernel (gemv at M = 1)

    def inference(f):
        def go():
            with torch.no_grad():
                return f(x_inference)

        return go

    inference_fns = {v: inference(f) for v, f in fns.items()}
    inference_fns["bnb_base"] = inference(layer.base_layer)
    fwd = median_times_ms(inference_fns, cuda=cuda, **timing)
    both = median_times_ms(
        {v: (lambda f=f: f(x).backward(dy)) for v, f in fns.items()},
        cuda=cuda,
        grads={v: params for v in fns},
        **timing,
    )
    y_hf = fns["hf_bnb"](x).detach().float()
    weights = _weight_bytes(layer)
    bf16_weight = n * k * 2
    rows = []
    for v, f in fns.items():
        err = ((f(x).detach().float() - y_hf).norm() / y_hf.norm()).item()
        peak = extra = math.nan
        if cuda:
            peak, extra = _transient_mib(f, dy, x, params, weights)
        rows.append(
            LayerRow(
                K=k, N=n, M=m, r=RANK, dtype=str(dtype).removeprefix("torch."), variant=v,
                fwd_ms=fwd[v], fwd_bwd_ms=both[v], fwd_speedup=fwd["hf_bnb"] / fwd[v], base_fwd_ms=fwd["bnb_base"],
                fwd_bwd_speedup=both["hf_bnb"] / both[v], peak_mib=peak, extra_mib=extra,
                extra_vs_bf16_weight=extra * 2**20 / bf16_weight, rel_err_vs_hf=err,
            )
        )  # fmt: skip
    return rows


def targets(rows: list[LayerRow]) -> dict[str, dict]:
    """The issue's three GPU targets, read on the fused rows against hf_bnb in the same run (a
    target whose case is not in `rows` is absent)."""
    fused = [r for r in rows if r.variant == "fused"]
    out: dict[str, dict] = {}
    big = {f"{r.K}x{r.N}": r.fwd_bwd_speedup for r in fused if r.M == 8192}
    if big:
        goal = TARGETS["fwd_bwd_speedup_at_8192"]
        out["fwd_bwd_at_8192"] = {"speedup_vs_hf_bnb": big, "target": goal, "met": min(big.values()) >= goal}
    decode = [r for r in fused if (r.K, r.N, r.M) == (4096, 14336, 1)]
    if decode:
        goal, r = TARGETS["decode_speedup_4096x14336"], decode[0]
        out["decode_4096x14336"] = {
            "speedup_vs_hf_bnb": r.fwd_speedup,
            "target": goal,
            "met": r.fwd_speedup >= goal,
            "speedup_vs_bnb_base_alone": r.base_fwd_ms / r.fwd_ms,  # stricter: bitsandbytes without an adapter
        }
    extra = {f"{r.K}x{r.N} M={r.M}": r.extra_vs_bf16_weight for r in fused}
    if fused and not any(math.isnan(v) for v in extra.values()):
        goal = TARGETS["extra_vs_bf16_weight"]
        out["extra_memory"] = {"vs_bf16_weight": extra, "target": goal, "met": max(extra.values()) < goal}
    return out


def run(preset: dict, device: torch.device) -> tuple[list[LayerRow], dict]:
    """Every case of `preset` on `device` (CUDA; CPU only with the tiny preset and Triton's
    interpreter): (rows, facts for the record)."""
    from peft_fast.ops import dispatch

    if device.type != "cuda" and preset is not PRESETS["tiny"]:
        raise ValueError(f"the qlora layer benchmark runs on CUDA (CPU: the tiny preset only), got device {device}")
    if device.type == "cpu" and not dispatch.interpreter_enabled():
        raise RuntimeError("the qlora layer harness check on CPU runs the fused kernels under TRITON_INTERPRET=1")
    rows: list[LayerRow] = []
    with dispatch.use_backend("triton"):
        for k, n, m in preset["cases"]:
            case = run_case(k, n, m, preset["dtype"], device, preset["rounds"])
            rows += case
            print(
                f"{k}->{n} M={m}: "
                + "  ".join(f"{r.variant} {r.fwd_ms:.3f}/{r.fwd_bwd_ms:.3f} ms" for r in case)
                + "  (fwd/fwd+bwd)",
                flush=True,
            )
    extra = {
        "cases": [list(c) for c in preset["cases"]],
        "variants": {
            "fused": "ops.lora_linear_4bit under set_backend('triton') (kernels/qlora_matmul.py)",
            "hf_bnb": "HF peft's lora.bnb.Linear4bit over bitsandbytes' Linear4bit (dequantize + cuBLAS)",
            "composite": "Unsloth-style: bitsandbytes' dequantize_4bit + cuBLAS matmul + addmm_ (autograd Function)",
        },
        "quantization": "bitsandbytes NF4, blocksize 64, double quantization; adapters fp32, r=16, alpha=32",
        "phases": "fwd: inference forward (no_grad, x without grad); fwd_bwd: forward + backward (grads of x, A, B); "
        "base_fwd_ms: bitsandbytes' Linear4bit alone, inference forward",
        "memory": "CUDA only: peak_mib = max_memory_allocated over one fwd+bwd minus the layer's weights; "
        "extra_mib = that peak minus the larger of the allocation before and after the pass (transients)",
        "targets": targets(rows),
    }
    if device.type != "cuda":
        extra["harness_only"] = HARNESS_ONLY
    return rows, extra


def table(rows: list[LayerRow]) -> str:
    """A printable table of `rows`."""
    head = (
        f"{'K->N':<12} {'M':>5} {'variant':<10} {'fwd ms':>9} {'x hf':>6} {'fwd+bwd ms':>11} {'x hf':>6} "
        f"{'peak MiB':>9} {'extra MiB':>9} {'extra/W':>8} {'err vs hf':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{f'{r.K}->{r.N}':<12} {r.M:>5} {r.variant:<10} {r.fwd_ms:>9.3f} {r.fwd_speedup:>6.2f} "
            f"{r.fwd_bwd_ms:>11.3f} {r.fwd_bwd_speedup:>6.2f} {r.peak_mib:>9.1f} {r.extra_mib:>9.1f} "
            f"{r.extra_vs_bf16_weight:>8.3f} {r.rel_err_vs_hf:>9.1e}"
        )
    return "\n".join(lines)


def target_lines(found: dict[str, dict]) -> list[str]:
    """One printable line per target in `targets(...)`'s output."""
    lines = []
    for name, t in found.items():
        value = t.get("speedup_vs_hf_bnb", t.get("vs_bf16_weight"))
        lines.append(f"target {name}: {value} (target {t['target']}): {'met' if t['met'] else 'MISSED'}")
    return lines


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """hf_bnb's fwd+bwd time over each variant's, per case (for the plot)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(f"{r['K']}->{r['N']} M={r['M']}", {})[r["variant"]] = r["fwd_bwd_speedup"]
    return out
