"""Merging DoRA adapters into a quantized base (peft_fast/tuners/lora/bnb.py) against HF peft
0.21.2: several adapters (two DoRA, DoRA with plain LoRA), merged one after another or together,
then unmerged, and merge_and_unload, over nf4 and fp4 (fp32 compute) and int8 bases. After every
step the packed weight bytes and their scales must be HF's, with the same warnings; a DoRA merge
while other adapters are merged unmerges and re-merges them (requantizing) as HF's
`_unmerged_base_weight` does. Model, loading and pairing helpers come from tests/test_qlora.py."""

from __future__ import annotations

import warnings

import pytest
import torch

import peft_fast

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (CPU support since 0.46)")
import test_qlora as tq  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

llama_dir = tq.llama_dir  # the module's fixtures, shared
_quiet = tq._quiet

QUANTS = ["nf4-dq-fp32", "fp4-fp32", "int8"]
TARGETS = ["self_attn.q_proj", "mlp.down_proj"]
# adapter names that are no substring of "lora_" (HF peft warns about those)
FIRST, SECOND, THIRD = NAMES = ("first", "second", "third")


def _adapters(path, quant, kinds, prepare=False, dtype=None):
    """(HF peft model, ours) over the same quantized base with adapters FIRST, SECOND, ... (one
    per entry of `kinds`, "dora" or "lora"): non-zero B, DoRA magnitudes scaled off their initial
    norms by factors in [0.5, 1.5], HF's adapter weights copied into ours, then all of them cast
    to `dtype` in both when given; FIRST is the active one."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    hf_base, our_base = tq.load(path, quant), tq.load(path, quant)
    if prepare:
        hf_base = peft.prepare_model_for_kbit_training(hf_base)
        our_base = peft_fast.prepare_model_for_kbit_training(our_base)
    hf = peft.get_peft_model(hf_base, peft.LoraConfig(**kw, use_dora=kinds[0] == "dora"), adapter_name=FIRST)
    ours = peft_fast.get_peft_model(our_base, peft_fast.LoraConfig(**kw, use_dora=kinds[0] == "dora"), FIRST)
    for name, kind in zip(NAMES[1:], kinds[1:]):
        hf.add_adapter(name, peft.LoraConfig(**kw, use_dora=kind == "dora"))
        ours.add_adapter(name, peft_fast.LoraConfig(**kw, use_dora=kind == "dora"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    for name in NAMES[: len(kinds)]:
        peft_fast.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf, adapter_name=name), name)
    for model in (hf, ours) if dtype is not None else ():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    theirs, mine = hf.state_dict(), ours.state_dict()
    assert sorted(theirs) == sorted(mine)
    lora = [k for k in theirs if "lora_" in k]
    assert all(theirs[k].dtype == mine[k].dtype and torch.equal(theirs[k], mine[k]) for k in lora) and lora
    tq._no_avx512_repacking(hf, ours)
    return hf, ours


def _llama(model):
    """The LlamaForCausalLM inside a PEFT model (or the model itself once unloaded)."""
    return model if isinstance(model, LlamaForCausalLM) else model.base_model.model


def _bases(model) -> dict[str, torch.nn.Module]:
    """The targeted bitsandbytes layers, by "layer.module"."""
    llama = _llama(model)
    out = {}
    for i in range(2):
        for t in TARGETS:
            m = llama.model.layers[i].get_submodule(t)
            out[f"{i}.{t}"] = getattr(m, "base_layer", m)
    return out


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    return {f"{i}.{t}": _llama(model).model.layers[i].get_submodule(t) for i in range(2) for t in TARGETS}


def _scales(layer: torch.nn.Module) -> torch.Tensor:
    """An 8-bit layer's row scales: on the weight until a forward moves them into its state."""
    return layer.weight.SCB if layer.state.SCB is None else layer.state.SCB


