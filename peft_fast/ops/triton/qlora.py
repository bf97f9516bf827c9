"""Triton backend of the QLoRA ops: `dequantize_4bit` (kernels/nf4_dequant.py) and
`lora_linear_4bit` on the fused 4-bit matmul (kernels/qlora_matmul.py):

Forward:   h = x Aᵀ                                lora_shrink, fp32 (M × r)
           y = x Wᵀ + b + s · h Bᵀ                 qlora_matmul: W's 4-bit tiles decoded in the
                                                   K loop, the expand fused in the epilogue
Backward:  dh = s · dy B;  dB = s · dyᵀ h;  dA = dhᵀ x      lora_shrink, lora_adapter_grad
           dx = dy W + dh A                        qlora_matmul over W untransposed, Aᵀ fused
The full dequantized W is never written: forward and backward decode it tile by tile from the
packed codes (M <= 16: the split-K decode variant). Saved for backward: x, h, A, B and the
quant state (the packed weight itself, no copy).

"auto" policy: on CPU tensors "auto" always takes the torch path (dispatch's rule). On CUDA it
takes these kernels only where the backend table (`peft-fast bench --write-table`) has a
measurement for `lora_linear_4bit` at the call's shape class; with none (the shipped table:
no GPU has measured them yet) it keeps the torch composition (bitsandbytes' dequantizer +
cuBLAS), which "auto" must never be slower than. `set_backend("triton")` asks for them.
Dropout in training, and `ia3_linear_4bit`, stay on the torch path for now.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peft_fast.kernels.lora_adapter_grad import lora_adapter_grad
from peft_fast.kernels.lora_shrink import lora_shrink
from peft_fast.kernels.nf4_dequant import dequantize_4bit as _dequantize_kernel
from peft_fast.kernels.qlora_matmul import qlora_matmul

from ...quant.formats import QuantState4bit, code_4bit
from .. import dispatch
from ..checks import size_reason
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


def _matmul(a: Tensor, state: QuantState4bit, transpose: bool, **kw) -> Tensor:
    """qlora_matmul over `state`'s weight (see kernels/qlora_matmul.py)."""
    return qlora_matmul(
        a, state.packed_bytes(), code_4bit(state.quant_type, a.device), state.absmax, state.shape, state.blocksize,
        transpose=transpose, absmax2=state.absmax2, code2=state.code2, offset=state.offset,
        blocksize2=state.blocksize2, **kw,
    )  # fmt: skip


class _LoraLinear4bit(torch.autograd.Function):
    """`x Wᵀ + b + s · x Aᵀ Bᵀ` for 2-D x with W in 4 bits; the base product in `compute_dtype`."""

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, state, scaling, compute_dtype):
        h = lora_shrink(x, lora_A, 1.0)
        b = None if bias is None else bias.to(compute_dtype)
        y = _matmul(x.to(compute_dtype), state, True, bias=b, h=h, lora_B=lora_B, alpha=scaling)
        ctx.save_for_backward(x, h, lora_A, lora_B)
        ctx.state, ctx.scaling, ctx.compute_dtype = state, scaling, compute_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, h, lora_A, lora_B = ctx.saved_tensors
        s, adapter_dtype = ctx.scaling, lora_A.dtype
        dx = dbias = dA = dB = None
        dh = lora_shrink(dy, lora_B.t(), s)
        if ctx.needs_input_grad[2]:
            dA = lora_adapter_grad(dh, x, adapter_dtype, 1.0)
        if ctx.needs_input_grad[3]:
            dB = lora_adapter_grad(h, dy, adapter_dtype, s, transpose=True)
        if ctx.needs_input_grad[0]:
            # bitsandbytes' backward: W dequantized to its original dtype, then to the gradient's
            dyc = dy.to(ctx.compute_dtype)
            dx = _matmul(dyc, ctx.state, False, mid_dtype=ctx.state.dtype, h=dh, lora_B=lora_A.t()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dbias = dy.sum(0, dtype=ctx.bias_dtype)
        return dx, dbias, dA, dB, None, None, None


def lora_linear_4bit(
    x: Tensor,
    state: QuantState4bit,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    compute_dtype: torch.dtype,
) -> Tensor:
    """`ops.qlora.lora_linear_4bit` on the fused 4-bit matmul (no dropout: see `_supports_lora`)."""
    out_f, in_f = state.shape
    y = _LoraLinear4bit.apply(x.reshape(-1, in_f), bias, lora_A, lora_B, state, float(scaling), compute_dtype)
    return y.reshape(*x.shape[:-1], out_f)


def _supports_lora(
    x: Tensor,
    state: QuantState4bit,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    training: bool,
    compute_dtype: torch.dtype,
) -> str | None:
    probe = torch.empty(0, device=state.packed.device)  # the packed codes are uint8: ask about their device
    why = device_reason({"x": x, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "packed": probe})
    if why is not None:
        return why
    if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"compute dtype {compute_dtype} is not a float dtype the kernels take"
    if compute_dtype == torch.bfloat16 and x.device.type == "cpu":
        return "Triton's interpreter computes bf16 tl.dot wrongly; bf16 compute takes the torch path"
    if dropout_p > 0.0 and training:
        return "dropout is not fused into the 4-bit matmul yet"
    if dispatch.get_backend() == "auto" and x.device.type == "cuda":
        measured = dispatch.backend_table().get("entries", {}).get("lora_linear_4bit", {})
        if "triton" not in measured.get(dispatch.shape_class(x), []):
            return "no measurement of the fused 4-bit matmul for this shape class: auto keeps the torch composition"
    return size_reason(x, torch.empty(state.shape, device="meta"))


dispatch.register("lora_linear_4bit", "triton", lora_linear_4bit, _supports_lora)
