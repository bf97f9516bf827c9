"""`peft_fast.ops.lora_linear` on each kernel backend (peft_fast/ops/triton/lora.py with
kernels/lora_shrink.py, lora_expand.py, lora_adapter_grad.py, dropout.py, tiles.py, configs.py;
peft_fast/ops/cuda/lora.py with csrc/sgmv_*.cu) against the float64 reference
(peft_fast/ops/reference.py). Tests taking `backend` run on both: "triton" on CPU under
Triton's interpreter (set in tests/conftest.py, so shapes stay tiny), "triton_composite" (the
cuBLAS composite, peft_fast/ops/triton/lora_composite.py with kernels/lora_grad_dy.py and
lora_expand_add_) likewise, "cuda" on a GPU only (skipped cleanly, with the reason, elsewhere).
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    DEVICE,
    KERNEL_DTYPES,
    LORA_BACKENDS,
    assert_close_to_oracle,
    dropout_keep_mask,
    gpu_only,
    grads_of,
    kernel_op,
    leaf,
    lora_case,
    randn,
    rel_err,
    require_backend,
    require_cuda_kernels,
    require_triton,
)

import peft_fast
from peft_fast.ops import dispatch, reference


@pytest.fixture(params=LORA_BACKENDS)
def backend(request):
    return require_backend(request.param)


@pytest.fixture
def triton_backend():
    require_triton()


def _run(backend, x, W, b, A, B, dy, dtype, adapter_dtype, scaling=0.5, p=0.0, training=True):
    """(y, [dx, dA, dB]) of `peft_fast.ops.lora_linear` on `backend` with inputs cast."""
    xs, As, Bs = leaf(x, dtype), leaf(A, adapter_dtype), leaf(B, adapter_dtype)
    bs = b.to(dtype) if b is not None else None
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.lora_linear(xs, W.to(dtype), bs, As, Bs, scaling, p, training)
    return y, grads_of(y, dy, [xs, As, Bs])


def _oracle(x, W, b, A, B, dy, dtype, adapter_dtype, scaling=0.5):
    """float64 reference on the same (rounded) values the kernels see."""
    rounded = [t.to(d).double() if t is not None else None for t, d in
               ((x, dtype), (W, dtype), (b, dtype), (A, adapter_dtype), (B, adapter_dtype))]  # fmt: skip
    x64, W64, b64, A64, B64 = rounded
    x64, A64, B64 = (t.requires_grad_() for t in (x64, A64, B64))
    y = reference.lora_linear(x64, W64, b64, A64, B64, scaling)
    return y, grads_of(y, dy.to(dtype).double(), [x64, A64, B64])


def _check(backend, case, dtype, adapter_dtype):
    """y, dx, dA, dB of `backend` vs the float64 oracle (the 2x-torch-error rule below fp32)."""
    y64, g64 = _oracle(*case, dtype, adapter_dtype)
    y_k, g_k = _run(backend, *case, dtype, adapter_dtype)
    y_to, g_to = (None, [None] * 3)
    if dtype != torch.float32 or adapter_dtype != torch.float32:
        y_to, g_to = _run("torch", *case, dtype, adapter_dtype)
    assert y_k.dtype == dtype and y_k.shape == y64.shape
    low = dtype if dtype != torch.float32 else adapter_dtype
    for name, got, want, base in zip(("y", "dx", "dA", "dB"), [y_k] + g_k, [y64] + g64, [y_to] + g_to):
        assert got.dtype == (dtype if name in ("y", "dx") else adapter_dtype), name
        assert_close_to_oracle(name, got, want, low, base)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", [1, 5, 16])
@pytest.mark.parametrize("M,K,N", [(1, 7, 33), (7, 33, 100), (33, 100, 7), (100, 16, 64)])
def test_matches_fp64_reference(backend, M, K, N, r, bias, dtype):
    _check(backend, lora_case(M, K, N, r, bias=bias), dtype, dtype)


@pytest.mark.parametrize("r", [33, 64, 100, 256])
def test_large_and_non_power_of_two_rank(backend, r):
    _check(backend, lora_case(20, 48, 40, r), torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_low_precision_base_with_fp32_adapters(backend, dtype):
    _check(backend, lora_case(33, 100, 40, 8), dtype, torch.float32)


def test_3d_input(backend):
    _check(backend, lora_case(7, 33, 20, 4, lead=(3,)), torch.float32, torch.float32)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "conv1d_weight", "row_padded"])
def test_strided_inputs(backend, layout):
    x, W, b, A, B, dy = lora_case(9, 40, 24, 4)
    y64, g64 = _oracle(x, W, b, A, B, dy, torch.float32, torch.float32)
    W32 = W.float()
    if layout == "sliced":  # last-dim stride 2: a strided view of a leaf, no copy
        base = torch.stack([x, -x], dim=-1).float().requires_grad_()
        xs = base[..., 0]
    elif layout == "transposed":  # column-major x
        base = x.t().float().contiguous().requires_grad_()
        xs = base.t()
    elif layout == "row_padded":  # rows of stride 41: unaligned rows (the CUDA kernels' scalar path)
        base = torch.cat([x, x[:, :1]], 1).float().requires_grad_()
        xs = base[:, :40]
    else:  # GPT-2's Conv1D stores W as (in, out): the op gets a transposed view
        base = xs = leaf(x, torch.float32)
        W32 = W.t().float().contiguous().t()
    assert not xs.is_contiguous() or not W32.is_contiguous()
    As, Bs = leaf(A, torch.float32), leaf(B, torch.float32)
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.lora_linear(xs, W32, b.float(), As, Bs, 0.5)
    gx, gA, gB = torch.autograd.grad(y, [xs, As, Bs], dy.float())
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, gx, gA, gB), [y64] + g64):
        assert rel_err(got, want) < 1e-5, name


def test_frozen_base_grads_when_required(backend):
    """W and b are frozen in LoRA, but if they require grad their gradients are right too."""
    x, W, b, A, B, dy = lora_case(10, 24, 20, 3)
    args = [leaf(t, torch.float32) for t in (x, W, b, A, B)]
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.lora_linear(*args, 0.5)
    got = torch.autograd.grad(y, args, dy.float())
    want_args = [leaf(t, torch.float64) for t in (x, W, b, A, B)]
    want = torch.autograd.grad(reference.lora_linear(*want_args, 0.5), want_args, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


# ---- dropout ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_dropout_backward_uses_forward_mask(backend, dtype):
    """Forward and every gradient equal the float64 formula applied to x ⊙ mask / (1-p),
    with the mask the forward applies for the seed: backward applied the forward's mask."""
    p, s, r = 0.3, 0.5, 5
    M, K, N = (67, 136, 48) if DEVICE == "cuda" else (33, 40, 24)  # tiny under the interpreter
    x, W, b, A, B, dy = lora_case(M, K, N, r)
    seed = torch.tensor([4321], dtype=torch.int64, device=DEVICE)
    keep = dropout_keep_mask(backend, seed, M, K, p).double()
    assert 0.6 < keep.mean().item() < 0.8
    xs, As, Bs = leaf(x, dtype), leaf(A, dtype), leaf(B, dtype)
    y = kernel_op("lora_linear", backend)(xs, W.to(dtype), b.to(dtype), As, Bs, s, p, seed)[0]
    got = [y] + grads_of(y, dy, [xs, As, Bs])
    x64, A64, B64 = (leaf(t.to(dtype), torch.float64) for t in (x, A, B))
    W64, b64 = W.to(dtype).double(), b.to(dtype).double()
    y64 = x64 @ W64.t() + b64 + s * ((x64 * keep / (1 - p)) @ A64.t()) @ B64.t()
    want = [y64] + grads_of(y64, dy.to(dtype).double(), [x64, A64, B64])
    # fp32: accumulation error only; fp16/bf16: inputs rounded alike, so the error is the
    # kernels' low-precision products (unit roundoff 2^-11 / 2^-8 over K <= 136 terms).
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert rel_err(g, w) < tol, name


