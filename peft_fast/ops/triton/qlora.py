"""Triton backend of the QLoRA ops: `dequantize_4bit` (kernel: kernels/nf4_dequant.py).

The fused 4-bit matmul (dequantize inside the K loop, LoRA expand in the epilogue) is not
here yet: `lora_linear_4bit` and `ia3_linear_4bit` run on the reference path on every backend.
"""

from __future__ import annotations

import torch

from peft_fast.kernels.nf4_dequant import dequantize_4bit as _dequantize_kernel

from ...quant.formats import QuantState4bit, code_4bit
from .. import dispatch
from . import device_reason


def dequantize_4bit(state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`ops.qlora.dequantize_4bit` on the Triton kernel."""
    return _dequantize_kernel(
        state.packed_bytes(),
        code_4bit(state.quant_type, state.packed.device),
        state.absmax,
        state.shape,
        state.blocksize,
        state.dtype if dtype is None else dtype,
        absmax2=state.absmax2,
        code2=state.code2,
        offset=state.offset,
        blocksize2=state.blocksize2,
    )


def _supports(packed: torch.Tensor, state: QuantState4bit, dtype: torch.dtype | None) -> str | None:
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"output dtype {dtype} is not a float dtype"
    devices = {t.device for t in (packed, state.absmax, state.absmax2, state.offset) if t is not None}
    if len(devices) != 1:
        return f"the quant state's tensors are on several devices: {sorted(map(str, devices))}"
    # The packed codes are uint8: ask about the device with an empty float probe on it.
    return device_reason({"packed": torch.empty(0, device=packed.device)})


dispatch.register("dequantize_4bit", "triton", dequantize_4bit, _supports)