def _packed(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A bitsandbytes layer's stored weight: packed bytes or int8 values, and their scales."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return {"int8": w.data, "SCB": _scales(layer)}
    qs = w.quant_state
    out = {"packed": w.data, "absmax": qs.absmax, "code": qs.code}
    if qs.nested:
        out |= {"absmax2": qs.state2.absmax, "offset": qs.offset}
    return out


def _assert_same_bytes(hf, ours):
    theirs, mine = _bases(hf), _bases(ours)
    assert sorted(theirs) == sorted(mine)
    for key, t in theirs.items():
        m = mine[key]
        assert type(m) is type(t), key
        if isinstance(t, bnb.nn.Linear4bit):
            assert m.weight.quant_state.dtype == t.weight.quant_state.dtype, key
            assert m.weight.quant_state.shape == t.weight.quant_state.shape, key
        a, b = _packed(t), _packed(m)
        assert sorted(a) == sorted(b), key
        for part in a:
            assert a[part].dtype == b[part].dtype and torch.equal(a[part], b[part]), f"{key}: {part}"


def _warnings_of(step) -> list[str]:
    """The merge warnings `step()` emits, in order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    return [str(w.message) for w in caught if "lora module" in str(w.message) or "merged" in str(w.message)]


def _same_step(hf, ours, step) -> int:
    """Run `step` on both models: the same warnings and bytes; returns how many times it
    requantized each layer (one rounding warning each)."""
    theirs, mine = _warnings_of(lambda: step(hf)), _warnings_of(lambda: step(ours))
    assert mine == theirs
    _assert_same_bytes(hf, ours)
    return sum("lora module" in m for m in mine) // len(TARGETS * 2)


def _same_merge_and_unload(hf, ours, **kw) -> None:
    out = {}
    theirs = _warnings_of(lambda: out.setdefault("hf", hf.merge_and_unload(**kw)))
    mine = _warnings_of(lambda: out.setdefault("ours", ours.merge_and_unload(**kw)))
    assert mine == theirs and theirs
    assert all(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in _bases(out["ours"]).values())
    _assert_same_bytes(out["hf"], out["ours"])


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """bitsandbytes' own dequantization of a layer's weight."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(w.data, _scales(layer))
    return bnb.functional.dequantize_4bit(w.data, w.quant_state)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def float_weights(llama_dir):
    """The checkpoint's float weights of the targeted layers, by "layer.module"."""
    llama = LlamaForCausalLM.from_pretrained(llama_dir)
    return {k: m.weight.detach() for k, m in _bases(llama).items()}


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("kinds", [("dora", "dora"), ("lora", "dora"), ("dora", "lora")], ids="-".join)
@pytest.mark.parametrize("together", [False, True], ids=["in-turn", "together"])
def test_several_adapters_merge_and_unmerge_as_hf_peft(llama_dir, float_weights, quant, kinds, together):
    hf, ours = _adapters(llama_dir, quant, kinds)
    before = {k: _dequantized(m) for k, m in _bases(ours).items()}
    ids = tq._ids(2)
    requantized = 0
    for names in [[FIRST, SECOND]] if together else [[FIRST], [SECOND]]:
        requantized += _same_step(hf, ours, lambda m, names=names: m.merge_adapter(names))
    assert all(layer.merged_adapters == [FIRST, SECOND] for layer in _lora_layers(ours).values())
    assert torch.equal(_logits(ours, ids), _logits(hf, ids))
    merged = {k: _dequantized(m) for k, m in _bases(ours).items()}

    requantized += _same_step(hf, ours, lambda m: m.unmerge_adapter())
    # two merges and two unmerges; HF unmerges and re-merges FIRST to merge a DoRA SECOND
    assert requantized == (6 if kinds[1] == "dora" else 4)
    # ours is back on the original base within the roundings of its requantizations: each at
    # most a fresh quantization's error (of the float checkpoint) at the scale of the larger weight
    for key, layer in _lora_layers(ours).items():
        assert not layer.merged
        w = float_weights[key]
        rounding = (before[key] - w).norm() / w.norm()
        error = (_dequantized(layer.base_layer) - before[key]).norm()
        assert error <= requantized * rounding * max(merged[key].norm(), before[key].norm()), key
    # unmerged: FIRST (the active adapter) in each library's forward again
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=1e-5, atol=1e-5)

    _same_merge_and_unload(hf, ours, adapter_names=[FIRST, SECOND])