def test_dropout_fresh_mask_each_call_reproducible_with_seed_and_off_in_eval(backend):
    x, W, b, A, B, _ = lora_case(16, 32, 16, 4)
    args = [t.float() for t in (x, W, b, A, B)]
    with peft_fast.use_backend(backend):
        torch.manual_seed(0)
        y1 = peft_fast.ops.lora_linear(*args, 1.0, 0.5, True)
        y2 = peft_fast.ops.lora_linear(*args, 1.0, 0.5, True)
        torch.manual_seed(0)
        y3 = peft_fast.ops.lora_linear(*args, 1.0, 0.5, True)
        y_eval = peft_fast.ops.lora_linear(*args, 1.0, 0.5, False)
    assert not torch.equal(y1, y2)
    assert torch.equal(y1, y3)
    assert rel_err(y_eval, reference.lora_linear(x, W, b, A, B, 1.0)) < 1e-5


def test_dropout_mask_keep_rate(triton_backend):
    from peft_fast.kernels.dropout import dropout_mask

    for p in (0.1, 0.5):
        seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
        keep = dropout_mask(seed, 64, 100, p, DEVICE).double().mean().item()
        n = 64 * 100
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(keep - (1 - p)) < 5 * sigma, (p, keep)


def test_shrink_applies_the_debug_mask(triton_backend):
    """Recover the kernel's mask independently: with A = I, h = dropout(x)/(1-p) is x's
    dropped copy itself; its zeros are the mask `dropout_mask` reports."""
    from peft_fast.kernels.dropout import dropout_mask
    from peft_fast.kernels.lora_shrink import lora_shrink

    M, K, p = 50, 32, 0.4
    x = randn(M, K, dtype=torch.float32)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    h = lora_shrink(x, torch.eye(K, device=DEVICE), 1 / (1 - p), p, seed)
    keep = dropout_mask(seed, M, K, p, DEVICE)
    assert torch.equal(h != 0, keep)
    torch.testing.assert_close(h[keep], x[keep] / (1 - p))


