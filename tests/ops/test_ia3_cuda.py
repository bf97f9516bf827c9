"""The CUDA C++ IA³ backend (peft_fast/ops/ia3_cuda.py, csrc/ia3_scale.cu) against the float64
reference. GPU only."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import ia3_case, ia3_check, leaf, rel_err, require_cuda_kernels

import peft_fast
from peft_fast.ops import reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    require_cuda_kernels()


def _check(case, feedforward, dtype, l_dtype):
    ia3_check("cuda", case, feedforward, dtype, l_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,K,N", [(1, 7, 33), (33, 100, 7), (100, 16, 64), (1000, 520, 1032)])
def test_matches_fp64_reference(M, K, N, bias, feedforward, dtype):
    _check(ia3_case(M, K, N, feedforward, bias=bias), feedforward, dtype, torch.float32)


@pytest.mark.parametrize("feedforward", [False, True])
def test_3d_input_and_same_dtype_scale(feedforward):
    _check(ia3_case(7, 33, 20, feedforward, lead=(3,)), feedforward, torch.float32, torch.float32)
    _check(ia3_case(9, 40, 24, feedforward), feedforward, torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("feedforward", [False, True])
def test_strided_input_and_frozen_scale(feedforward):
    x, W, b, l, dy = ia3_case(9, 40, 24, feedforward)
    base = torch.stack([x, -x], dim=-1).float().requires_grad_()
    xs = base[..., 0]
    with peft_fast.use_backend("cuda"):
        y = peft_fast.ops.ia3_linear(xs, W.float(), b.float(), l.float(), feedforward)
    (gx,) = torch.autograd.grad(y, [xs], dy.float())
    x64 = leaf(x, torch.float64)
    y64 = reference.ia3_linear(x64, W, b, l, feedforward)
    (gx64,) = torch.autograd.grad(y64, [x64], dy)
    assert rel_err(y, y64) < 1e-5 and rel_err(gx, gx64) < 1e-5


def test_frozen_base_grads_when_required():
    for feedforward in (False, True):
        x, W, b, l, dy = ia3_case(10, 24, 20, feedforward)
        args = [leaf(t, torch.float32) for t in (x, W, b, l)]
        with peft_fast.use_backend("cuda"):
            y = peft_fast.ops.ia3_linear(*args, feedforward)
        got = torch.autograd.grad(y, args, dy.float())
        a64 = [leaf(t, torch.float64) for t in (x, W, b, l)]
        want = torch.autograd.grad(reference.ia3_linear(*a64, feedforward), a64, dy)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5


def test_scale_grad_op_alone():
    g, r = torch.randn(777, 136, device="cuda").half(), torch.randn(777, 136, device="cuda").half()
    s = torch.rand(136, device="cuda")
    gs, ds = torch.ops.peft_fast.cuda_ia3_scale_grad(g, r, s)
    assert rel_err(gs, g.double() * s.double()) < 1e-3
    assert rel_err(ds, (g.double() * r.double()).sum(0)) < 1e-5
    with pytest.raises(ValueError, match="scale"):
        torch.ops.peft_fast.cuda_ia3_scale(g, s[:5])
