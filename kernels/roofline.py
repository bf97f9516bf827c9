"""A roofline model of one LoRA linear layer's training step: what each implementation must move and
compute, and the time that implies at a GPU's peaks. A MODEL, not a measurement: it ignores launch
gaps beyond a fixed per-kernel cost, cache reuse and overlap; the first GPU round checks it.

Each implementation is a list of kernels; a kernel takes max(FLOPs / peak FLOP/s, bytes / peak
bandwidth, Philox evaluations / Philox rate) + a fixed launch cost. Shapes: x is M × K (tokens ×
in features), W is N × K, the adapter has rank r; activations and weights are `b` bytes per
element, LoRA's h is fp32.

* "linear":    the bare frozen linear, forward y = x Wᵀ and backward dx = dy W (W frozen: no dW).
* "hf_peft":   HF peft's unfused sequence: base, dropout (torch keeps a copy of the dropped x and a
               one-byte mask), shrink, expand, scale, add; backward the same in reverse, plus the
               add of the two dx terms.
* "fused":     peft_fast's fully fused Triton path: shrink with dropout drawn from a seed (its
               keep bytes stored, 1 bit per element), the expand fused into the base matmul as
               extra K steps, and in backward dh, dB, dA and dx = dy W + mask ⊙ (dh A)/(1-p) with
               the adapter term fused into the matmul, the mask read from the keep bytes.
* "composite": cuBLAS for the base products, a Triton shrink over x (dropout drawn, keep bytes
               stored), the expand added into the base output in place; backward dh and dB from one
               pass over dy, dx = dy W on cuBLAS with the adapter term added in place, dA with the
               mask read from the keep bytes. "auto"'s default on CUDA until measured.

`dropout_cost` compares the ways to give backward the forward's mask (kernels/dropout.py's
choice): Philox evaluations and extra bytes per training step, and the time they imply.
"""

from __future__ import annotations

from dataclasses import dataclass

# Measured on this project's H100 environment (../shared/GPU.md): bf16 tensor-core products and
# device-to-device copy bandwidth (reads + writes). The H200 has the same compute, ~4.3 TB/s.
# Philox-4x32-10 evaluations per second: an estimate (about 40 32-bit multiplies per evaluation on
# the integer pipes, the rate the 0.1-0.15 ms per 100 M evaluations implies), unmeasured.
H100 = {"name": "H100 (model)", "flops": 790e12, "bytes_per_s": 3.0e12, "launch_s": 3e-6, "philox_per_s": 1e12}
H200 = {"name": "H200 (model)", "flops": 790e12, "bytes_per_s": 4.3e12, "launch_s": 3e-6, "philox_per_s": 1e12}


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float
    philox: float = 0.0  # Philox-4x32-10 evaluations


def kernel_seconds(k: Kernel, gpu: dict) -> float:
    """The roofline time of one kernel: its slowest roof plus the launch cost (a `gpu` without a
    Philox rate takes the H100 model's estimate)."""
    philox = k.philox / gpu.get("philox_per_s", H100["philox_per_s"])
    return max(k.flops / gpu["flops"], k.bytes / gpu["bytes_per_s"], philox) + gpu["launch_s"]


def _mm(name: str, m: int, n: int, k: int, b_in: float, b_out: float) -> Kernel:
    """An (m × k) · (k × n) product reading both operands once and writing m × n."""
    return Kernel(name, 2.0 * m * n * k, b_in * (m * k + k * n) + b_out * m * n)


def _elementwise(name: str, elems: int, bytes_per_elem: float) -> Kernel:
    return Kernel(name, float(elems), elems * bytes_per_elem)