@pytest.mark.parametrize("quant", QUANTS)
def test_one_dora_adapter_merged_forward_as_hf_peft(llama_dir, quant):
    hf, ours = _adapters(llama_dir, quant, ("dora",))
    ids = tq._ids(3)
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=1e-5, atol=1e-5)
    assert _same_step(hf, ours, lambda m: m.merge_adapter()) == 1
    assert torch.equal(_logits(ours, ids), _logits(hf, ids))
    assert _same_step(hf, ours, lambda m: m.merge_adapter()) == 0  # "All adapters are already merged"
    assert _same_step(hf, ours, lambda m: m.unmerge_adapter()) == 1
    _same_merge_and_unload(hf, ours)


def test_merging_on_a_prepared_8bit_base_as_hf_peft(llama_dir):
    """After prepare_model_for_kbit_training HF peft 0.21.2's 8-bit DoRA forward fails on CPU (see
    tests/test_qlora.py), its merging does not: the same bytes, merged in turn and unmerged."""
    hf, ours = _adapters(llama_dir, "int8", ("dora", "dora"), prepare=True)
    for names in ([FIRST], [SECOND]):
        _same_step(hf, ours, lambda m, names=names: m.merge_adapter(names))
    _same_step(hf, ours, lambda m: m.unmerge_adapter())


@pytest.mark.parametrize("quant", ["nf4-dq-fp32", "int8"])
def test_three_dora_adapters_merged_in_turn_as_hf_peft(llama_dir, quant):
    """Merging THIRD replays FIRST and SECOND: SECOND's norm comes from the base recovered once
    (HF's cached `unmerged_base_weight`), not from a base recovered again. With safe_merge, which
    HF passes on to the replay."""
    hf, ours = _adapters(llama_dir, quant, ("dora", "dora", "dora"))
    requantized = sum(_same_step(hf, ours, lambda m, n=n: m.merge_adapter([n], safe_merge=True)) for n in NAMES)
    assert requantized == 1 + 3 + 5  # FIRST; out FIRST, in FIRST, SECOND; out SECOND, FIRST, in FIRST, SECOND, THIRD
    assert _same_step(hf, ours, lambda m: m.unmerge_adapter()) == 3


@pytest.mark.parametrize("quant", ["nf4-dq-fp32", "int8"])
def test_bf16_adapters_merge_as_hf_peft(llama_dir, quant):
    """bf16 adapters over an fp32 base: HF adds a plain LoRA delta in the adapter's dtype on 8 bits
    and in the promoted dtype on 4 bits; DoRA keeps the dequantized weight's dtype."""
    hf, ours = _adapters(llama_dir, quant, ("lora", "dora"), dtype=torch.bfloat16)
    for names in ([FIRST], [SECOND]):
        _same_step(hf, ours, lambda m, names=names: m.merge_adapter(names))
    _same_step(hf, ours, lambda m: m.unmerge_adapter())


@pytest.mark.parametrize("quant", ["nf4-dq-fp32", "int8"])
def test_unmerge_with_nothing_merged_warns_as_hf_peft(llama_dir, quant):
    """HF peft's bnb layers warn "Already unmerged. Nothing to do." (and requantize nothing) when
    unmerge is called with nothing merged: once per layer from unmerge_adapter."""
    hf, ours = _adapters(llama_dir, quant, ("dora", "lora"))
    warned = _warnings_of(ours.unmerge_adapter)
    assert warned == ["Already unmerged. Nothing to do."] * len(_lora_layers(ours))
    assert warned == _warnings_of(hf.unmerge_adapter)
    _assert_same_bytes(hf, ours)
    _same_step(hf, ours, lambda m: m.merge_adapter([FIRST, SECOND]))
    _same_step(hf, ours, lambda m: m.unmerge_adapter())
    assert _warnings_of(next(iter(_lora_layers(ours).values())).unmerge) == ["Already unmerged. Nothing to do."]
