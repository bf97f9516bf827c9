"""Helpers the kernel tests (Triton and CUDA backends) share: device choice, error measure,
random inputs and the LoRA / IA³ cases."""

from __future__ import annotations

import pytest
import torch

import peft_fast
from peft_fast.ops import dispatch, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under the interpreter bf16 tl.dot is wrong (Triton 3.9), so bf16 runs only on a GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def require_triton() -> None:
    """Skip the calling test when the Triton backend cannot run here."""
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


def require_cuda_kernels() -> None:
    """Skip the calling test when the CUDA C++ backend cannot run here (no device, no nvcc, build failed)."""
    reason = dispatch.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int | None = None) -> torch.Tensor:
    """Fresh standard-normal values on DEVICE (never zeros), optionally from a fixed seed."""
    g = None
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def grads_of(y: torch.Tensor, dy: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of `(y * dy).sum()` with respect to `inputs` (all must require grad)."""
    return list(torch.autograd.grad(y, inputs, dy.to(y.dtype)))


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh leaf copy of `t` in `dtype` that requires grad."""
    return t.detach().to(dtype).requires_grad_(True)


def assert_close_to_oracle(
    name: str, got: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, torch_path: torch.Tensor | None = None
) -> None:
    """fp32 within 1e-5 of the float64 oracle; lower precision within twice the error of
    the same-dtype unfused torch path (plus a small floor for near-exact cases)."""
    err = rel_err(got, oracle)
    if dtype == torch.float32:
        assert err < 1e-5, f"{name}: fp32 relative error {err:.3g}"
        return
    assert torch_path is not None
    bound = 2 * rel_err(torch_path, oracle) + 1e-4
    assert err <= bound, f"{name}: {dtype} relative error {err:.3g} > 2 x torch's ({bound:.3g})"


def lora_case(M, K, N, r, lead=(), bias=True, seed=0):
    """float64 master inputs of one lora_linear call (x, W, b, A, B), plus the output gradient."""
    t = iter(range(seed * 10, seed * 10 + 10))
    x = randn(*lead, M, K, seed=next(t))
    W = randn(N, K, seed=next(t)) / K**0.5
    b = randn(N, seed=next(t)) if bias else None
    A = randn(r, K, seed=next(t)) / K**0.5
    B = randn(N, r, seed=next(t))  # nonzero: HF initialises B to zeros, the test must not
    dy = randn(*lead, M, N, seed=next(t))
    return x, W, b, A, B, dy


def ia3_case(M, K, N, feedforward, lead=(), bias=True, seed=0):
    """float64 master inputs of one ia3_linear call (x, W, b, l), plus the output gradient."""
    t = iter(range(seed * 10, seed * 10 + 10))
    x = randn(*lead, M, K, seed=next(t))
    W = randn(N, K, seed=next(t)) / K**0.5
    b = randn(N, seed=next(t)) if bias else None
    l = 1 + 0.5 * randn(*((1, K) if feedforward else (N, 1)), seed=next(t))
    dy = randn(*lead, M, N, seed=next(t))
    return x, W, b, l, dy


def ia3_run(backend, x, W, b, l, dy, feedforward, dtype, l_dtype, wants_grad=(True, True)):
    """(y, grads of x and/or l) of `peft_fast.ops.ia3_linear` on `backend` with inputs cast."""
    xs, ls = x.detach().to(dtype).requires_grad_(wants_grad[0]), l.detach().to(l_dtype).requires_grad_(wants_grad[1])
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.ia3_linear(xs, W.to(dtype), b.to(dtype) if b is not None else None, ls, feedforward)
    return y, grads_of(y, dy, [t for t, w in zip((xs, ls), wants_grad) if w])


def ia3_check(backend, case, feedforward, dtype, l_dtype):
    """ia3_linear on `backend` vs the float64 reference on the same rounded inputs (y, dx, dl)."""
    x, W, b, l, dy = case
    x64, l64 = leaf(x.to(dtype), torch.float64), leaf(l.to(l_dtype), torch.float64)
    b64 = b.to(dtype).double() if b is not None else None
    y64 = reference.ia3_linear(x64, W.to(dtype).double(), b64, l64, feedforward)
    want = [y64] + grads_of(y64, dy.to(dtype).double(), [x64, l64])
    y, g = ia3_run(backend, *case, feedforward, dtype, l_dtype)
    base = [None] * 3
    if dtype != torch.float32:
        y_t, g_t = ia3_run("torch", *case, feedforward, dtype, l_dtype)
        base = [y_t] + g_t
    assert y.dtype == dtype and g[1].dtype == l_dtype and g[1].shape == l.shape
    for name, got, w, bt in zip(("y", "dx", "dl"), [y] + g, want, base):
        assert_close_to_oracle(name, got, w, dtype, bt)


# Kernel backends the op tests run on: "triton" (on CPU under Triton's interpreter) and
# "cuda" (GPU only; skipped cleanly, with the reason, where the CUDA backend cannot run).
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]
# LoRA has a third: "triton_composite", the cuBLAS composite (torch's base products, Triton's
# adapter passes), on CPU under the interpreter too.
LORA_BACKENDS = ["triton", "triton_composite", pytest.param("cuda", marks=pytest.mark.gpu)]


def require_backend(backend: str) -> str:
    """Skip the calling test when `backend` cannot run here; return its name."""
    (require_triton if backend in ("triton", "triton_composite") else require_cuda_kernels)()
    return backend


def kernel_op(op: str, backend: str, stage: str = "fwd"):
    """`torch.ops.peft_fast.<op>_<backend>_<stage>`: a backend's custom op (its modules loaded
    first: backends register their ops lazily, on first use)."""
    from peft_fast.ops import dispatch

    dispatch.unavailable_reason(backend)
    return getattr(torch.ops.peft_fast, f"{op}_{backend}_{stage}")


def gpu_only(test):
    """Mark `test` as GPU-only (`-m gpu`) and skip it cleanly where there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def dropout_keep_mask(backend: str, seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The (M, K) keep-mask `backend`'s LoRA forward op applies for `seed`, recovered through the
    op itself (not the kernels' own mask helper): with W = 0, A = B = I and scaling 1,
    y = dropout(x)/(1-p) is x's dropped copy. The mixed-batch kernels number elements alike."""
    x = torch.rand(M, K, device=DEVICE) + 0.5  # never zero
    eye = torch.eye(K, device=DEVICE)
    y = kernel_op("lora_linear", backend)(x, torch.zeros(K, K, device=DEVICE), None, eye, eye, 1.0, p, seed)[0]
    keep = y != 0
    torch.testing.assert_close(y[keep], x[keep] / (1 - p))
    return keep