def step_kernels(impl: str, M: int, K: int, N: int, r: int, b: int = 2, dropout: bool = True) -> list[Kernel]:
    """The kernels of one forward + backward of a LoRA layer (x needs grad, W frozen) under `impl`."""
    h = 4  # fp32 h / dh
    # Dropout (kernels/dropout.py): one Philox evaluation per 8 elements of x in the forward shrink,
    # which writes the keep bytes (M·K/8); backward's dx and dA read them instead of drawing again.
    draws = M * K / 8 if dropout else 0.0
    kb = M * K / 8 if dropout else 0.0
    if impl == "linear":
        return [_mm("fwd x·Wᵀ", M, N, K, b, b), _mm("bwd dy·W", M, K, N, b, b)]
    if impl == "hf_peft":
        ks = [_mm("fwd base", M, N, K, b, b)]
        if dropout:
            ks.append(_elementwise("fwd dropout (x' and mask)", M * K, 2 * b + 1))
        ks += [
            _mm("fwd shrink", M, r, K, b, b),
            _mm("fwd expand", M, N, r, b, b),
            _elementwise("fwd scale", M * N, 2 * b),
            _elementwise("fwd add", M * N, 3 * b),
            _elementwise("bwd scale", M * N, 2 * b),
            _mm("bwd dh = dy·B", M, r, N, b, b),
            _mm("bwd dB = dyᵀ·h", N, r, M, b, b),
            _mm("bwd dx' = dh·A", M, K, r, b, b),
            _mm("bwd dA = dhᵀ·x'", r, K, M, b, b),
        ]
        if dropout:
            ks.append(_elementwise("bwd dropout mask", M * K, 2 * b + 1))
        ks += [_mm("bwd base dy·W", M, K, N, b, b), _elementwise("bwd dx add", M * K, 3 * b)]
        return ks
    if impl == "fused":
        return [
            Kernel("fwd lora_shrink", 2.0 * M * K * r, b * (M * K + r * K) + h * M * r + kb, draws),
            Kernel(
                "fwd lora_expand (base + expand)",
                2.0 * M * N * (K + r),
                b * (M * K + N * K + M * N + N * r) + h * M * r,
            ),
            Kernel("bwd dh lora_shrink", 2.0 * M * N * r, b * (M * N + N * r) + h * M * r),
            Kernel("bwd dB lora_adapter_grad", 2.0 * M * N * r, b * (M * N + N * r) + h * M * r),
            Kernel("bwd dA lora_adapter_grad", 2.0 * M * K * r, b * (M * K + r * K) + h * M * r + kb),
            Kernel("bwd dx lora_expand", 2.0 * M * K * (N + r), b * (M * N + N * K + M * K + r * K) + h * M * r + kb),
        ]
    if impl == "composite":
        return [
            _mm("fwd cuBLAS base", M, N, K, b, b),
            Kernel("fwd shrink (Triton)", 2.0 * M * K * r, b * (M * K + r * K) + h * M * r + kb, draws),
            Kernel("fwd expand added in place", 2.0 * M * N * r, 2 * b * M * N + h * M * r + b * N * r),
            # dB's fp32 partial tiles are atomically added in L2 (N·r·4 bytes per row block there)
            Kernel("bwd dh + dB (one pass over dy)", 4.0 * M * N * r, b * (M * N + 2 * N * r) + 2 * h * M * r),
            _mm("bwd cuBLAS dy·W", M, K, N, b, b),
            Kernel("bwd dx += mask ⊙ dh·A in place", 2.0 * M * K * r, 2 * b * M * K + h * M * r + b * r * K + kb),
            Kernel("bwd dA (mask)", 2.0 * M * K * r, b * (M * K + r * K) + h * M * r + kb),
        ]
    raise ValueError(f"impl must be one of linear, hf_peft, fused, composite; got {impl!r}")


IMPLS = ("linear", "hf_peft", "fused", "composite")


def predict(M: int, K: int, N: int, r: int, gpu: dict | None = None, b: int = 2, dropout: bool = True) -> dict:
    """Predicted seconds per implementation, and ratios over the bare linear and over HF peft."""
    gpu = gpu or H100
    times = {}
    for impl in IMPLS:
        ks = step_kernels(impl, M, K, N, r, b, dropout)
        times[impl] = sum(kernel_seconds(k, gpu) for k in ks)
    return {
        "gpu": gpu["name"],
        "shape": {"M": M, "K": K, "N": N, "r": r, "bytes_per_elem": b, "dropout": dropout},
        "seconds": times,
        "over_linear": {k: v / times["linear"] for k, v in times.items()},
        "over_hf_peft": {k: v / times["hf_peft"] for k, v in times.items()},
    }


# The benchmark shapes the kernel issues name (Llama-7B/8B projections).
BENCH_SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16), (16, 4096, 4096, 16)]


# How backward gets the forward's dropout mask: (Philox evaluations per element of x per step, bytes
# per element of x written + read for a stored mask, the p resolution).
DROPOUT_SCHEMES = {
    "per_element_tl_rand_x3": (3.0, 0.0, "fp32 uniform"),
    "16bit_regenerated_x3": (3 / 8, 0.0, "1/65536"),
    "8bit_regenerated_x3": (3 / 16, 0.0, "1/256"),
    "keep_bytes": (1 / 8, 3 / 8, "1/65536"),
}


def dropout_cost(M: int, K: int, gpu: dict | None = None) -> dict:
    """Per scheme, for an M × K x: Philox evaluations per step and per element, the bytes a stored
    mask adds (written once, read by dx and dA), and the seconds each costs at `gpu`'s rates, as a
    separate pass would (an upper bound when it overlaps a kernel's other work)."""
    gpu = gpu or H100
    out = {}
    for name, (per_elem, mask_bytes, p_step) in DROPOUT_SCHEMES.items():
        evals, extra = per_elem * M * K, mask_bytes * M * K
        out[name] = {
            "philox_per_element": per_elem,
            "philox_evaluations": evals,
            "mask_bytes": extra,
            "p_resolution": p_step,
            "seconds": evals / gpu["philox_per_s"] + extra / gpu["bytes_per_s"],
        }
    return {"gpu": gpu["name"], "shape": {"M": M, "K": K}, "schemes": out, "chosen": "keep_bytes"}
