"""The CUDA C++ backend (csrc/, built as `peft_fast._C`): one module per op, each in the same
order as the Triton backend's (custom ops + fakes, autograd, public function, `supports`,
registration with dispatch):

    lora.py     lora_linear          peft_fast::lora_linear_cuda_{fwd,bwd}
    ia3.py      ia3_linear           peft_fast::ia3_linear_cuda_{fwd,bwd}
    mixed.py    lora_linear_mixed    peft_fast::lora_linear_mixed_cuda_{fwd,bwd}

plus `library.py` (loads the C++ library, gives its kernel ops `peft_fast::*_cuda` their fake
kernels, and holds the segmented LoRA passes lora.py and mixed.py both run) and `build.py`
(finding, JIT-building and compile-checking csrc/; `python -m peft_fast.ops.cuda.build`).

Importing this package loads nothing: dispatch imports `build` to ask whether the backend can
run, and the op modules (which load or build the library) only when it can.
"""
