"""pytest-benchmark suite for the LoRA and IA³ ops, one benchmark per (op, backend, phase).

    pytest bench/bench_lora.py --benchmark-only            # GPU: bf16, Llama-like shapes
    TRITON_INTERPRET=1 pytest bench/bench_lora.py ...       # CPU: tiny shapes, harness check

Every case also times the bare frozen `F.linear` of the same shape so results read as
ratios. `peft-fast bench` (bench/lora.py, bench/ia3.py) is the full sweep with CUDA-event medians,
peak memory and HF peft side by side; this file is for quick A/B runs of one op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peft_fast
from peft_fast.ops import dispatch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (M, K, N, r): tokens, in, out, rank
SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16)] if CUDA else [(64, 64, 96, 8)]
BACKENDS = ["torch"] + (["triton"] if dispatch.unavailable_reason("triton") is None else [])


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _inputs(M, K, N, r):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(DEVICE, DTYPE).requires_grad_()
    W = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, DTYPE)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(DEVICE, DTYPE).requires_grad_()
    B = torch.randn(N, r, generator=g).to(DEVICE, DTYPE).requires_grad_()
    l_out = (1 + 0.1 * torch.randn(N, 1, generator=g)).to(DEVICE, DTYPE).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(DEVICE, DTYPE)
    return x, W, A, B, l_out, dy


def _bench(benchmark, fn):
    def run():
        out = fn()
        _sync()
        return out

    benchmark.pedantic(run, rounds=20 if CUDA else 3, warmup_rounds=3 if CUDA else 1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
@pytest.mark.parametrize("phase", ["fwd", "fwd_bwd"])
def test_linear_baseline(benchmark, shape, phase):
    x, W, _, _, _, dy = _inputs(*shape)
    benchmark.group = f"{phase} {shape}"
    _bench(benchmark, (lambda: F.linear(x, W)) if phase == "fwd" else (lambda: F.linear(x, W).backward(dy)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
@pytest.mark.parametrize("phase", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linear(benchmark, shape, phase, backend, dropout):
    x, W, A, B, _, dy = _inputs(*shape)
    benchmark.group = f"{phase} {shape}"

    def fwd():
        with peft_fast.use_backend(backend):
            return peft_fast.ops.lora_linear(x, W, None, A, B, 2.0, dropout, True)

    _bench(benchmark, fwd if phase == "fwd" else (lambda: fwd().backward(dy)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s[:3]))
@pytest.mark.parametrize("phase", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ia3_linear(benchmark, shape, phase, backend):
    x, W, _, _, l_out, dy = _inputs(*shape)
    benchmark.group = f"{phase} {shape}"

    def fwd():
        with peft_fast.use_backend(backend):
            return peft_fast.ops.ia3_linear(x, W, None, l_out, False)

    _bench(benchmark, fwd if phase == "fwd" else (lambda: fwd().backward(dy)))
