"""The Triton backend: one module per op, each in the same order (custom ops + fakes,
autograd, public function, `supports`, registration with dispatch):

    lora.py    lora_linear          peft_fast::lora_linear_triton_{fwd,bwd}
    ia3.py     ia3_linear           peft_fast::ia3_linear_triton_{fwd,bwd}
    mixed.py   lora_linear_mixed    peft_fast::lora_linear_mixed_triton_{fwd,bwd}
    lora_composite.py  lora_linear  peft_fast::lora_linear_composite_{fwd,bwd}, the "triton_composite"
                                    backend (cuBLAS base products + Triton adapter passes)
    loha.py    loha_linear          peft_fast::loha_linear_triton_{fwd,bwd}
    lokr.py    lokr_linear          peft_fast::lokr_linear_triton_{fwd,bwd}
    xlora.py   xlora_linear         peft_fast::xlora_linear_triton_{fwd,bwd}
    dora.py    dora_linear          peft_fast::dora_linear_triton_{fwd,bwd}  (+ dora_weight_norm)
    qlora.py   lora_linear_4bit     peft_fast::lora_linear_4bit_triton_{fwd,bwd}  (+ dequantize_4bit)

Kernels live in `peft_fast.kernels` (kernels/ at the repo root). This file holds what the
three share: can a call run on Triton (`device_reason`); argument checks are ops/checks.py,
shared with the CUDA backend. Dispatch imports the op modules lazily; this package itself
imports neither Triton nor the kernels, so importing peft_fast never needs Triton.
"""

from __future__ import annotations

import torch

from ..checks import tensors_reason
from ..dispatch import get_backend, interpreter_enabled

__all__ = ["device_reason"]


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
        if get_backend() not in ("triton", "triton_composite"):
            return "CPU tensors run on Triton's interpreter only when backend 'triton' or 'triton_composite' is chosen"
        if any(t is not None and t.dtype == torch.bfloat16 for t in named.values()):
            # Triton 3.9's interpreter returns garbage from bf16 tl.dot (errors up to 4e10).
            return "Triton's interpreter computes bf16 tl.dot wrongly; bf16 CPU tensors take the torch path"
    elif device.type != "cuda":
        return f"device {device} is neither CUDA nor CPU"
    if torch.is_autocast_enabled(device.type):
        return f"autocast is enabled on {device.type}; the torch path follows its casting rules"
    return None
