"""Helpers the Triton kernel tests share: device choice, error measure, random inputs."""

from __future__ import annotations

import pytest
import torch

from peft_fast.ops import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under the interpreter bf16 tl.dot is wrong (Triton 3.9), so bf16 runs only on a GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def require_triton() -> None:
    """Skip the calling test when the Triton backend cannot run here."""
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


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
