"""peft_fast/quant/bnb.py: the dequantizer the torch path runs (bitsandbytes' native CPU kernel
where it reads the layout right, else our torch composition) gives the format's exact bytes."""

from __future__ import annotations

import pytest
import torch

from peft_fast.quant import bnb as qbnb
from peft_fast.quant.formats import dequantize_4bit as dequantize_torch
from peft_fast.quant.formats import quantize_4bit

BF = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle of the 4-bit format")


@pytest.fixture(autouse=True)
def _eager():
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.mark.parametrize("shape,blocksize,native", [((5, 128), 64, True), ((33, 256), 128, True), ((3, 96), 64, False)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_is_the_format_bytes(shape, blocksize, native, quant_type, nested):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=g) * 0.3
    state = quantize_4bit(w, blocksize, quant_type, compress_statistics=nested)
    assert (qbnb._native_dequantizer_reason(state) is None) == native
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        got = qbnb.dequantize_4bit(state, dtype)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, dequantize_torch(state, dtype)), dtype
    # float64 is the fp32 values widened (bitsandbytes' C kernel writes no float64: it came back wrong)
    assert torch.equal(qbnb.dequantize_4bit(state, torch.float64), dequantize_torch(state, torch.float32).double())
    if native:  # and bitsandbytes' own entry point agrees (its kernel is exact for these rows)
        packed, qs = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        assert torch.equal(packed.view(-1), state.packed_bytes())
        if not nested:  # nested absmax may differ by one step (formats._quantize_blockwise_dynamic)
            assert torch.equal(qbnb.dequantize_4bit(state), BF.dequantize_4bit(packed, qs))


def test_quant_storage_and_missing_bitsandbytes(monkeypatch):
    w = torch.randn(8, 128)
    want = dequantize_torch(quantize_4bit(w, 64, "nf4"))
    state = quantize_4bit(w, 64, "nf4", quant_storage=torch.bfloat16)
    assert torch.equal(qbnb.dequantize_4bit(state, torch.float32), want)
    monkeypatch.setattr(qbnb, "bnb", lambda: None)
    assert qbnb._native_dequantizer_reason(state) == "bitsandbytes is not importable"
    assert torch.equal(qbnb.dequantize_4bit(state, torch.float32), want)
