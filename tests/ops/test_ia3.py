"""`peft_fast.ops.ia3_linear` on each kernel backend (peft_fast/ops/triton/ia3.py with
kernels/ia3_scale.py; peft_fast/ops/cuda/ia3.py with csrc/ia3_scale.cu) against the float64
reference (peft_fast/ops/reference.py). Tests taking `backend` run on both: "triton" on CPU
under Triton's interpreter, "cuda" on a GPU only (skipped cleanly elsewhere)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    BACKENDS,
    DEVICE,
    KERNEL_DTYPES,
    gpu_only,
    grads_of,
    ia3_case,
    ia3_check,
    ia3_run,
    kernel_op,
    leaf,
    randn,
    rel_err,
    require_backend,
    require_cuda_kernels,
    require_triton,
)

import peft_fast
from peft_fast.ops import reference


@pytest.fixture(params=BACKENDS)
def backend(request):
    return require_backend(request.param)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,K,N", [(1, 7, 33), (33, 100, 7), (100, 16, 64)])
def test_matches_fp64_reference(backend, M, K, N, bias, feedforward, dtype):
    ia3_check(backend, ia3_case(M, K, N, feedforward, bias=bias), feedforward, dtype, torch.float32)


@pytest.mark.parametrize("feedforward", [False, True])
def test_3d_input_and_same_dtype_scale(backend, feedforward):
    ia3_check(backend, ia3_case(7, 33, 20, feedforward, lead=(3,)), feedforward, torch.float32, torch.float32)
    low = KERNEL_DTYPES[-1]  # bf16 on a GPU, fp16 under the interpreter
    ia3_check(backend, ia3_case(9, 40, 24, feedforward), feedforward, low, low)
    if low != torch.float16:
        ia3_check(backend, ia3_case(9, 40, 24, feedforward), feedforward, torch.float16, torch.float16)


@pytest.mark.parametrize("feedforward", [False, True])
def test_strided_input_and_only_one_grad(backend, feedforward):
    x, W, b, l, dy = ia3_case(9, 40, 24, feedforward)
    base = torch.stack([x, -x], dim=-1).float().requires_grad_()
    xs = base[..., 0]
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.ia3_linear(xs, W.float(), b.float(), l.float(), feedforward)  # l frozen
    (gx,) = torch.autograd.grad(y, [xs], dy.float())
    x64 = leaf(x, torch.float64)
    y64 = reference.ia3_linear(x64, W, b, l, feedforward)
    (gx64,) = torch.autograd.grad(y64, [x64], dy)
    assert rel_err(y, y64) < 1e-5 and rel_err(gx, gx64) < 1e-5
    # and the scale alone, x frozen
    y, (gl,) = ia3_run(backend, x, W, b, l, dy, feedforward, torch.float32, torch.float32, (False, True))
    l64 = leaf(l, torch.float64)
    (gl64,) = torch.autograd.grad(reference.ia3_linear(x, W, b, l64, feedforward), [l64], dy)
    assert rel_err(gl, gl64) < 1e-5


@pytest.mark.parametrize("feedforward", [False, True])
def test_frozen_base_grads_when_required(backend, feedforward):
    x, W, b, l, dy = ia3_case(10, 24, 20, feedforward)
    args = [leaf(t, torch.float32) for t in (x, W, b, l)]
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.ia3_linear(*args, feedforward)
    got = torch.autograd.grad(y, args, dy.float())
    ref = [leaf(t, torch.float64) for t in (x, W, b, l)]
    want = torch.autograd.grad(reference.ia3_linear(*ref, feedforward), ref, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_op_errors_name_the_argument(backend):
    x, W = randn(20, 30, dtype=torch.float32), randn(17, 30, dtype=torch.float32)
    with pytest.raises(ValueError, match="ia3_l"):
        with peft_fast.use_backend(backend):
            peft_fast.ops.ia3_linear(x, W, None, randn(30, 1, dtype=torch.float32), False)


def test_opcheck_and_torch_compile_fullgraph(backend):
    """opcheck of the forward op; then no graph break through dispatch and the custom ops, with
    the compiled output and the scale's gradient matching the float64 reference first, then
    the eager op."""
    x, W, b, l, dy = ia3_case(8, 16, 12, False)
    args = [leaf(t, torch.float32) for t in (x, W, b, l)]
    for ff, save_z in ((False, True), (False, False), (True, False)):
        # an attention-style scale can only get a gradient when its forward saved z
        scale = randn(16 if ff else 12, dtype=torch.float32).requires_grad_(ff or save_z)
        torch.library.opcheck(
            kernel_op("ia3_linear", backend).default, (args[0].detach(), args[1].detach(), None, scale, ff, save_z)
        )

    def f(x, W, b, l):
        return peft_fast.ops.ia3_linear(x, W, b, l, False)

    with peft_fast.use_backend(backend):
        eager = f(*args)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    a64 = [leaf(t, torch.float64) for t in (x, W, b, l)]
    y64 = reference.ia3_linear(*a64, False)
    (gl64,) = grads_of(y64, dy, [a64[3]])
    (gl,) = grads_of(compiled, dy, [args[3]])
    assert rel_err(compiled, y64) < 1e-5 and rel_err(gl, gl64) < 1e-5
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gl, grads_of(eager, dy, [args[3]])[0])


def test_scaled_matmul_launcher_and_errors():
    """The Triton launcher on its own."""
    require_triton()
    from peft_fast.kernels.ia3_scale import ia3_scaled_matmul

    M, K, N = 20, 30, 17
    x, W, s_in, s_out, R = (randn(*s, dtype=torch.float32) for s in ((M, K), (N, K), (K,), (N,), (M, N)))
    out, z, pro, epi = ia3_scaled_matmul(x, W, None, s_in, s_out, True, prologue_reduce=x, epilogue_reduce=R)
    z64 = (x.double() * s_in.double()) @ W.double().t()
    assert rel_err(z, z64) < 1e-5 and rel_err(out, z64 * s_out.double()) < 1e-5
    assert rel_err(pro, (x.double() ** 2).sum(0)) < 1e-5 and rel_err(epi, (z64 * R.double()).sum(0)) < 1e-5
    with pytest.raises(ValueError, match="out_scale"):
        ia3_scaled_matmul(x, W, out_scale=s_in)


@gpu_only
def test_cuda_scale_grad_op_alone():
    """The CUDA kernel ops on their own."""
    require_cuda_kernels()
    g, r = torch.randn(777, 136, device="cuda").half(), torch.randn(777, 136, device="cuda").half()
    s = torch.rand(136, device="cuda")
    gs, ds = torch.ops.peft_fast.ia3_scale_grad_cuda(g, r, s)
    assert rel_err(gs, g.double() * s.double()) < 1e-3
    assert rel_err(ds, (g.double() * r.double()).sum(0)) < 1e-5
    with pytest.raises(ValueError, match="scale"):
        torch.ops.peft_fast.ia3_scale_cuda(g, s[:5])


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_multi_tile_shape(backend, bias, feedforward, dtype):
    ia3_check(backend, ia3_case(1000, 520, 1032, feedforward, bias=bias), feedforward, dtype, torch.float32)


@gpu_only
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("l_dtype", [torch.bfloat16, torch.float32])
def test_gpu_bf16(backend, feedforward, l_dtype):
    assert DEVICE == "cuda"
    ia3_check(backend, ia3_case(1000, 1024, 1536, feedforward), feedforward, torch.bfloat16, l_dtype)
