"""Triton backend of the QLoRA ops: `dequantize_4bit` (kernels/nf4_dequant.py) and
`lora_linear_4bit` on the fused 4-bit matmul (kernels/qlora_matmul.py), the latter as
torch.library custom ops with autograd (`peft_fast::lora_linear_4bit_triton_fwd` / `_bwd`):

Forward:   h = dropout(x) Aᵀ / (1 - p)             lora_shrink, fp32 (M × r), stores the mask's
                                                   keep bytes (1 bit per element of x)
           y = x Wᵀ + b + s · h Bᵀ                 qlora_matmul: W's 4-bit tiles decoded in the
                                                   K loop, the expand fused in the epilogue
Backward:  dh = s · dy B;  dB = s · dyᵀ h          lora_shrink, lora_adapter_grad
           dA = dhᵀ dropout(x) / (1 - p)           lora_adapter_grad (mask read from the bytes)
           dx = dy W + mask ⊙ (dh A) / (1 - p)     qlora_matmul over W untransposed, Aᵀ and the
                                                   mask fused
The base product runs on x itself, only the adapter sees dropout(x). Philox runs once per step
(in the forward shrink, as on the plain LoRA path); backward reads the keep bytes. The full
dequantized W is never written: forward and backward decode it tile by tile from the packed
codes (M <= 16: the split-K decode variant). Saved for backward: x, h, the keep bytes, A, B and
the quant state's tensors (the packed weight itself, no copy).

The quant state crosses the op boundary as the schema allows: its tensors (packed codes in any
storage dtype, absmax fp32 or uint8, and with double quantization absmax2, code2 and offset),
and the weight's shape, blocksize, nested blocksize, quant type (str: the 16-entry code table is
looked up inside the op) and original dtype. The ops are opaque to torch.compile (fake kernels
give their shapes), so a compiled 4-bit model has no graph break here.

"auto" policy: on CPU tensors "auto" always takes the torch path (dispatch's rule). On CUDA it
takes these kernels only where the backend table (`peft-fast bench --write-table`) has a
measurement for `lora_linear_4bit` at the call's shape class; with none (the shipped table:
no GPU has measured them yet) it keeps the torch composition (bitsandbytes' dequantizer +
cuBLAS), which "auto" must never be slower than: `dispatch.AUTO_DEFAULT["lora_linear_4bit"]` is
("torch",). `set_backend("triton")` asks for them.
`ia3_linear_4bit` stays on the torch path for now.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_fast.kernels.dropout import MAX_ELEMENTS
from peft_fast.kernels.lora_adapter_grad import lora_adapter_grad
from peft_fast.kernels.lora_shrink import lora_shrink
from peft_fast.kernels.nf4_dequant import dequantize_4bit as _dequantize_kernel
from peft_fast.kernels.qlora_matmul import qlora_matmul

from ...quant.formats import QuantState4bit, code_4bit
from .. import dispatch
from ..autograd import new_seed
from ..checks import size_reason
from . import device_reason
from .lora import lora_bwd_fake, new_keep


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


def _state_args(state: QuantState4bit) -> tuple:
    """`state` as the ops' schema takes it: (packed, absmax, absmax2, code2, offset, shape,
    blocksize, blocksize2, quant_type, dtype); `_state` turns them back into the state."""
    return (
        state.packed, state.absmax, state.absmax2, state.code2, state.offset, list(state.shape),
        state.blocksize, state.blocksize2, state.quant_type, state.dtype,
    )  # fmt: skip


def _state(packed, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, quant_type, dtype) -> QuantState4bit:
    """The QuantState4bit that `_state_args` took apart (inside the ops)."""
    return QuantState4bit(
        packed=packed, absmax=absmax, shape=(int(shape[0]), int(shape[1])), dtype=dtype, blocksize=blocksize,
        quant_type=quant_type, offset=offset, absmax2=absmax2, code2=code2, blocksize2=blocksize2,
    )  # fmt: skip


@torch.library.custom_op("peft_fast::lora_linear_4bit_triton_fwd", mutates_args=())
def lora_linear_4bit_triton_fwd(
    x: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    offset: Optional[Tensor],
    shape: list[int],
    blocksize: int,
    blocksize2: int,
    quant_type: str,
    weight_dtype: torch.dtype,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, keep) for 2-D x: y (M, out) in x's dtype with the base product in `compute_dtype`,
    h = dropout(x)Aᵀ/(1-p) (M, r) in fp32, keep the dropout mask's keep bytes (empty without dropout)."""
    state = _state(packed, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, quant_type, weight_dtype)
    keep = new_keep(x, dropout_p)
    h = lora_shrink(x, lora_A, 1.0 / (1.0 - dropout_p), dropout_p, seed, keep if dropout_p > 0.0 else None)
    b = None if bias is None else bias.to(compute_dtype)
    y = _matmul(x.to(compute_dtype), state, True, bias=b, h=h, lora_B=lora_B, alpha=scaling)
    return y.to(x.dtype), h, keep


