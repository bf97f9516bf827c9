"""Kernel numerics at the edges of the low-precision range (issue 17): the LoRA scaling is applied
in fp32 after the adapter product, so fp16 adapters with a large scaling stay finite wherever the
float64 reference is finite and fits the dtype; and bf16 never reaches Triton's interpreter, whose
bf16 tl.dot is wrong (it falls back to the torch path and says so once)."""

from __future__ import annotations

import logging

import pytest
import torch
from kernel_testing import BACKENDS, DEVICE, rel_err, require_backend

import peft_fast
from peft_fast.ops import dispatch, reference


@pytest.fixture(params=BACKENDS)
def backend(request):
    return require_backend(request.param)


def _large_scaling_case(dtype: torch.dtype):
    """x·Aᵀ ≈ 576 in every entry and scaling 128: s·h ≈ 73 728 overflows fp16 (max 65 504), while
    the output (B small, mixed signs) stays within a few hundred."""
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 8, 16, 64, 4
    x = 12.0 + 0.1 * torch.randn(M, K, generator=g, dtype=torch.float64)
    A = 3.0 + 0.01 * torch.randn(r, K, generator=g, dtype=torch.float64)
    B = 1e-3 * torch.randn(N, r, generator=g, dtype=torch.float64)
    W = 0.1 * torch.randn(N, K, generator=g, dtype=torch.float64)
    return [t.to(device=DEVICE, dtype=dtype) for t in (x, W, A, B)]


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_large_scaling_stays_finite_and_accurate(backend, dtype):
    x, W, A, B = _large_scaling_case(dtype)
    s = 128.0
    want = reference.lora_linear(*(t.double() for t in (x, W)), None, A.double(), B.double(), s, 0.0, False)
    assert want.abs().max() < 1000 and (s * x.double() @ A.double().t()).abs().max() > 65504  # the edge case
    with peft_fast.use_backend(backend):
        got = peft_fast.ops.lora_linear(x, W, None, A, B, s, 0.0, False)
    assert torch.isfinite(got).all()
    # fp16 inputs rounded alike on both sides: the error is the product's rounding (2^-11 relative)
    assert rel_err(got, want) < 5e-3
    # the mixed-batch kernels scale after the product too
    with peft_fast.use_backend(backend):
        mixed = peft_fast.ops.lora_linear_mixed(
            x, W, None, [A], [B], [s], [0.0], torch.zeros(8, dtype=torch.long), False
        )
    assert torch.isfinite(mixed).all() and rel_err(mixed, want) < 5e-3


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU interpreter's bf16 fallback")
def test_bf16_never_reaches_the_interpreter(caplog, monkeypatch):
    if dispatch.unavailable_reason("triton") is not None:
        pytest.skip(f"triton backend unavailable: {dispatch.unavailable_reason('triton')}")
    monkeypatch.setattr(dispatch, "_warned", set())  # "once" counts from here
    x, W, A, B = _large_scaling_case(torch.float32)
    x, W, A, B = (t / 8 for t in (x, W, A, B))
    args = [t.to(torch.bfloat16) for t in (x, W)] + [None] + [t.to(torch.bfloat16) for t in (A, B)] + [2.0, 0.0, False]
    with peft_fast.use_backend("triton"), caplog.at_level(logging.DEBUG, logger="peft_fast.dispatch"):
        fn = dispatch.select("lora_linear", *args)
        got = peft_fast.ops.lora_linear(*args)
        peft_fast.ops.lora_linear(*args)
    assert fn is reference.lora_linear  # the torch path, not the interpreter
    assert torch.equal(got, reference.lora_linear(*args))
    said = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(said) == 1 and "torch path" in said[0]  # said once, at debug level
    # fp16 still runs on the interpreter
    half = [t.to(torch.float16) if isinstance(t, torch.Tensor) else t for t in args]
    with peft_fast.use_backend("triton"):
        assert dispatch.select("lora_linear", *half) is not reference.lora_linear
