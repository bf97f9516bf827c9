"""peft_fast/ops/qlora.py: the 4-bit reference path (dequantize, F.linear, LoRA / IA³) against
a float64 oracle, and the Triton dequantizer (kernels/nf4_dequant.py, under the interpreter on
CPU) bit for bit against bitsandbytes and the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, leaf, rel_err, require_triton

import peft_fast
from peft_fast import ops
from peft_fast.quant.formats import QuantState4bit, dequantize_4bit, quantize_4bit


def _state(shape, quant_type="nf4", nested=True, blocksize=64, storage=torch.uint8, seed=0) -> QuantState4bit:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.2
    state = quantize_4bit(w, blocksize, quant_type, nested, storage)
    for name in ("packed", "absmax", "offset", "absmax2", "code2"):
        t = getattr(state, name)
        if t is not None:
            setattr(state, name, t.to(DEVICE))
    return state


# -- the Triton dequantizer -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 33), (33, 100), (100, 37), (64, 256), (40, 700)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_triton_dequantize_is_bit_identical(shape, quant_type, nested):
    """Odd sizes, partial last blocks (of 64 and of 256 absmax values), every output dtype."""
    require_triton()
    state = _state(shape, quant_type, nested, seed=sum(shape))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        want = dequantize_4bit(state, dtype)
        with peft_fast.use_backend("triton"):
            got = ops.dequantize_4bit(state, dtype)
        assert got.dtype == dtype and torch.equal(got, want), dtype


def test_triton_dequantize_matches_bitsandbytes():
    require_triton()
    BF = pytest.importorskip("bitsandbytes.functional")
    torch.compiler.set_stance("force_eager")  # bitsandbytes compiles its CPU fallback per shape (slow)
    try:
        _compare_with_bitsandbytes(BF)
    finally:
        torch.compiler.set_stance("default")


def _compare_with_bitsandbytes(BF):
    for shape, quant_type, nested, storage in [
        ((7, 33), "nf4", True, torch.uint8),
        ((100, 37), "fp4", True, torch.uint8),
        ((40, 300), "fp4", False, torch.bfloat16),
        ((17, 128), "nf4", False, torch.float32),
    ]:
        w = torch.randn(shape)
        packed, qs = BF.quantize_4bit(
            w, blocksize=64, quant_type=quant_type, compress_statistics=nested, quant_storage=storage
        )
        s2 = qs.state2 if nested else None
        state = QuantState4bit(
            packed.to(DEVICE),
            qs.absmax.to(DEVICE),
            tuple(qs.shape),
            qs.dtype,
            64,
            quant_type,
            offset=qs.offset.to(DEVICE) if nested else None,
            absmax2=s2.absmax.to(DEVICE) if nested else None,
            code2=s2.code.to(DEVICE) if nested else None,
        )
        with peft_fast.use_backend("triton"):
            got = ops.dequantize_4bit(state)
        assert torch.equal(got.cpu(), BF.dequantize_4bit(packed, qs)), (shape, quant_type, nested, storage)


def test_triton_dequantize_quant_storage():
    require_triton()
    state = _state((9, 72), storage=torch.bfloat16)
    with peft_fast.use_backend("triton"):
        got = ops.dequantize_4bit(state)
    assert torch.equal(got, dequantize_4bit(state))


# -- the reference path ---------------------------------------------------------------------


def _oracle_linear(x, state, bias, A=None, B=None, scaling=0.0):
    """float64: x Wᵀ + b + scaling · x Aᵀ Bᵀ with W dequantized exactly (fp32 values are exact in fp64)."""
    W = dequantize_4bit(state, torch.float32).double()
    y = x.double() @ W.T
    if bias is not None:
        y = y + bias.double()
    if A is not None:
        y = y + scaling * (x.double() @ A.double().T) @ B.double().T
    return y


@pytest.mark.parametrize("M,K,N,r", [(1, 7, 33, 1), (33, 100, 7, 4), (16, 64, 130, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_4bit_matches_fp64(M, K, N, r, bias):
    state = _state((N, K), "nf4", True, seed=M)
    x = torch.randn(2, M, K, dtype=torch.float64, device=DEVICE)
    A = torch.randn(r, K, dtype=torch.float64, device=DEVICE)
    B = torch.randn(N, r, dtype=torch.float64, device=DEVICE)
    b = torch.randn(N, dtype=torch.float64, device=DEVICE) if bias else None
    dy = torch.randn(2, M, N, dtype=torch.float64, device=DEVICE)

    x32, A32, B32 = leaf(x, torch.float32), leaf(A, torch.float32), leaf(B, torch.float32)
    y = ops.lora_linear_4bit(x32, state, None if b is None else b.float(), A32, B32, 0.5, 0.0, True, torch.float32)
    gx, gA, gB = torch.autograd.grad(y, [x32, A32, B32], dy.float())

    x64, A64, B64 = leaf(x, torch.float64), leaf(A, torch.float64), leaf(B, torch.float64)
    y64 = _oracle_linear(x64, state, b, A64, B64, 0.5)
    gx64, gA64, gB64 = torch.autograd.grad(y64, [x64, A64, B64], dy)
    assert y.dtype == torch.float32 and y.shape == (2, M, N)
    for got, want in [(y, y64), (gx, gx64), (gA, gA64), (gB, gB64)]:
        assert rel_err(got, want) < 1e-5


def test_lora_linear_4bit_compute_dtype_and_bias_grad():
    """bf16 compute on fp32 input: the base runs in bf16 and returns fp32; the bias gets its grad."""
    state = _state((24, 64), "fp4", False)
    x = torch.randn(3, 5, 64, device=DEVICE)
    A, B = torch.randn(4, 64, device=DEVICE), torch.randn(24, 4, device=DEVICE)
    b = torch.randn(24, device=DEVICE, requires_grad=True)
    y = ops.lora_linear_4bit(x, state, b, A, B, 2.0, 0.0, True, torch.bfloat16)
    assert y.dtype == torch.float32
    y64 = _oracle_linear(x, state, b.detach(), A, B, 2.0)
    assert 1e-4 < rel_err(y, y64) < 2e-2  # bf16 rounding of the base product, no more
    (gb,) = torch.autograd.grad(y, [b], torch.ones_like(y))
    assert torch.allclose(gb, torch.full_like(gb, 15.0))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_dora_linear_4bit_matches_fp64(p):
    """DoRA on a 4-bit base: base product plus (m/‖W + s·B·A‖ − 1)·x'Wᵀ + m/‖W + s·B·A‖·s·x'AᵀBᵀ with W
    the dequantized weight (HF peft's bnb DoRA), forward and gradients of x, A, B and m."""
    M, K, N, r, s = 9, 64, 33, 4, 0.75
    state = _state((N, K), "nf4", True, seed=3)
    g = torch.Generator().manual_seed(4)
    x, A = torch.randn(2, M, K, generator=g, dtype=torch.float64), torch.randn(r, K, generator=g, dtype=torch.float64)
    B, b = torch.randn(N, r, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    m = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    dy = torch.randn(2, M, N, generator=g, dtype=torch.float64)
    leaves32 = [leaf(t, torch.float32) for t in (x, A, B, m)]
    keep = torch.ones(2, M, K, dtype=torch.float64)
    torch.manual_seed(8)
    if p > 0:  # F.dropout's draw, replayed
        keep = torch.empty(2, M, K).bernoulli_(1 - p).double() / (1 - p)
    torch.manual_seed(8)
    with ops.use_backend("torch"):
        y = ops.dora_linear_4bit(leaves32[0], state, b.float(), *leaves32[1:3], leaves32[3], s, p, True)
    grads = torch.autograd.grad(y, leaves32, dy.float())

    x64, A64, B64, m64 = (leaf(t, torch.float64) for t in (x, A, B, m))
    W = dequantize_4bit(state, torch.float32).double()
    scale = m64 / torch.linalg.norm(W + s * B @ A, dim=1)
    xd = x64 * keep
    y64 = x64 @ W.T + b + (scale - 1) * (xd @ W.T) + scale * s * (xd @ A64.T @ B64.T)
    grads64 = torch.autograd.grad(y64, [x64, A64, B64, m64], dy)
    assert y.dtype == torch.float32 and y.shape == (2, M, N)
    for got, want in [(y, y64), *zip(grads, grads64)]:
        assert rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match=r"magnitude must be a \(33,\) tensor"):
        ops.dora_linear_4bit(x.float(), state, None, A.float(), B.float(), m[:3].float(), s)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\)"):
        ops.dora_linear_4bit(x[..., :8].float(), state, None, A.float(), B.float(), m.float(), s)
    with pytest.raises(TypeError, match="state must be a QuantState4bit"):
        ops.dora_linear_4bit(x.float(), W, None, A.float(), B.float(), m.float(), s)


