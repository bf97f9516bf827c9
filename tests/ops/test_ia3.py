"""The Triton IA³ backend (peft_fast/ops/ia3_triton.py, kernels/ia3_scale.py) against the
float64 reference (peft_fast/ops/reference.py); on CPU under Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, ia3_case, ia3_check, ia3_run, leaf, randn, rel_err, require_triton

import peft_fast
from peft_fast.ops import reference


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


_ia3_case = ia3_case


_run = ia3_run


def _check(case, feedforward, dtype, l_dtype):
    ia3_check("triton", case, feedforward, dtype, l_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,K,N", [(1, 7, 33), (33, 100, 7), (100, 16, 64)])
def test_matches_fp64_reference(M, K, N, bias, feedforward, dtype):
    _check(_ia3_case(M, K, N, feedforward, bias=bias), feedforward, dtype, torch.float32)


@pytest.mark.parametrize("feedforward", [False, True])
def test_3d_input_and_fp16_scale(feedforward):
    _check(_ia3_case(7, 33, 20, feedforward, lead=(3,)), feedforward, torch.float32, torch.float32)
    _check(_ia3_case(9, 40, 24, feedforward), feedforward, torch.float16, torch.float16)


@pytest.mark.parametrize("feedforward", [False, True])
def test_strided_input_and_only_one_grad(feedforward):
    x, W, b, l, dy = _ia3_case(9, 40, 24, feedforward)
    base = torch.stack([x, -x], dim=-1).float().requires_grad_()
    xs = base[..., 0]
    with peft_fast.use_backend("triton"):
        y = peft_fast.ops.ia3_linear(xs, W.float(), b.float(), l.float(), feedforward)  # l frozen
    (gx,) = torch.autograd.grad(y, [xs], dy.float())
    x64 = leaf(x, torch.float64)
    y64 = reference.ia3_linear(x64, W, b, l, feedforward)
    (gx64,) = torch.autograd.grad(y64, [x64], dy)
    assert rel_err(y, y64) < 1e-5 and rel_err(gx, gx64) < 1e-5
    # and the scale alone, x frozen
    y, (gl,) = _run("triton", x, W, b, l, dy, feedforward, torch.float32, torch.float32, (False, True))
    l64 = leaf(l, torch.float64)
    (gl64,) = torch.autograd.grad(reference.ia3_linear(x, W, b, l64, feedforward), [l64], dy)
    assert rel_err(gl, gl64) < 1e-5


@pytest.mark.parametrize("feedforward", [False, True])
def test_frozen_base_grads_when_required(feedforward):
    x, W, b, l, dy = _ia3_case(10, 24, 20, feedforward)
    args = [leaf(t, torch.float32) for t in (x, W, b, l)]
    with peft_fast.use_backend("triton"):
        y = peft_fast.ops.ia3_linear(*args, feedforward)
    got = torch.autograd.grad(y, args, dy.float())
    ref = [leaf(t, torch.float64) for t in (x, W, b, l)]
    want = torch.autograd.grad(reference.ia3_linear(*ref, feedforward), ref, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_scaled_matmul_launcher_and_errors():
    from peft_fast.kernels.ia3_scale import ia3_scaled_matmul

    M, K, N = 20, 30, 17
    x, W, s_in, s_out, R = (randn(*s, dtype=torch.float32) for s in ((M, K), (N, K), (K,), (N,), (M, N)))
    out, z, pro, epi = ia3_scaled_matmul(x, W, None, s_in, s_out, True, prologue_reduce=x, epilogue_reduce=R)
    z64 = (x.double() * s_in.double()) @ W.double().t()
    assert rel_err(z, z64) < 1e-5 and rel_err(out, z64 * s_out.double()) < 1e-5
    assert rel_err(pro, (x.double() ** 2).sum(0)) < 1e-5 and rel_err(epi, (z64 * R.double()).sum(0)) < 1e-5
    with pytest.raises(ValueError, match="out_scale"):
        ia3_scaled_matmul(x, W, out_scale=s_in)
    with pytest.raises(ValueError, match="ia3_l"):
        with peft_fast.use_backend("triton"):
            peft_fast.ops.ia3_linear(x, W, None, s_in.reshape(K, 1), False)


def test_torch_compile_fullgraph_and_opcheck():
    x, W, b, l, dy = _ia3_case(8, 16, 12, False)
    args = [leaf(t, torch.float32) for t in (x, W, b, l)]
    for ff, save_z in ((False, True), (False, False), (True, False)):
        # an attention-style scale can only get a gradient when its forward saved z
        scale = randn(16 if ff else 12, dtype=torch.float32).requires_grad_(ff or save_z)
        torch.library.opcheck(
            torch.ops.peft_fast.ia3_linear_fwd.default, (args[0].detach(), args[1].detach(), None, scale, ff, save_z)
        )

    def f(x, W, b, l):
        return peft_fast.ops.ia3_linear(x, W, b, l, False)

    with peft_fast.use_backend("triton"):
        eager = f(*args)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(
        torch.autograd.grad(compiled, args[3], dy.float())[0], torch.autograd.grad(eager, args[3], dy.float())[0]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("l_dtype", [torch.bfloat16, torch.float32])
def test_gpu_bf16(feedforward, l_dtype):
    assert DEVICE == "cuda"
    _check(_ia3_case(1000, 1024, 1536, feedforward), feedforward, torch.bfloat16, l_dtype)
