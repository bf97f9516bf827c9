"""What the Triton backend's ops share: can this call run on Triton (argument checks live in
checks.py, shared with the CUDA backend, and are re-exported here).

Only the Triton ops modules import this (lazily, through dispatch), so importing peft_fast
never imports Triton.
"""

from __future__ import annotations

import torch

from .checks import KERNEL_DTYPES, check_linear_args, size_reason, tensors_reason
from .dispatch import get_backend, interpreter_enabled

__all__ = ["KERNEL_DTYPES", "check_linear_args", "device_reason", "size_reason"]


def device_reason(named: dict[str, torch.Tensor | None]) -> str | None:
    """None when every tensor in `named` can go to a Triton kernel, else why not: tensors on
    one CUDA device, fp16/bf16/fp32, no autocast. CPU tensors go to Triton's interpreter
    only under TRITON_INTERPRET=1 *and* an explicit "triton" backend: the interpreter is a
    testing tool, so "auto" keeps CPU work on the torch path."""
    why, device = tensors_reason(named)
    if why is not None:
        return why
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