@gpu_only
def test_cuda_dropout_mask_equals_triton_mask():
    """Same seed, same numbering, same Philox: the two kernel backends drop the same elements."""
    require_cuda_kernels()
    require_triton()
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    assert torch.equal(dropout_keep_mask("cuda", seed, 50, 64, 0.4), dropout_keep_mask("triton", seed, 50, 64, 0.4))


# ---- errors, dispatch, torch.library ------------------------------------------------------


def test_op_errors_name_the_argument(backend):
    x, W, b, A, B = (randn(*s, dtype=torch.float32) for s in ((4, 8), (6, 8), (6,), (2, 8), (6, 2)))
    with peft_fast.use_backend(backend):
        with pytest.raises(ValueError, match="lora_B"):
            peft_fast.ops.lora_linear(x, W, b, A, B[:5], 1.0)
        with pytest.raises(ValueError, match="dropout_p"):
            peft_fast.ops.lora_linear(x, W, b, A, B, 1.0, 1.0)
        with pytest.raises(TypeError, match="lora_A and lora_B"):
            peft_fast.ops.lora_linear(x, W, b, A, B.half(), 1.0)
        with pytest.raises(ValueError, match="bias"):
            peft_fast.ops.lora_linear(x, W, b[:3], A, B, 1.0)


def test_dispatch_selects_the_backend_and_falls_back(backend):
    import importlib

    module = importlib.import_module(
        {"triton_composite": "peft_fast.ops.triton.lora_composite"}.get(backend, f"peft_fast.ops.{backend}.lora")
    )
    x, W, b, A, B = (randn(*s, dtype=torch.float32) for s in ((4, 8), (6, 8), (6,), (2, 8), (6, 2)))
    with peft_fast.use_backend(backend):
        assert dispatch.select("lora_linear", x, W, b, A, B, 1.0) is module.lora_linear
        # integer tensors cannot go to the kernels: dispatch falls back to the reference
        assert dispatch.select("lora_linear", x.long(), W, b, A, B, 1.0) is reference.lora_linear
    assert module.supports(x, W, b, A, B.long(), 1.0) is not None
    if backend == "cuda":  # CPU tensors are not the CUDA kernels'
        assert dispatch.select("lora_linear", *[t.cpu() for t in (x, W, b, A, B)], 1.0) is not module.lora_linear
    if DEVICE == "cpu":
        assert "TRITON_INTERPRET" not in (module.supports(x, W, b, A, B, 1.0) or "")
        with peft_fast.use_backend("auto"):  # the interpreter is never chosen by "auto"
            assert dispatch.select("lora_linear", x, W, b, A, B, 1.0) is reference.lora_linear


def test_dispatch_reason_without_interpreter(triton_backend, monkeypatch):
    from peft_fast.ops.triton import lora as lora_triton

    x = torch.randn(4, 8)
    with peft_fast.use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        why = lora_triton.supports(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0)
        assert why is not None and "TRITON_INTERPRET" in why
        # the backend itself now reports why it cannot run, and refuses to be chosen
        assert "TRITON_INTERPRET" in peft_fast.available_backends()["triton"]
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            peft_fast.set_backend("triton")


def test_opcheck_custom_ops(backend):
    x, W, b, A, B = (randn(*s, dtype=torch.float32) for s in ((9, 16), (12, 16), (12,), (3, 16), (12, 3)))
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    A.requires_grad_()
    B.requires_grad_()
    for p, sd in ((0.0, None), (0.2, seed)):
        torch.library.opcheck(kernel_op("lora_linear", backend).default, (x, W, b, A, B, 0.5, p, sd))


