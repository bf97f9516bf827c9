"""What the Triton backend's ops share: can this call run on Triton, and argument checks.

Only the Triton ops modules import this (lazily, through dispatch), so importing peft_fast
never imports Triton.
"""

from __future__ import annotations

import torch

from .dispatch import get_backend, interpreter_enabled

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def device_reason(named: dict[str, torch.Tensor | None]) -> str | None:
    """None when every tensor in `named` can go to a Triton kernel, else why not: tensors on
    one CUDA device, fp16/bf16/fp32, no autocast. CPU tensors go to Triton's interpreter
    only under TRITON_INTERPRET=1 *and* an explicit "triton" backend: the interpreter is a
    testing tool, so "auto" keeps CPU work on the torch path."""
    tensors = {k: t for k, t in named.items() if t is not None}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor ({type(t).__name__})"
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} has dtype {t.dtype}; kernels take {KERNEL_DTYPES}"
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        return f"tensors on several devices: {sorted(map(str, devices))}"
    (device,) = devices
    if device.type == "cpu":
        if not interpreter_enabled():
            return "CPU tensors need TRITON_INTERPRET=1"
        if get_backend() != "triton":
            return "CPU tensors run on Triton's interpreter only when backend 'triton' is chosen"
    elif device.type != "cuda":
        return f"device {device} is neither CUDA nor CPU"
    if torch.is_autocast_enabled(device.type):
        return f"autocast is enabled on {device.type}; the torch path follows its casting rules"
    return None


def size_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when x, weight and the (..., out) output stay below 2**31 elements (the kernels'
    int32 offsets), else why not. Shapes are not validated here."""
    if weight.dim() != 2 or x.dim() < 1:
        return None
    rows = x.numel() // max(1, x.shape[-1])
    biggest = max(x.numel(), weight.numel(), rows * weight.shape[0])
    if biggest >= 2**31:
        return f"a tensor of {biggest} elements exceeds the kernels' int32 offsets"
    return None


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer's arguments; ValueError/TypeError
    naming the argument when x (..., in), weight (out, in) or bias (out,) do not fit."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (..., in_features), got {getattr(x, 'shape', x)!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got {getattr(weight, 'shape', weight)!r}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension must be weight's in_features {in_f}, got {x.shape[-1]}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    return in_f, out_f
