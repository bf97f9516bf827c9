"""The seam between layers and kernels: ops take tensors and numbers, dispatch picks a backend."""

from . import dispatch
from .adalora import adalora_linear, orthogonality_norms
from .dispatch import available_backends, get_backend, set_backend, use_backend
from .dora import DoraNormCache, dora_add, dora_embedding, dora_linear, dora_weight_norm
from .ia3 import ia3_linear
from .loha import loha_conv, loha_linear
from .lokr import lokr_conv, lokr_linear
from .lora import lora_embedding, lora_linear, lora_linear_mixed
from .qlora import dequantize_4bit, dora_linear_4bit, ia3_linear_4bit, lora_add, lora_linear_4bit
from .vera import vera_linear
from .xlora import xlora_linear

# One folder per kernel backend, one module per op (see ops/triton/__init__.py and
# ops/cuda/__init__.py); dispatch imports them on first use. The CUDA modules load or
# JIT-build the C++ library (csrc/, peft_fast._C) when imported.
for _backend in ("triton", "cuda"):
    for _op in ("lora", "ia3", "mixed"):
        dispatch.register_backend_module(_backend, f"peft_fast.ops.{_backend}.{_op}")
dispatch.register_backend_module("triton", "peft_fast.ops.triton.qlora")
# The cuBLAS composite: Triton adapter passes around torch's base products ("auto"'s LoRA default).
dispatch.register_backend_module("triton_composite", "peft_fast.ops.triton.lora_composite")
for _op in ("loha", "lokr"):
    dispatch.register_backend_module("triton", f"peft_fast.ops.triton.{_op}")
dispatch.register_backend_module("triton", "peft_fast.ops.triton.xlora")
dispatch.register_backend_module("triton", "peft_fast.ops.triton.dora")

__all__ = [
    "DoraNormCache",
    "adalora_linear",
    "available_backends",
    "dora_add",
    "dora_embedding",
    "dora_linear",
    "dora_linear_4bit",
    "dora_weight_norm",
    "dequantize_4bit",
    "get_backend",
    "ia3_linear",
    "ia3_linear_4bit",
    "loha_conv",
    "loha_linear",
    "lokr_conv",
    "lokr_linear",
    "lora_add",
    "lora_embedding",
    "lora_linear",
    "lora_linear_4bit",
    "lora_linear_mixed",
    "orthogonality_norms",
    "set_backend",
    "use_backend",
    "vera_linear",
    "xlora_linear",
]
