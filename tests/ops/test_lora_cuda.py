"""The CUDA C++ LoRA backend (peft_fast/ops/lora_cuda.py, cuda_ops.py; csrc/lora_shrink.cu,
lora_expand.cu, lora_adapter_grad.cu) against the float64 reference. GPU only: every test
skips cleanly where the cuda backend is unavailable (and says why)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, assert_close_to_oracle, grads_of, leaf, lora_case, rel_err, require_cuda_kernels

import peft_fast
from peft_fast.ops import dispatch, reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _cuda():
    require_cuda_kernels()


def _run(backend, x, W, b, A, B, dy, dtype, adapter_dtype, scaling=0.5, p=0.0, training=True):
    xs, As, Bs = leaf(x, dtype), leaf(A, adapter_dtype), leaf(B, adapter_dtype)
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.lora_linear(
            xs, W.to(dtype), b.to(dtype) if b is not None else None, As, Bs, scaling, p, training
        )
    return y, grads_of(y, dy, [xs, As, Bs])


def _check(case, dtype, adapter_dtype):
    x, W, b, A, B, dy = case
    rounded = [t.to(d).double() if t is not None else None for t, d in
               ((x, dtype), (W, dtype), (b, dtype), (A, adapter_dtype), (B, adapter_dtype))]  # fmt: skip
    x64, W64, b64, A64, B64 = rounded
    x64, A64, B64 = (t.requires_grad_() for t in (x64, A64, B64))
    y64 = reference.lora_linear(x64, W64, b64, A64, B64, 0.5)
    want = [y64] + grads_of(y64, dy.to(dtype).double(), [x64, A64, B64])
    y, g = _run("cuda", *case, dtype, adapter_dtype)
    base = [None] * 4
    low = dtype if dtype != torch.float32 else adapter_dtype
    if low != torch.float32:
        y_t, g_t = _run("torch", *case, dtype, adapter_dtype)
        base = [y_t] + g_t
    assert y.dtype == dtype and y.shape == y64.shape
    for name, got, w, bt in zip(("y", "dx", "dA", "dB"), [y] + g, want, base):
        assert got.dtype == (dtype if name in ("y", "dx") else adapter_dtype), name
        assert_close_to_oracle(name, got, w, low, bt)


def test_dispatch_selects_cuda():
    from peft_fast.ops import lora_cuda

    x, W, b, A, B, _ = lora_case(4, 8, 6, 2)
    args = [t.float() for t in (x, W, b, A, B)]
    with peft_fast.use_backend("cuda"):
        assert dispatch.select("lora_linear", *args, 1.0) is lora_cuda.lora_linear
        assert dispatch.select("lora_linear", *[a.cpu() for a in args], 1.0) is not lora_cuda.lora_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", [1, 5, 16, 33])
@pytest.mark.parametrize("M,K,N", [(1, 7, 33), (7, 33, 100), (33, 100, 7), (100, 16, 64), (257, 520, 136)])
def test_matches_fp64_reference(M, K, N, r, bias, dtype):
    _check(lora_case(M, K, N, r, bias=bias), dtype, dtype)


@pytest.mark.parametrize("r", [64, 100, 256])
def test_large_ranks(r):
    _check(lora_case(70, 96, 80, r), torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_with_fp32_adapters(dtype):
    _check(lora_case(33, 100, 40, 8), dtype, torch.float32)


@pytest.mark.parametrize("M,K,N,r", [(1000, 1024, 1536, 16), (333, 4096, 1024, 64)])
def test_bf16_larger_shapes(M, K, N, r):
    _check(lora_case(M, K, N, r), torch.bfloat16, torch.bfloat16)


def test_3d_input():
    _check(lora_case(7, 33, 20, 4, lead=(3,)), torch.float32, torch.float32)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "conv1d_weight", "row_padded"])
def test_strided_inputs(layout):
    x, W, b, A, B, dy = lora_case(9, 40, 24, 4)
    W32 = W.float()
    if layout == "sliced":  # last-dim stride 2
        base = torch.stack([x, -x], dim=-1).float().requires_grad_()
        xs = base[..., 0]
    elif layout == "transposed":  # column-major x
        base = x.t().float().contiguous().requires_grad_()
        xs = base.t()
    elif layout == "row_padded":  # rows of stride 41: unaligned rows take the scalar path
        base = torch.cat([x, x[:, :1]], 1).float().requires_grad_()
        xs = base[:, :40]
    else:  # GPT-2's Conv1D weight (in, out) seen transposed
        xs = leaf(x, torch.float32)
        W32 = W.t().float().contiguous().t()
    As, Bs = leaf(A, torch.float32), leaf(B, torch.float32)
    with peft_fast.use_backend("cuda"):
        y = peft_fast.ops.lora_linear(xs, W32, b.float(), As, Bs, 0.5)
    got = [y, *torch.autograd.grad(y, [xs, As, Bs], dy.float())]
    args64 = [leaf(t, torch.float64) for t in (x, A, B)]
    y64 = reference.lora_linear(args64[0], W, b, args64[1], args64[2], 0.5)
    want = [y64, *torch.autograd.grad(y64, args64, dy)]
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert rel_err(g, w) < 1e-5, name


def test_frozen_base_grads_when_required():
    x, W, b, A, B, dy = lora_case(10, 24, 20, 3)
    args = [leaf(t, torch.float32) for t in (x, W, b, A, B)]
    with peft_fast.use_backend("cuda"):
        y = peft_fast.ops.lora_linear(*args, 0.5)
    got = torch.autograd.grad(y, args, dy.float())
    want_args = [leaf(t, torch.float64) for t in (x, W, b, A, B)]
    want = torch.autograd.grad(reference.lora_linear(*want_args, 0.5), want_args, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def _mask_of(seed, M, K, p):
    """The keep-mask the CUDA shrink applies, recovered independently: with A = I,
    h = dropout(x)/(1-p) is x's dropped copy itself."""
    x = torch.rand(M, K, device=DEVICE) + 0.5  # never zero
    eye = torch.eye(K, device=DEVICE)
    h = torch.ops.peft_fast.cuda_sgmv_shrink(x, eye, None, [0, M], [0], [K], [1 / (1 - p)], [p], seed, K)
    keep = h != 0
    torch.testing.assert_close(h[keep], x[keep] / (1 - p))
    return keep


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_backward_regenerates_forward_mask(dtype):
    p, s, M, K, N, r = 0.3, 0.5, 67, 136, 48, 5
    x, W, b, A, B, dy = lora_case(M, K, N, r)
    seed = torch.tensor([4321], dtype=torch.int64, device=DEVICE)
    keep = _mask_of(seed, M, K, p).double()
    assert 0.6 < keep.mean().item() < 0.8
    xs, As, Bs = leaf(x, dtype), leaf(A, dtype), leaf(B, dtype)
    y, _ = torch.ops.peft_fast.cuda_lora_fwd(
        xs, W.to(dtype), b.to(dtype), As, Bs, None, [0, M], [0], [r], [s], [p], seed, r
    )
    got = [y] + grads_of(y, dy, [xs, As, Bs])
    x64, A64, B64 = (leaf(t.to(dtype), torch.float64) for t in (x, A, B))
    y64 = x64 @ W.to(dtype).double().t() + b.to(dtype).double() + s * ((x64 * keep / (1 - p)) @ A64.t()) @ B64.t()
    want = [y64] + grads_of(y64, dy.to(dtype).double(), [x64, A64, B64])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert rel_err(g, w) < tol, name