def test_torch_compile_fullgraph(backend):
    """No graph break through dispatch and the custom ops; the compiled output and gradients
    match the float64 reference first, then the eager op (aot_eager: no C++ compiler needed
    on CPU; the GPU test below uses inductor)."""
    case = lora_case(8, 16, 12, 4)
    y64, g64 = _oracle(*case, torch.float32, torch.float32)
    x, W, b, A, B, dy = case
    args = [leaf(t, torch.float32) for t in (x, W, b, A, B)]

    def f(x, W, b, A, B):
        return peft_fast.ops.lora_linear(x, W, b, A, B, 0.5)

    with peft_fast.use_backend(backend):
        eager = f(*args)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    got = [compiled] + grads_of(compiled, dy, [args[0], args[3], args[4]])
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, [y64] + g64):
        assert rel_err(g, w) < 1e-5, name
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(got[1:], grads_of(eager, dy, [args[0], args[3], args[4]])):
        torch.testing.assert_close(g, e)


# ---- Triton launchers on their own -----------------------------------------------------------


def test_launchers_direct(triton_backend):
    """Each launcher alone: lora_shrink, lora_expand and lora_adapter_grad vs torch."""
    from peft_fast.kernels.lora_adapter_grad import lora_adapter_grad
    from peft_fast.kernels.lora_expand import lora_expand
    from peft_fast.kernels.lora_shrink import lora_shrink

    M, K, N, r = 37, 50, 21, 3
    x, W, A, B, dy = (randn(*s, dtype=torch.float32) for s in ((M, K), (N, K), (r, K), (N, r), (M, N)))
    b = randn(N, dtype=torch.float32)
    h = lora_shrink(x, A, 2.0)
    assert h.dtype == torch.float32 and rel_err(h, 2 * x.double() @ A.double().t()) < 1e-5
    y = lora_expand(x, W, b, h, B, alpha=0.25)
    assert rel_err(y, x.double() @ W.double().t() + b.double() + 0.25 * h.double() @ B.double().t()) < 1e-5
    y = lora_expand(x, W, None, None, None)
    assert rel_err(y, x.double() @ W.double().t()) < 1e-5
    dB = lora_adapter_grad(h, dy, torch.float32, 0.5, transpose=True)
    assert dB.shape == (N, r) and rel_err(dB, 0.5 * dy.double().t() @ h.double()) < 1e-5
    empty = lora_shrink(x[:0], A)
    assert empty.shape == (0, r)


def test_launcher_errors_name_the_argument(triton_backend):
    from peft_fast.kernels.lora_expand import lora_expand
    from peft_fast.kernels.lora_shrink import lora_shrink

    x = randn(4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="lora_A"):
        lora_shrink(x, randn(2, 9, dtype=torch.float32))
    with pytest.raises(ValueError, match="seed"):
        lora_shrink(x, randn(2, 8, dtype=torch.float32), dropout_p=0.5)
    with pytest.raises(TypeError, match="weight"):
        lora_expand(x, randn(3, 8, dtype=torch.float16), None, None, None)


def test_matmul_operand_check(triton_backend):
    from peft_fast.kernels.tiles import check_matmul_operands

    x = randn(4, 8, dtype=torch.float32)
    assert check_matmul_operands(x, randn(6, 8, dtype=torch.float32)) == (4, 8, 6)
    with pytest.raises(ValueError, match="weight"):
        check_matmul_operands(x, randn(6, 7, dtype=torch.float32))


def test_configs_table(triton_backend):
    from peft_fast.kernels.configs import matmul_config, rank_block, skinny_config

    assert [rank_block(r) for r in (1, 16, 17, 64, 256)] == [16, 16, 32, 64, 64]
    cfg = matmul_config(torch.device(DEVICE), torch.float16)
    for b in (cfg.block_m, cfg.block_n, cfg.block_k, skinny_config(torch.device(DEVICE), 5).block_n):
        assert b >= 16 and b & (b - 1) == 0


# ---- GPU only --------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "M,K,N,r",
    [(M, K, N, 33) for M, K, N in ((1, 7, 33), (7, 33, 100), (33, 100, 7), (100, 16, 64))]
    + [(257, 520, 136, r) for r in (1, 5, 16, 33)],
)
def test_gpu_rank_33_and_multi_tile_shape(backend, M, K, N, r, bias, dtype):
    _check(backend, lora_case(M, K, N, r, bias=bias), dtype, dtype)


