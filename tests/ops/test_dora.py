"""peft_fast/ops/dora.py on every backend against a float64 oracle: the weight norm, and
dora_linear forward and backward (x, A, B, magnitude, bias) on odd shapes, 3-D and strided
inputs, with and without dropout, through the torch path and both Triton paths (the kernels
run under Triton's interpreter on CPU). The oracle applies the very mask each backend drew:
the torch path's (F.dropout's bernoulli draw, replayed from the seed) or the kernels' Philox
mask (`dropout_mask` of the seed), so a backward that regenerated another mask would fail."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import gpu_only

from peft_fast import ops
from peft_fast.ops import dispatch
from peft_fast.ops.autograd import new_seed
from peft_fast.ops.dora_reference import dora_weight_norm_float64

IMPLS = ("torch", "triton-composite", "triton-fused")


def _triton():
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(reason)
    from peft_fast.ops.triton import dora as triton_dora

    return triton_dora


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 2e-6, torch.float16: 4e-3}


NORM_CASES = [  # (N, K, r, dtype, transposed weight)
    (1, 1, 1, torch.float32, False),
    (7, 33, 3, torch.float32, True),
    (100, 40, 16, torch.float32, False),
    (33, 70, 20, torch.float16, False),
    (7, 33, 3, torch.float16, True),
]


@pytest.mark.parametrize("N,K,r,dtype,transposed", NORM_CASES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weight_norm_matches_float64(N, K, r, dtype, transposed, backend):
    if backend == "triton":
        _triton()
    g = torch.Generator().manual_seed(N * 1000 + K + r)
    weight = torch.randn((K, N) if transposed else (N, K), generator=g).to(dtype)
    weight = weight.t() if transposed else weight  # a strided (Conv1D-like) view
    A = torch.randn(r, K, generator=g).to(dtype) * 0.3
    B = torch.randn(N, r, generator=g).to(dtype) * 0.3
    with ops.use_backend(backend):
        got = ops.dora_weight_norm(weight, A, B, 1.7)
    assert got.dtype == torch.float32 and got.shape == (N,)
    assert _rel(got, dora_weight_norm_float64(weight, A, B, 1.7)) < TOL[dtype]


def _inputs(M, K, N, r, dtype, bias, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "3d":
        x = torch.randn(3, M, K, generator=g)
    elif layout == "strided":
        x = torch.randn(K, 2 * M, generator=g).t()[::2]  # (M, K) with strides (1 * 2, 2M)
    else:
        x = torch.randn(M, K, generator=g)
    x = x.to(dtype).requires_grad_(True)
    weight = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype).requires_grad_(True) if bias else None
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype).requires_grad_(True)
    B = (torch.randn(N, r, generator=g) * 0.5).to(dtype).requires_grad_(True)
    mag = (torch.rand(N, generator=g) + 0.5).to(dtype).requires_grad_(True)
    return x, weight, b, A, B, mag


def _oracle(x, weight, bias, A, B, mag, s, keep, p):
    """float64 DoRA (HF peft's formula) with the given keep-mask; the norm detached."""
    xd_, w, A_, B_, m_ = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, A, B, mag))
    b_ = bias.detach().double().requires_grad_(True) if bias is not None else None
    norm = torch.linalg.norm(w + s * B_.detach() @ A_.detach(), dim=1)
    scale = m_ / norm
    x2 = xd_.reshape(-1, w.shape[1])
    dropped = x2 if keep is None else x2 * keep / (1 - p)
    y = x2 @ w.T + (scale - 1) * (dropped @ w.T) + scale * s * (dropped @ A_.T @ B_.T)
    if b_ is not None:
        y = y + b_
    return y.reshape(*x.shape[:-1], w.shape[0]), (xd_, A_, B_, m_, b_)