def test_backward_keeps_no_dequantized_weight():
    """Between forward and backward only the packed weight is kept, never an (out, in) float copy."""
    state = _state((96, 128))
    x = torch.randn(4, 128, device=DEVICE, requires_grad=True)
    A = torch.randn(8, 128, device=DEVICE, requires_grad=True)
    B = torch.randn(96, 8, device=DEVICE, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.lora_linear_4bit(x, state, None, A, B, 1.0, 0.0, True, torch.float32)
    assert not any(t.shape == (96, 128) for t in saved)
    y.sum().backward()
    assert x.grad is not None and A.grad is not None


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_linear_4bit_matches_fp64(feedforward):
    state = _state((33, 64), "nf4", True)
    x = torch.randn(2, 7, 64, dtype=torch.float64, device=DEVICE)
    lshape = (1, 64) if feedforward else (33, 1)
    lvec = torch.rand(lshape, dtype=torch.float64, device=DEVICE) + 0.5
    x32, l32 = leaf(x, torch.float32), leaf(lvec, torch.float32)
    y = ops.ia3_linear_4bit(x32, state, None, l32, feedforward, torch.float32)
    x64, l64 = leaf(x, torch.float64), leaf(lvec, torch.float64)
    s = l64.flatten()
    y64 = _oracle_linear(x64 * s, state, None) if feedforward else _oracle_linear(x64, state, None) * s
    dy = torch.randn_like(y64)
    for got, want in zip(torch.autograd.grad(y, [x32, l32], dy.float()), torch.autograd.grad(y64, [x64, l64], dy)):
        assert rel_err(got, want) < 1e-5
    assert rel_err(y, y64) < 1e-5


def test_ia3_linear_4bit_returns_fp32_for_half_input():
    """HF peft's bnb IA³ layer moves x to fp32 first and keeps the result there."""
    state = _state((16, 64))
    y = ops.ia3_linear_4bit(torch.randn(3, 64).half(), state, None, torch.ones(16, 1), False, torch.float16)
    assert y.dtype == torch.float32


def test_lora_add_casts_the_update_to_the_base_dtype():
    result = torch.randn(3, 8).half()
    x = torch.randn(3, 16).half()
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    y = ops.lora_add(result, x, A, B, 0.5)
    assert y.dtype == torch.float16
    want = result.double() + 0.5 * (x.double() @ A.double().T) @ B.double().T
    assert rel_err(y, want) < 2e-3


def test_kernel_backends_fall_back_to_the_reference():
    """Under "triton", what the fused 4-bit matmul does not take (IA³) runs the reference path:
    the same numbers. Dropout in training stays fused (tests/ops/test_qlora_fused.py checks it
    against float64 with the kernels' own mask)."""
    state = _state((16, 64))
    x, A, B = torch.randn(3, 64, device=DEVICE), torch.randn(2, 64, device=DEVICE), torch.randn(16, 2, device=DEVICE)
    ia3_l = torch.rand(16, 1, device=DEVICE) + 0.5
    torch.manual_seed(3)
    want = ops.lora_linear_4bit(x, state, None, A, B, 1.0, 0.5, True)
    want_ia3 = ops.ia3_linear_4bit(x, state, None, ia3_l, False)
    if peft_fast.ops.dispatch.unavailable_reason("triton") is None:
        with peft_fast.use_backend("triton"):
            from peft_fast.ops.triton import qlora

            args = (x, state, None, A, B, 1.0, 0.5, True, x.dtype)
            assert peft_fast.ops.dispatch.select("lora_linear_4bit", *args) is qlora.lora_linear_4bit
            assert torch.equal(ops.ia3_linear_4bit(x, state, None, ia3_l, False), want_ia3)
    no_dropout = ops.lora_linear_4bit(x, state, None, A, B, 1.0, 0.0, True)
    assert rel_err(no_dropout, _oracle_linear(x, state, None, A, B, 1.0)) < 1e-5
    assert not torch.equal(want, no_dropout)  # the dropout draw did happen
