"""The seam between layers and kernels: ops take tensors and numbers, dispatch picks a backend."""

from . import dispatch
from .dispatch import available_backends, get_backend, set_backend, use_backend
from .ia3 import ia3_linear
from .loha import loha_conv, loha_linear
from .lokr import lokr_conv, lokr_linear
from .lora import lora_embedding, lora_linear, lora_linear_mixed

dispatch.register_backend_module("triton", "peft_fast.ops.lora_triton")
dispatch.register_backend_module("triton", "peft_fast.ops.ia3_triton")
dispatch.register_backend_module("triton", "peft_fast.ops.sgmv_triton")
# CUDA C++ kernels (csrc/, peft_fast._C): importing these loads or JIT-builds the library.
dispatch.register_backend_module("cuda", "peft_fast.ops.lora_cuda")
dispatch.register_backend_module("cuda", "peft_fast.ops.sgmv_cuda")
dispatch.register_backend_module("cuda", "peft_fast.ops.ia3_cuda")

__all__ = [
    "available_backends",
    "get_backend",
    "ia3_linear",
    "loha_conv",
    "loha_linear",
    "lokr_conv",
    "lokr_linear",
    "lora_embedding",
    "lora_linear",
    "lora_linear_mixed",
    "set_backend",
    "use_backend",
]