def _run(backend, path, args, s, p):
    """(y, keep mask it used or None) of ops.dora_linear on `backend` (and Triton `path`)."""
    x, weight, bias, A, B, mag = args
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    torch.manual_seed(1234)
    if backend == "torch":
        keep = None
        if p > 0:
            # F.dropout's draw: empty_like keeps x's stride order, so the replay must too
            keep = torch.empty_like(x.detach().reshape(M, K), dtype=A.dtype).bernoulli_(1 - p).bool()
        torch.manual_seed(1234)
        with ops.use_backend("torch"):
            return ops.dora_linear(x, weight, bias, A, B, mag, s, p, True), keep
    triton_dora = _triton()
    from peft_fast.kernels.dropout import dropout_mask

    keep = None
    if p > 0:
        keep = dropout_mask(new_seed(x.device), M, K, p, x.device)
    torch.manual_seed(1234)
    with ops.use_backend("triton"), triton_dora.use_dora_path(path):
        return ops.dora_linear(x, weight, bias, A, B, mag, s, p, True), keep


CASES = [
    # (M, K, N, r, bias, layout)
    (1, 16, 7, 1, False, "2d"),
    (7, 33, 20, 3, True, "2d"),
    (33, 40, 33, 16, True, "3d"),
    (20, 24, 17, 20, False, "strided"),
]


# fp32 on every case, path and dropout; fp16 (the kernels' low precision under the interpreter,
# CPU torch matmuls being fp32-only in practice) on two cases with dropout on both Triton paths.
LINEAR_CASES = [(case, p, torch.float32, impl) for case in CASES for p in (0.0, 0.3) for impl in IMPLS] + [
    (case, 0.3, torch.float16, impl) for case in CASES[1:3] for impl in IMPLS[1:]
]


@pytest.mark.parametrize("case,p,dtype,impl", LINEAR_CASES, ids=str)
def test_dora_linear_matches_float64(case, p, dtype, impl):
    M, K, N, r, bias, layout = case
    backend, _, path = impl.partition("-")
    args = _inputs(M, K, N, r, dtype, bias, layout)
    s = 1.5
    y, keep = _run(backend, path, args, s, p)
    want, leaves = _oracle(*args, s, keep.double() if keep is not None else None, p)
    tol = TOL[dtype] * 5
    assert y.dtype == dtype and y.shape == want.shape
    assert _rel(y, want) < tol
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(want.shape, generator=g)
    y.backward(dy.to(dtype))
    want.backward(dy.double())
    x, _, b, A, B, mag = args
    for name, got, ref in zip(("x", "A", "B", "magnitude", "bias"), (x, A, B, mag, b), leaves):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == got.dtype, name
        assert _rel(got.grad, ref.grad) < tol, name


def test_dropout_mask_differs_between_calls_and_follows_the_seed():
    triton_dora = _triton()
    args = _inputs(16, 32, 16, 4, torch.float32, False, "2d")
    x, weight, bias, A, B, mag = args
    with ops.use_backend("triton"), triton_dora.use_dora_path("fused"), torch.no_grad():
        torch.manual_seed(3)
        first = ops.dora_linear(x, weight, bias, A, B, mag, 1.0, 0.5, True)
        second = ops.dora_linear(x, weight, bias, A, B, mag, 1.0, 0.5, True)
        torch.manual_seed(3)
        again = ops.dora_linear(x, weight, bias, A, B, mag, 1.0, 0.5, True)
    assert not torch.equal(first, second)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_auto_takes_the_composite_path_and_names_are_checked():
    triton_dora = _triton()
    assert triton_dora.get_dora_path() == "composite"
    with pytest.raises(ValueError, match="DoRA path must be one of"):
        triton_dora.set_dora_path("fastest")


