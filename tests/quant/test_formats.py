"""peft_fast/quant/formats.py: our 4-bit quantizer and dequantizer against bitsandbytes'
(`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`, the format's contract)."""

from __future__ import annotations

import pytest
import torch

from peft_fast.quant.formats import QuantState4bit, dequantize_4bit, dynamic_map, quantize_4bit

BF = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle of the 4-bit format")

# bitsandbytes 0.50.2's CPU dequantizer (its C kernel) is wrong for rows whose length is a
# multiple of 16 but not of the blocksize (e.g. 96 with blocksize 64): it disagrees with its own
# quantizer and with its pure-torch implementation (see test_bnb_cpu_dequantizer_bug). These
# shapes avoid that case; the others are checked against the float definition below.
SHAPES = [(1, 1), (3, 5), (7, 33), (5, 66), (4, 128), (17, 200), (100, 37), (70, 300)]


@pytest.fixture(autouse=True)
def _eager():
    """bitsandbytes torch.compiles its CPU fallback per shape and dtype (seconds each): run it eagerly."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _bnb_state(w: torch.Tensor, blocksize: int, quant_type: str, nested: bool, storage=torch.uint8):
    packed, qs = BF.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, quant_storage=storage
    )
    return packed, qs


def _ours_from_bnb(packed: torch.Tensor, qs) -> QuantState4bit:
    s2 = qs.state2 if qs.nested else None
    return QuantState4bit(
        packed,
        qs.absmax,
        tuple(qs.shape),
        qs.dtype,
        qs.blocksize,
        qs.quant_type,
        offset=qs.offset if s2 is not None else None,
        absmax2=s2.absmax if s2 is not None else None,
        code2=s2.code if s2 is not None else None,
    )


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), BF.create_dynamic_map(signed=True))
    for qt in ("nf4", "fp4"):
        from peft_fast.quant.formats import code_4bit

        assert torch.equal(code_4bit(qt), BF.get_4bit_type(qt, device="cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_bit_identical(shape, quant_type, nested):
    g = torch.Generator().manual_seed(hash((shape, quant_type, nested)) % 2**31)
    w = torch.randn(shape, generator=g) * 0.2
    for blocksize in (64, 128):
        packed, qs = _bnb_state(w, blocksize, quant_type, nested)
        state = _ours_from_bnb(packed, qs)
        state.check()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            qs.dtype = dtype
            assert torch.equal(dequantize_4bit(state, dtype), BF.dequantize_4bit(packed, qs)), (blocksize, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantizer_writes_bitsandbytes_bytes(shape, quant_type):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * 0.5
    for blocksize, dtype in [(64, torch.float32), (256, torch.float16), (64, torch.bfloat16)]:
        w = w.to(dtype)
        packed, qs = _bnb_state(w, blocksize, quant_type, False)
        ours = quantize_4bit(w, blocksize, quant_type)
        assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, qs.absmax)
        assert (ours.shape, ours.dtype, ours.blocksize) == (tuple(qs.shape), qs.dtype, blocksize)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_quantizer_quant_storage(storage):
    w = torch.randn(16, 64)
    packed, _ = _bnb_state(w, 64, "nf4", False, storage)
    ours = quantize_4bit(w, 64, "nf4", quant_storage=storage)
    assert ours.packed.dtype == storage and torch.equal(ours.packed.view(torch.uint8), packed.view(torch.uint8))
    assert torch.equal(dequantize_4bit(ours), dequantize_4bit(quantize_4bit(w, 64, "nf4")))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantization_matches_bitsandbytes(quant_type):
    """Codes, offset, absmax2 and the map are bitsandbytes' exactly. bitsandbytes' CPU 8-bit
    quantizer finds the map entry with an approximate search, so a few of its uint8 absmax
    values are one step off the nearest entry; ours is the nearest, never farther."""
    torch.manual_seed(0)
    w = torch.randn(256, 300) * 0.3  # 1200 blocks: five absmax2 groups, the last one partial
    packed, qs = _bnb_state(w, 64, quant_type, True)
    ours = quantize_4bit(w, 64, quant_type, compress_statistics=True)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.offset, qs.offset) and torch.equal(ours.absmax2, qs.state2.absmax)
    assert torch.equal(ours.code2, qs.state2.code)
    assert ours.absmax.dtype == torch.uint8 and ours.absmax.shape == qs.absmax.shape
    differ = ours.absmax != qs.absmax
    assert differ.float().mean() < 0.01
    exact = quantize_4bit(w, 64, quant_type).absmax - qs.offset
    expand = BF.dequantize_blockwise
    err_ours = (expand(ours.absmax, qs.state2) - exact).abs()
    err_bnb = (expand(qs.absmax, qs.state2) - exact).abs()
    assert (err_ours <= err_bnb).all()


@pytest.mark.parametrize("shape", [(3, 96), (64, 32), (5, 160)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_matches_the_definition(shape, quant_type):
    """Every shape, including the ones bitsandbytes' CPU kernel gets wrong: w = table[q] · absmax
    computed here element by element in float64 from the packed nibbles."""
    torch.manual_seed(3)
    w = torch.randn(shape)
    state = quantize_4bit(w, 64, quant_type, compress_statistics=True)
    table = BF.get_4bit_type(quant_type, device="cpu").double()
    raw = state.packed.view(-1).tolist()
    code2, absmax2 = state.code2.double(), state.absmax2.double()
    absmax = [code2[a] * absmax2[j // 256] + state.offset.double() for j, a in enumerate(state.absmax.tolist())]
    want = []
    for i in range(shape[0] * shape[1]):
        q = raw[i // 2] >> 4 if i % 2 == 0 else raw[i // 2] & 0xF
        want.append(table[q] * absmax[i // 64])
    want = torch.tensor(want).reshape(shape)
    got = dequantize_4bit(state)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
    # and the rounding is bounded: each value within half a table gap of its block's scale
    assert ((got - w).abs() <= 0.6 * max(absmax)).all()


def test_bnb_cpu_dequantizer_bug():
    """Documents why SHAPES avoids rows of 96 etc.: bitsandbytes 0.50.2's CPU kernel (not its
    format) mis-reads them, while its pure-torch dequantizer and ours agree."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    torch.manual_seed(0)
    w = torch.randn(3, 96)
    packed, qs = _bnb_state(w, 64, "nf4", False)
    ours = dequantize_4bit(_ours_from_bnb(packed, qs))
    torch_impl = _dequantize_4bit_compute(
        packed.view(-1), qs.absmax, BF.get_4bit_type("nf4", device="cpu"), 64, qs.shape, torch.float32
    )
    assert torch.equal(ours, torch_impl)
    assert (ours - w).abs().max() < 0.5 * (BF.dequantize_4bit(packed, qs) - w).abs().max()