def test_dropout_mask_equals_triton_mask():
    """Same seed, same numbering, same Philox: the two kernel backends drop the same elements."""
    pytest.importorskip("triton")
    from peft_fast.kernels.dropout import dropout_mask

    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    assert torch.equal(_mask_of(seed, 50, 64, 0.4), dropout_mask(seed, 50, 64, 0.4, DEVICE))


def test_dropout_fresh_each_call_reproducible_with_seed_and_off_in_eval():
    x, W, b, A, B, _ = lora_case(16, 32, 16, 4)
    args = [t.float() for t in (x, W, b, A, B)]
    with peft_fast.use_backend("cuda"):
        torch.manual_seed(0)
        y1 = peft_fast.ops.lora_linear(*args, 1.0, 0.5, True)
        y2 = peft_fast.ops.lora_linear(*args, 1.0, 0.5, True)
        torch.manual_seed(0)
        y3 = peft_fast.ops.lora_linear(*args, 1.0, 0.5, True)
        y_eval = peft_fast.ops.lora_linear(*args, 1.0, 0.5, False)
    assert not torch.equal(y1, y2) and torch.equal(y1, y3)
    assert rel_err(y_eval, reference.lora_linear(x, W, b, A, B, 1.0)) < 1e-5


def test_op_errors_name_the_argument():
    x, W, b, A, B = (t.float() for t in lora_case(4, 8, 6, 2)[:5])
    with peft_fast.use_backend("cuda"):
        with pytest.raises(ValueError, match="lora_B"):
            peft_fast.ops.lora_linear(x, W, b, A, B[:5], 1.0)
        with pytest.raises(ValueError, match="dropout_p"):
            peft_fast.ops.lora_linear(x, W, b, A, B, 1.0, 1.0)
    with pytest.raises(ValueError, match="seed"):
        torch.ops.peft_fast.cuda_sgmv_shrink(x, A, None, [0, 4], [0], [2], [1.0], [0.5], None, 2)
    with pytest.raises(ValueError, match="seg_starts"):
        torch.ops.peft_fast.cuda_sgmv_shrink(x, A, None, [0, 9], [0], [2], [1.0], [0.0], None, 2)


def test_opcheck_and_compile():
    x, W, b, A, B, dy = lora_case(9, 16, 12, 3)
    x, W, b = (t.float() for t in (x, W, b))
    A, B = leaf(A, torch.float32), leaf(B, torch.float32)
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    for p, sd in ((0.0, None), (0.2, seed)):
        torch.library.opcheck(
            torch.ops.peft_fast.cuda_lora_fwd.default, (x, W, b, A, B, None, [0, 9], [0], [3], [0.5], [p], sd, 3)
        )

    def f(x, W, b, A, B):
        return peft_fast.ops.lora_linear(x, W, b, A, B, 0.5)

    with peft_fast.use_backend("cuda"):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True)(x, W, b, A, B)
        eager = f(x, W, b, A, B)
    torch.testing.assert_close(compiled, eager)