def test_bad_arguments_name_what_is_wrong():
    x, weight, bias, A, B, mag = _inputs(4, 8, 6, 2, torch.float32, True, "2d")
    with pytest.raises(ValueError, match="magnitude must be a \\(6,\\) tensor"):
        ops.dora_linear(x, weight, bias, A, B, mag[:5], 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        ops.dora_linear(x, weight, bias, A, B[:, :1], mag, 1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.dora_linear(x, weight, bias, A, B, mag, 1.0, 1.0)
    with pytest.raises(ValueError, match="norm must be"):
        ops.dora_linear(x, weight, bias, A, B, mag, 1.0, norm=torch.ones(3))
    with pytest.raises(TypeError, match="scaling must be a real number"):
        ops.dora_weight_norm(weight, A, B, "2")


def test_weight_trains_through_the_torch_composition():
    x, weight, bias, A, B, mag = _inputs(5, 8, 6, 2, torch.float32, True, "2d")
    weight.requires_grad_(True)
    y = ops.dora_linear(x, weight, bias, A, B, mag, 2.0)
    want, _ = _oracle(x, weight, bias, A, B, mag, 2.0, None, 0.0)
    assert _rel(y, want) < 1e-5
    y.sum().backward()
    w64 = weight.detach().double().requires_grad_(True)
    norm = torch.linalg.norm(w64.detach() + 2.0 * B.detach().double() @ A.detach().double(), dim=1)
    scale = mag.detach().double() / norm
    x64 = x.detach().double()
    lora = x64 @ A.detach().double().T @ B.detach().double().T
    (scale * (x64 @ w64.T + 2.0 * lora) + bias.detach().double()).sum().backward()
    assert _rel(weight.grad, w64.grad) < 1e-5


@gpu_only
@pytest.mark.parametrize("path", ["composite", "fused"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_linear_bf16_within_twice_the_torch_error(path, p):
    """bf16 (broken in the interpreter's tl.dot, so GPU only): the kernels' error against float64
    stays within 2x the torch path's own bf16 error (flash-attention's rule), forward and backward."""
    M, K, N, r, bias, layout = CASES[2]
    errors = {}
    for impl in ("torch", f"triton-{path}"):
        args = [
            t.detach().cuda().requires_grad_(t.requires_grad) if t is not None else None
            for t in _inputs(M, K, N, r, torch.bfloat16, bias, layout)
        ]
        backend, _, which = impl.partition("-")
        y, keep = _run(backend, which, args, 1.5, p)
        want, leaves = _oracle(*args, 1.5, keep.double() if keep is not None else None, p)
        dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(7)).cuda()
        y.backward(dy.bfloat16())
        want.backward(dy.double())
        x, _, b, A, B, mag = args
        errors[backend] = [_rel(y, want)] + [_rel(t.grad, ref.grad) for t, ref in zip((x, A, B, mag), leaves)]
    for got, torch_err in zip(errors["triton"], errors["torch"]):
        assert got <= 2 * torch_err + 1e-3


def _dora_add_oracle(result, x, weight, bias, A, B, mag, s, keep, p):
    """float64 HF peft DoRA variant on an output `result` computed elsewhere (norm detached):
    result + (scale - 1) * base + scale * s * x'AᵀBᵀ, base = result - b, or x'Wᵀ with dropout."""
    r_, x_, A_, B_, m_ = (t.detach().double().requires_grad_(t.requires_grad) for t in (result, x, A, B, mag))
    w = weight.detach().double()
    scale = m_ / torch.linalg.norm(w + s * B_.detach() @ A_.detach(), dim=1)
    if keep is None:
        base = r_ if bias is None else r_ - bias.double()
        dropped = x_
    else:
        dropped = x_ * keep / (1 - p)
        base = dropped @ w.T
    return r_ + (scale - 1) * base + scale * s * (dropped @ A_.T @ B_.T), (r_, x_, A_, B_, m_)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_dora_add_matches_float64(p, bias, layout):
    """ops.dora_add on an arbitrary `result` (not the base output: HF peft chains adapters, and a
    DoRA adapter rescales what is already there), with a bf16 weight like a dequantized one."""
    x, weight, b, A, B, mag = _inputs(7, 33, 20, 3, torch.float32, bias, layout, seed=4)
    g = torch.Generator().manual_seed(9)
    result = torch.randn(*x.shape[:-1], 20, generator=g).requires_grad_(True)
    weight = weight.bfloat16()
    keep = None
    torch.manual_seed(55)
    if p > 0:  # F.dropout's draw on x's shape, replayed
        keep = torch.empty_like(x.detach()).bernoulli_(1 - p).bool().double()
    torch.manual_seed(55)
    y = ops.dora_add(result, x, weight, b, A, B, mag, 1.5, p, True)
    want, leaves = _dora_add_oracle(result, x, weight, b, A, B, mag, 1.5, keep, p)
    assert y.dtype == result.dtype and y.shape == result.shape
    assert _rel(y, want) < 1e-5
    dy = torch.randn(want.shape, generator=g)
    y.backward(dy)
    want.backward(dy.double())
    for t, ref in zip((result, x, A, B, mag), leaves):
        assert _rel(t.grad, ref.grad) < 1e-5
    # eval (training=False): no dropout, whatever p
    y_eval = ops.dora_add(result, x, weight, b, A, B, mag, 1.5, p, False)
    assert _rel(y_eval, _dora_add_oracle(result, x, weight, b, A, B, mag, 1.5, None, p)[0]) < 1e-5


def test_dora_add_bad_arguments():
    x, weight, bias, A, B, mag = _inputs(4, 8, 6, 2, torch.float32, True, "2d")
    result = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"result must be \(4, 6\)"):
        ops.dora_add(result[:, :5], x, weight, bias, A, B, mag, 1.0)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 8\)"):
        ops.dora_add(result, x[:, :7], weight, bias, A, B, mag, 1.0)
    with pytest.raises(ValueError, match="weight must be a floating"):
        ops.dora_add(result, x, weight.to(torch.int8), bias, A, B, mag, 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(6,\)"):
        ops.dora_add(result, x, weight, bias[:2], A, B, mag, 1.0)
    with pytest.raises(ValueError, match="magnitude must be"):
        ops.dora_add(result, x, weight, bias, A, B, mag[:2], 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        ops.dora_add(result, x, weight, bias, A, B[:3], mag, 1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.dora_add(result, x, weight, bias, A, B, mag, 1.0, -0.1)
    with pytest.raises(ValueError, match="norm must be"):
        ops.dora_add(result, x, weight, bias, A, B, mag, 1.0, norm=torch.ones(2))


def test_embeddings_add_onto_a_given_result():
    """dora_embedding and lora_embedding with `result=` (the output earlier adapters left) against
    float64: scale ⊙ (result + s·A[:, ids]ᵀBᵀ) and result + s·A[:, ids]ᵀBᵀ."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    weight = torch.randn(11, 6, generator=g)
    A, B = torch.randn(2, 11, generator=g), torch.randn(6, 2, generator=g)
    mag = torch.rand(6, generator=g) + 0.5
    result = torch.randn(3, 5, 6, generator=g)
    lora = (A.double().T[ids] @ B.double().T) * 0.7
    scale = mag.double() / torch.linalg.norm(weight.double().T + 0.7 * B.double() @ A.double(), dim=1)
    assert _rel(ops.dora_embedding(ids, weight, A, B, mag, 0.7, result=result), scale * (result.double() + lora)) < 1e-6
    assert _rel(ops.lora_embedding(ids, weight, A, B, 0.7, result=result), result.double() + lora) < 1e-6
    with pytest.raises(ValueError, match=r"result must have the lookup's shape \(3, 5, 6\)"):
        ops.dora_embedding(ids, weight, A, B, mag, 0.7, result=result[:, :2])
    with pytest.raises(ValueError, match=r"result must have the lookup's shape \(3, 5, 6\)"):
        ops.lora_embedding(ids, weight, A, B, 0.7, result=result[..., :2])
