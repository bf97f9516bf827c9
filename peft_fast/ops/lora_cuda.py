"""CUDA C++ backend of `lora_linear` (csrc/, built as peft_fast._C), registered with dispatch
as the "cuda" implementation: one adapter is one segment of cuda_ops' LoRA ops.

The base product stays on cuBLAS; the adapter path is the shrink kernel (dropout from a
Philox seed, bit-identical to the Triton kernels' mask for the same seed) and an
expand-accumulate into the base output. x may have any leading dims and strides (viewed as
2-D; copied only when its last dimension is not contiguous).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .checks import check_lora_args
from .cuda_ops import adapter_dtype_reason, cuda_reason, new_seed


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """Same contract as `peft_fast.ops.lora_linear`, on the CUDA kernels; gradients reach x,
    lora_A, lora_B, and weight/bias when they require grad."""
    r = check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    in_f, out_f = weight.shape[1], weight.shape[0]
    p = float(dropout_p) if training else 0.0
    x2 = x.reshape(-1, in_f)
    seed = new_seed(x.device) if p > 0.0 else None
    y, _ = torch.ops.peft_fast.cuda_lora_fwd(
        x2, weight, bias, lora_A, lora_B, None, [0, x2.shape[0]], [0], [r], [float(scaling)], [p], seed, r
    )
    return y.reshape(*x.shape[:-1], out_f)


def supports(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
) -> str | None:
    """None when the CUDA kernels can take this call, else the reason (dispatch falls back)."""
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    return cuda_reason(named, x, weight) or adapter_dtype_reason(x, lora_A, "lora_A")


dispatch.register("lora_linear", "cuda", lora_linear, supports)