def test_check_names_the_field():
    state = quantize_4bit(torch.randn(8, 64), 64, "nf4", compress_statistics=True)
    state.check("q_proj")
    bad = QuantState4bit(**{**state.__dict__, "blocksize": 48})
    with pytest.raises(ValueError, match="q_proj: quant state blocksize"):
        bad.check("q_proj")
    bad = QuantState4bit(**{**state.__dict__, "quant_type": "int4"})
    with pytest.raises(ValueError, match="quant_type"):
        bad.check("q_proj")
    bad = QuantState4bit(**{**state.__dict__, "absmax2": torch.ones(3)})
    with pytest.raises(ValueError, match="state2.absmax"):
        bad.check("q_proj")
    bad = QuantState4bit(**{**state.__dict__, "packed": state.packed[:-1]})
    with pytest.raises(ValueError, match="packed weight has 255 bytes"):
        bad.check("q_proj")
    bad = QuantState4bit(**{**state.__dict__, "offset": None})
    with pytest.raises(ValueError, match="offset"):
        bad.check("q_proj")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_4bit(torch.randn(4, 4), blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_4bit(torch.randn(4, 4), quant_type="int8")
    with pytest.raises(ValueError, match="cannot hold 3 packed bytes"):
        quantize_4bit(torch.randn(1, 5), quant_storage=torch.float16)
    with pytest.raises(TypeError, match="2-D float"):
        quantize_4bit(torch.randn(4))