@lora_linear_4bit_triton_fwd.register_fake
def _(x, bias, lora_A, lora_B, packed, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, quant_type,
      weight_dtype, scaling, dropout_p, seed, compute_dtype):  # fmt: skip
    M = x.shape[0]
    h = x.new_empty((M, lora_A.shape[0]), dtype=torch.float32)
    return x.new_empty((M, shape[0])), h, new_keep(x, dropout_p)


@torch.library.custom_op("peft_fast::lora_linear_4bit_triton_bwd", mutates_args=())
def lora_linear_4bit_triton_bwd(
    dy: Tensor,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    h: Tensor,
    keep: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    offset: Optional[Tensor],
    shape: list[int],
    blocksize: int,
    blocksize2: int,
    quant_type: str,
    weight_dtype: torch.dtype,
    scaling: float,
    dropout_p: float,
    compute_dtype: torch.dtype,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of lora_linear_4bit_triton_fwd's y, the mask read from its keep bytes; dx is
    an empty tensor when not `need_dx`."""
    state = _state(packed, absmax, absmax2, code2, offset, shape, blocksize, blocksize2, quant_type, weight_dtype)
    mask = keep if dropout_p > 0.0 else None
    rescale = 1.0 / (1.0 - dropout_p)
    dh = lora_shrink(dy, lora_B.t(), scaling)
    dB = lora_adapter_grad(h, dy, lora_A.dtype, scaling, transpose=True)
    dA = lora_adapter_grad(dh, x, lora_A.dtype, rescale, mask)
    if not need_dx:
        return dy.new_empty((0,)), dA, dB
    # bitsandbytes' backward: W dequantized to its original dtype, then to the gradient's
    dyc = dy.to(compute_dtype)
    dx = _matmul(dyc, state, False, mid_dtype=weight_dtype, h=dh, lora_B=lora_A.t(), alpha=rescale, keep=mask)
    return dx.to(x.dtype), dA, dB


@lora_linear_4bit_triton_bwd.register_fake
def _(dy, x, lora_A, lora_B, h, keep, packed, absmax, absmax2, code2, offset, shape, blocksize, blocksize2,
      quant_type, weight_dtype, scaling, dropout_p, compute_dtype, need_dx):  # fmt: skip
    return lora_bwd_fake(dy, x, lora_A, lora_B, need_dx)


def _setup_context(ctx, inputs, output):
    x, bias, lora_A, lora_B, *state, scaling, dropout_p, _seed, compute_dtype = inputs
    ctx.save_for_backward(x, lora_A, lora_B, output[1], output[2], *state[:5])
    ctx.state_rest = tuple(state[5:])  # shape, blocksize, blocksize2, quant_type, weight dtype
    ctx.scaling, ctx.dropout_p, ctx.compute_dtype = scaling, dropout_p, compute_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dh, _keep):
    x, lora_A, lora_B, h, keep, *tensors = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA, dB = torch.ops.peft_fast.lora_linear_4bit_triton_bwd(
        dy, x, lora_A, lora_B, h, keep, *tensors, *ctx.state_rest,
        ctx.scaling, ctx.dropout_p, ctx.compute_dtype, need[0],
    )  # fmt: skip
    db = dy.sum(0, dtype=ctx.bias_dtype) if need[1] else None
    frozen = (None,) * 14  # the quant state, scaling, dropout_p, seed, compute_dtype
    return (dx if need[0] else None, db, dA if need[2] else None, dB if need[3] else None, *frozen)


lora_linear_4bit_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    """`ops.qlora.lora_linear_4bit` on the fused 4-bit matmul, dropout included.

    x may have any leading dims and strides (viewed as 2-D, copied only when its strides do not
    allow a view); gradients reach x, bias, lora_A and lora_B. The dropout seed is drawn from
    torch's generator on x's device: `torch.manual_seed` reproduces the mask."""
    out_f, in_f = state.shape
    p = float(dropout_p) if training else 0.0
    seed = new_seed(x.device) if p > 0.0 else None
    y, _, _ = torch.ops.peft_fast.lora_linear_4bit_triton_fwd(
        x.reshape(-1, in_f), bias, lora_A, lora_B, *_state_args(state), float(scaling), p, seed, compute_dtype
    )
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
    if dropout_p > 0.0 and training and x.numel() > MAX_ELEMENTS:
        return f"dropout on {x.numel()} elements exceeds the kernels' int32 mask numbering"
    return size_reason(x, torch.empty(state.shape, device="meta"))


dispatch.register("lora_linear_4bit", "triton", lora_linear_4bit, _supports_lora)