@gpu_only
def test_cuda_kernel_op_errors_name_the_argument():
    require_cuda_kernels()
    x, A = (t.float() for t in lora_case(4, 8, 6, 2)[:4:3])
    with pytest.raises(ValueError, match="keep"):  # dropout reads the keep bytes, drawn by keep_bytes_cuda
        torch.ops.peft_fast.sgmv_shrink_cuda(x, A, None, [0, 4], [0], [2], [1.0], [0.5], None, 2)
    bad_keep = torch.zeros(4, 2, dtype=torch.uint8, device=x.device)  # (4, ceil(8/8)) = (4, 1) expected
    with pytest.raises(ValueError, match="keep must be"):
        torch.ops.peft_fast.sgmv_shrink_cuda(x, A, None, [0, 4], [0], [2], [1.0], [0.5], bad_keep, 2)
    with pytest.raises(ValueError, match="seed"):
        torch.ops.peft_fast.keep_bytes_cuda(x.new_zeros(1, dtype=torch.float32), 4, 8, None, [0, 4], [0.5])
    with pytest.raises(ValueError, match="seg_starts"):
        torch.ops.peft_fast.sgmv_shrink_cuda(x, A, None, [0, 9], [0], [2], [1.0], [0.0], None, 2)


@gpu_only
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K,N,r", [(1000, 1024, 1536, 16), (333, 4096, 1024, 64), (64, 512, 512, 256)])
def test_gpu_bf16_larger_shapes(backend, M, K, N, r, adapter_dtype):
    _check(backend, lora_case(M, K, N, r), torch.bfloat16, adapter_dtype)


@gpu_only
def test_gpu_bf16_dropout_mask_consistent(backend):
    p = 0.1
    x, W, b, A, B, dy = lora_case(512, 1024, 768, 16)
    seed = torch.tensor([77], dtype=torch.int64, device=DEVICE)
    xs, As, Bs = leaf(x, torch.bfloat16), leaf(A, torch.bfloat16), leaf(B, torch.bfloat16)
    y = kernel_op("lora_linear", backend)(xs, W.bfloat16(), b.bfloat16(), As, Bs, 0.5, p, seed)[0]
    gx, gA, gB = grads_of(y, dy, [xs, As, Bs])
    keep = dropout_keep_mask(backend, seed, 512, 1024, p).double()
    x64, A64, B64 = (leaf(t.bfloat16(), torch.float64) for t in (x, A, B))
    y64 = x64 @ W.bfloat16().double().t() + b.bfloat16().double() + 0.5 * ((x64 * keep / (1 - p)) @ A64.t()) @ B64.t()
    want = [y64] + grads_of(y64, dy.bfloat16().double(), [x64, A64, B64])
    for name, g, w in zip(("y", "dx", "dA", "dB"), (y, gx, gA, gB), want):
        assert rel_err(g, w) < 2e-2, name


@gpu_only
def test_gpu_torch_compile_inductor(backend):
    """Inductor-compiled, with dropout: the output and every gradient match the float64
    formula on the mask the forward applied (recovered for the seed the op draws), then the
    eager op with the same seed."""
    p, s = 0.1, 0.5
    x, W, b, A, B, dy = lora_case(256, 512, 384, 16)
    args = [leaf(t, torch.bfloat16) for t in (x, W, b, A, B)]

    def f(x, W, b, A, B):
        return peft_fast.ops.lora_linear(x, W, b, A, B, s, p, True)

    with peft_fast.use_backend(backend):
        torch._dynamo.reset()
        torch.manual_seed(0)
        compiled = torch.compile(f, fullgraph=True)(*args)
        got = [compiled] + grads_of(compiled, dy, [args[0], args[3], args[4]])
        torch.manual_seed(0)
        eager = f(*args)
        want_eager = [eager] + grads_of(eager, dy, [args[0], args[3], args[4]])
    torch.manual_seed(0)
    seed = torch.randint(0, 2**31 - 1, (1,), device=DEVICE, dtype=torch.int64)  # the op's draw
    keep = dropout_keep_mask(backend, seed, 256, 512, p).double()
    x64, A64, B64 = (leaf(t.bfloat16(), torch.float64) for t in (x, A, B))
    y64 = x64 @ W.bfloat16().double().t() + b.bfloat16().double() + s * ((x64 * keep / (1 - p)) @ A64.t()) @ B64.t()
    want = [y64] + grads_of(y64, dy.bfloat16().double(), [x64, A64, B64])
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert rel_err(g, w) < 2e-2, name  # bf16: unit roundoff 2^-8, errors averaging out over K
    for g, e in zip(got, want_eager):
        torch.testing.assert_close(g, e)
