"""QLoRA end to end (peft_fast/tuners/bnb.py, peft_fast/quant/): LoRA and IA³ over a tiny Llama
loaded in 4 and 8 bits by transformers + bitsandbytes, against HF peft over the same quantized
base: outputs, gradients, trainable counts, adapter files, merging; prepare_model_for_kbit_training;
and the refusal when bitsandbytes is missing."""

from __future__ import annotations

import contextlib
import copy
import warnings
from unittest import mock

import pytest
import torch

import peft_fast

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (CPU support since 0.46)")
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

# Every in_features is a multiple of 64: bitsandbytes 0.50.2's CPU dequantizer mis-reads rows of
# 96 and the like (tests/quant/test_formats.py::test_bnb_cpu_dequantizer_bug), which would make
# HF peft's numbers wrong there, not ours.
LLAMA = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

QUANT = {
    "nf4-dq-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-storage-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.bfloat16,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(gradient_checkpointing|checkpoint|MatMul8bitLt|use_cache).*")
        yield


_LOADED: dict = {}


def load(path, quant: str, **kw) -> torch.nn.Module:
    """A fresh copy of the checkpoint loaded with this quantization (loaded once, then deep-copied)."""
    key = (str(path), quant, tuple(sorted(kw.items(), key=str)))
    if key not in _LOADED:
        cfg = BitsAndBytesConfig(**QUANT[quant])
        _LOADED[key] = LlamaForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", **kw)
    return copy.deepcopy(_LOADED[key])


def _ids(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 97, (2, 9), generator=g)


def _pair(path, quant, hf_config, our_config, prepare=True):
    """(HF peft model, ours) over two loads of the same quantized checkpoint, ours with HF's
    adapter weights copied in (non-zero B: init_lora_weights=False)."""
    hf_base, our_base = load(path, quant), load(path, quant)
    if prepare:
        hf_base = peft.prepare_model_for_kbit_training(hf_base)
        our_base = peft_fast.prepare_model_for_kbit_training(our_base)
    hf = peft.get_peft_model(hf_base, hf_config)
    ours = peft_fast.get_peft_model(our_base, our_config)
    peft_fast.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(hf))
    return hf, ours


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _check_same_training_step(hf, ours, exact=True):
    hf.train()
    ours.train()
    ids = _ids()
    a = hf(input_ids=ids, labels=ids)
    b = ours(input_ids=ids, labels=ids)
    a.loss.backward()
    b.loss.backward()
    ga, gb = _grads(hf), _grads(ours)
    assert set(ga) == set(gb) and ga
    if exact:
        assert torch.equal(a.logits, b.logits)
        for k in ga:
            assert torch.equal(ga[k], gb[k]), k
    else:
        assert torch.allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
        for k in ga:
            assert torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6), k
    return a.loss


@pytest.mark.parametrize("quant", list(QUANT))
def test_lora_matches_hf_peft(llama_dir, quant, tmp_path):
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    hf, ours = _pair(llama_dir, quant, peft.LoraConfig(**kw), peft_fast.LoraConfig(**kw))
    assert hf.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == ("LoraLinear8bit" if quant == "int8" else "LoraLinear4bit")
    _check_same_training_step(hf, ours)

    # adapter files: HF peft loads ours onto a fresh quantized base and gets the same output
    ours.save_pretrained(tmp_path / "ours")
    hf_loaded = peft.PeftModel.from_pretrained(load(llama_dir, quant), tmp_path / "ours")
    ours.eval()
    hf_loaded.eval()
    ids = _ids(2)
    with torch.no_grad():
        for m in (hf_loaded, ours):  # bitsandbytes' AVX512-BF16 inference repacking: off for both
            for mod in m.modules():
                if isinstance(mod, bnb.nn.Linear4bit):
                    mod.support_avx512bf16_for_cpu = False
        assert torch.equal(hf_loaded(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("quant", ["nf4-dq-fp32", "fp4-bf16", "int8"])
def test_ia3_matches_hf_peft(llama_dir, quant):
    kw = dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    hf, ours = _pair(llama_dir, quant, peft.IA3Config(**kw), peft_fast.IA3Config(**kw))
    with torch.no_grad():  # non-identity vectors, the same in both
        for (n, p), (n2, q) in zip(
            ((n, p) for n, p in hf.named_parameters() if "ia3_l" in n),
            ((n, p) for n, p in ours.named_parameters() if "ia3_l" in n),
        ):
            assert n == n2
            p.uniform_(0.5, 1.5)
            q.copy_(p)
    assert hf.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    _check_same_training_step(hf, ours)
    with pytest.raises(ValueError, match="Cannot merge ia3 layers"):
        ours.merge_and_unload()


@pytest.mark.parametrize("quant", ["nf4-dq-fp32", "int8"])
def test_merge_and_unmerge_as_hf_peft(llama_dir, quant):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    hf, ours = _pair(llama_dir, quant, peft.LoraConfig(**kw), peft_fast.LoraConfig(**kw), prepare=False)
    bits = 8 if quant == "int8" else 4
    with pytest.warns(UserWarning, match=f"Merge lora module to {bits}-bit linear may get different generations"):
        ours.merge_adapter()
    hf.merge_adapter()
    hl = hf.base_model.model.model.layers[1].mlp.up_proj.base_layer
    ol = ours.base_model.model.model.layers[1].mlp.up_proj.base_layer
    assert type(ol) is type(hl) and torch.equal(ol.weight.data, hl.weight.data)
    if bits == 4:
        assert torch.equal(ol.weight.quant_state.absmax, hl.weight.quant_state.absmax)
        assert ol.weight.quant_state.dtype == hl.weight.quant_state.dtype
    else:
        assert torch.equal(ol.weight.SCB, hl.weight.SCB)
    with pytest.warns(UserWarning, match=f"Unmerge lora module to {bits}-bit linear"):
        ours.unmerge_adapter()
    hf.unmerge_adapter()
    assert torch.equal(ol.weight.data, hl.weight.data)
    merged = ours.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)


def test_safe_merge_refuses_non_finite(llama_dir):
    kw = dict(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ours = peft_fast.get_peft_model(load(llama_dir, "nf4-dq-fp32"), peft_fast.LoraConfig(**kw))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.data.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("inf"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight.data, before) and not layer.merged


def test_prepare_model_for_kbit_training_as_hf_peft(llama_dir):
    kw = dict(dtype=torch.bfloat16)
    hf = peft.prepare_model_for_kbit_training(load(llama_dir, "nf4-dq-fp32", **kw))
    ours = peft_fast.prepare_model_for_kbit_training(load(llama_dir, "nf4-dq-fp32", **kw))
    hp, op = dict(hf.named_parameters()), dict(ours.named_parameters())
    assert {n: (p.dtype, p.requires_grad, type(p)) for n, p in hp.items()} == {
        n: (p.dtype, p.requires_grad, type(p)) for n, p in op.items()
    }
    assert op["model.norm.weight"].dtype == torch.float32  # bf16 norms/embeddings go to fp32
    assert ours.is_gradient_checkpointing and hf.is_gradient_checkpointing
    emb = ours.get_input_embeddings()(_ids())
    assert emb.requires_grad  # enable_input_require_grads: checkpointed layers see a grad-requiring input

    plain = peft_fast.prepare_model_for_kbit_training(load(llama_dir, "int8"), use_gradient_checkpointing=False)
    assert not plain.is_gradient_checkpointing
    with pytest.raises(TypeError, match="gradient_checkpointing_kwargs"):
        peft_fast.prepare_model_for_kbit_training(plain, gradient_checkpointing_kwargs=["use_reentrant"])


def test_adapter_loads_onto_a_base_quantized_differently(llama_dir, tmp_path):
    """Adapters are stored unquantized: one trained over NF4 loads over FP4 and over fp32."""
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = peft_fast.get_peft_model(load(llama_dir, "nf4-dq-fp32"), peft_fast.LoraConfig(**kw))
    ours.save_pretrained(tmp_path)
    saved = peft_fast.load_peft_weights(str(tmp_path))
    assert all(t.dtype == torch.float32 for t in saved.values())
    for base in (load(llama_dir, "fp4-bf16"), LlamaForCausalLM.from_pretrained(llama_dir)):
        loaded = peft_fast.PeftModel.from_pretrained(base, tmp_path)
        got = peft_fast.get_peft_model_state_dict(loaded)
        assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)


def test_missing_bitsandbytes_is_refused_with_what_to_install(llama_dir, monkeypatch):
    from peft_fast.quant import bnb as qbnb

    model = load(llama_dir, "nf4-dq-fp32")
    monkeypatch.setattr(qbnb, "bnb", lambda: None)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj'.*pip install bitsandbytes"):
        peft_fast.get_peft_model(model, peft_fast.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        peft_fast.get_peft_model(model, peft_fast.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


def test_missing_quant_state_names_the_layer(llama_dir):
    config = peft_fast.LoraConfig(r=2, target_modules=["k_proj"])
    ours = peft_fast.get_peft_model(load(llama_dir, "nf4-dq-fp32"), config)
    layer = ours.base_model.model.model.layers[1].self_attn.k_proj
    layer.base_layer.weight.quant_state = None
    layer.base_layer.quant_state = None
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.*no quant_state"):
        ours(input_ids=_ids())


def test_eval_matches_bitsandbytes_dequantize_path(llama_dir):
    """Inference (eval, no grad): bitsandbytes would repack for its AVX512-BF16 kernel and compute
    in bf16; peft_fast keeps the standard layout and computes in the compute dtype, so it agrees
    with bitsandbytes' own dequantize + matmul path, and its weights stay readable."""
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    hf, ours = _pair(llama_dir, "nf4-dq-fp32", peft.LoraConfig(**kw), peft_fast.LoraConfig(**kw), prepare=False)
    for mod in hf.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
    hf.eval()
    ours.eval()
    ids = _ids(3)
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, ours(input_ids=ids).logits)
    for mod in ours.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            assert not getattr(mod.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("quant", ["nf4-dq-fp32", "fp4-bf16", "int8"])
def test_patch_peft_routes_hf_bnb_layers(llama_dir, quant):
    """patch_peft sends HF peft's own bnb LoRA layers through peft_fast's ops, same numbers."""
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    hf = peft.get_peft_model(peft.prepare_model_for_kbit_training(load(llama_dir, quant)), peft.LoraConfig(**kw))
    patched = peft.get_peft_model(peft.prepare_model_for_kbit_training(load(llama_dir, quant)), peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(patched, peft.get_peft_model_state_dict(hf))
    peft_fast.patch_peft(patched)
    names = peft_fast.patch.patched_layers(patched)
    assert len(names) == 14 and all("proj" in n for n in names)
    calls = []
    op = "lora_add" if quant == "int8" else "lora_linear_4bit"
    original = getattr(peft_fast.patch, op)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peft_fast.patch, op, lambda *a: calls.append(1) or original(*a))
        _check_same_training_step(hf, patched)
    assert len(calls) == 2 * 14  # every layer through the op: forward, then the checkpointed recompute


def _hf_pair_patched(path, quant, chain: str, dropout: float):
    """(HF peft model, a second one with the same adapter weights that patch_peft routed) over two
    loads of one quantized checkpoint, without prepare_model_for_kbit_training (HF's 8-bit DoRA
    breaks after it on CPU, see below); the adapters `chain` ("dora", "lora,dora", ...: "default"
    then a1, a2) are all active, in that order, each with `dropout`."""
    kinds = chain.split(",")
    names = ["default"] + [f"a{i}" for i in range(1, len(kinds))]
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        model = peft.get_peft_model(load(path, quant), _chain_config(0, kinds[0], dropout))
        for i, kind in enumerate(kinds[1:], 1):
            model.add_adapter(names[i], _chain_config(i, kind, dropout))
        model.base_model.set_adapter(names)
        models.append(model)
    hf, patched = models
    for name in names:
        peft.set_peft_model_state_dict(patched, peft.get_peft_model_state_dict(hf, adapter_name=name), name)
    _no_avx512_repacking(hf, patched)
    peft_fast.patch_peft(patched)
    assert len(peft_fast.patch.patched_layers(patched)) == 14
    return hf, patched


def _chain_config(i: int, kind: str, dropout: float):
    r = (4, 2, 3)[i]
    return peft.LoraConfig(
        r=r, lora_alpha=2 * r + i, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False,
        use_dora=kind == "dora",
    )  # fmt: skip


def _op_calls(quant: str, chain: str) -> dict[str, int]:
    """The ops patch_peft runs for one forward through the 14 layers: on 4 bits the first adapter
    in the fused 4-bit op, on 8 bits every adapter after bitsandbytes' int8 product."""
    kinds = chain.split(",")
    first, rest = (None, kinds) if quant == "int8" else (kinds[0], kinds[1:])
    return {
        "lora_linear_4bit": 14 * (first == "lora"),
        "dora_linear_4bit": 14 * (first == "dora"),
        "lora_add": 14 * rest.count("lora"),
        "dora_add": 14 * rest.count("dora"),
    }


def _counting_ops():
    """Spies on the ops patch.py calls (their behaviour kept); {name: mock}."""
    return {op: mock.patch.object(peft_fast.patch, op, wraps=getattr(peft_fast.patch, op)) for op in _op_calls("", "")}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize(
    "quant,chain,dropout",
    [("nf4-dq-fp32", "dora", 0.0), ("nf4-dq-fp32", "dora", 0.1), ("fp4-fp32", "dora", 0.0),
     ("fp4-fp32", "dora", 0.1), ("int8", "dora", 0.0), ("int8", "dora", 0.1),
     ("nf4-dq-fp32", "dora,lora,dora", 0.1), ("fp4-fp32", "lora,dora", 0.0), ("int8", "lora,dora", 0.1),
     ("int8", "dora,lora", 0.0)],
)  # fmt: skip
def test_patch_peft_routes_hf_bnb_dora(llama_dir, quant, chain, dropout):
    """HF peft's own bnb DoRA layers (alone, or chained with other active adapters) through
    peft_fast's ops: a training step (same seed, so the same dropout masks on the torch backend)
    gives HF's loss, logits and gradients (magnitudes included), and eval gives HF's logits,
    with every layer on the fast path."""
    calls = _op_calls(quant, chain)
    for phase in ("train", "eval"):  # fresh models per phase: HF's 8-bit DoRA breaks in eval after a step
        hf, patched = _hf_pair_patched(llama_dir, quant, chain, dropout)
        hf.train(phase == "train")
        patched.train(phase == "train")
        ids = _ids()
        with torch.set_grad_enabled(phase == "train"):
            torch.manual_seed(3)
            want = hf(input_ids=ids, labels=ids)
            spies = _counting_ops()
            with contextlib.ExitStack() as stack, peft_fast.use_backend("torch"):
                mocks = {op: stack.enter_context(spy) for op, spy in spies.items()}
                torch.manual_seed(3)
                got = patched(input_ids=ids, labels=ids)
        assert {op: m.call_count for op, m in mocks.items()} == calls, phase
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        if phase == "eval":
            continue
        want.loss.backward()
        got.loss.backward()
        gw, gg = _grads(hf), _grads(patched)
        assert gw.keys() == gg.keys() and sum("lora_magnitude_vector" in k for k in gw) == 14 * chain.count("dora")
        for k in gw:
            assert _rel_err(gg[k], gw[k]) < 1e-5, k


# -- DoRA over quantized bases -----------------------------------------------------------------
# HF peft 0.21.2's DoRA on Linear8bitLt breaks on CPU (bitsandbytes 0.50.2) once
# prepare_model_for_kbit_training is applied, or in eval after a training step: its
# `dequantize_module_weight` replaces the Int8Params in place and the int8 product then finds no
# SCB ("'NoneType' object has no attribute 'unsqueeze'" / "... 'dtype'"). HF is compared on fresh
# unprepared 8-bit models for each phase; ours runs every phase on one model.


def _dora_pair(path, quant, **kw):
    kw = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True, **kw)
    return _pair(path, quant, peft.LoraConfig(**kw), peft_fast.LoraConfig(**kw), prepare=quant != "int8")


def _no_avx512_repacking(*models):
    for m in models:  # bitsandbytes' AVX512-BF16 inference repacking: off for both
        for mod in m.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                mod.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize("quant,dropout", [("nf4-dq-fp32", 0.1), ("fp4-bf16", 0.0), ("int8", 0.1)])
def test_dora_training_step_matches_hf_peft(llama_dir, quant, dropout):
    hf, ours = _dora_pair(llama_dir, quant, lora_dropout=dropout)
    assert hf.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    assert sorted(hf.state_dict()) == sorted(ours.state_dict())
    assert any("lora_magnitude_vector.default.weight" in k for k in ours.state_dict())
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == ("LoraLinear8bit" if quant == "int8" else "LoraLinear4bit")
    torch.manual_seed(3)  # the same dropout masks
    hf.train()
    a = hf(input_ids=_ids(), labels=_ids())
    a.loss.backward()
    torch.manual_seed(3)
    ours.train()
    b = ours(input_ids=_ids(), labels=_ids())
    b.loss.backward()
    ga, gb = _grads(hf), _grads(ours)
    assert set(ga) == set(gb) and any("lora_magnitude_vector" in k for k in gb)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    # bf16 compute: the norm's last-bit differences (ours never forms W + s·B·A) flip bf16 roundings
    rtol = 2e-2 if quant == "fp4-bf16" else 1e-4
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=rtol, atol=rtol * ga[k].abs().max().item(), msg=k)
    if quant == "int8":  # ours also trains on a prepared (gradient-checkpointed) 8-bit model: the same step
        prepared = peft_fast.get_peft_model(
            peft_fast.prepare_model_for_kbit_training(load(llama_dir, quant)),
            peft_fast.LoraConfig(**ours.peft_config["default"].to_dict()),
        )
        peft_fast.set_peft_model_state_dict(prepared, peft_fast.get_peft_model_state_dict(ours))
        torch.manual_seed(3)
        prepared.train()
        c = prepared(input_ids=_ids(), labels=_ids())
        c.loss.backward()
        torch.testing.assert_close(c.loss, b.loss, rtol=1e-6, atol=1e-6)
        gc = _grads(prepared)
        for k in gb:
            torch.testing.assert_close(gc[k], gb[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("quant", ["nf4-dq-fp32", "int8"])
def test_dora_init_eval_files_and_merge_match_hf_peft(llama_dir, quant, tmp_path):
    # initialisation: the magnitude is the dequantized weight's row norm (B = 0), computed by each library
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)
    fresh_hf = peft.get_peft_model(load(llama_dir, quant), peft.LoraConfig(**kw))
    fresh_ours = peft_fast.get_peft_model(load(llama_dir, quant), peft_fast.LoraConfig(**kw))
    mags_hf = {k: v for k, v in fresh_hf.state_dict().items() if "magnitude" in k}
    mags_ours = {k: v for k, v in fresh_ours.state_dict().items() if "magnitude" in k}
    assert sorted(mags_hf) == sorted(mags_ours) and len(mags_hf) == 4
    for k in mags_hf:
        torch.testing.assert_close(mags_ours[k], mags_hf[k], rtol=1e-6, atol=0, msg=k)

    tol = dict(rtol=1e-5, atol=1e-5)
    hf, ours = _dora_pair(llama_dir, quant)
    _no_avx512_repacking(hf, ours)
    hf.eval()
    ours.eval()
    ids = _ids(2)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want, **tol)

    # adapter files both ways, over fresh quantized bases
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    theirs_file, our_file = (peft_fast.load_peft_weights(str(tmp_path / d)) for d in ("hf", "ours"))
    assert sorted(theirs_file) == sorted(our_file)
    assert all(torch.equal(theirs_file[k], our_file[k]) for k in our_file)
    hf_loaded = peft.PeftModel.from_pretrained(load(llama_dir, quant), tmp_path / "ours")
    ours_loaded = peft_fast.PeftModel.from_pretrained(load(llama_dir, quant), tmp_path / "hf")
    _no_avx512_repacking(hf_loaded, ours_loaded)
    with torch.no_grad():
        for m in (hf_loaded.eval(), ours_loaded.eval()):
            torch.testing.assert_close(m(input_ids=ids).logits, want, **tol)

    # merge, unmerge, merge_and_unload: dequantize, DoRA-merge, requantize, as HF peft
    bits = 8 if quant == "int8" else 4
    with pytest.warns(UserWarning, match=f"Merge lora module to {bits}-bit linear"):
        ours.merge_adapter()
    hf.merge_adapter()
    for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
        hl = hf.base_model.model.model.layers[1].get_submodule(name).base_layer
        ol = ours.base_model.model.model.layers[1].get_submodule(name).base_layer
        assert type(ol) is type(hl) and torch.equal(ol.weight.data, hl.weight.data), name
    hf.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, hf(input_ids=ids).logits, **tol)
    with pytest.warns(UserWarning, match=f"Unmerge lora module to {bits}-bit linear"):
        ours.unmerge_adapter()
    hf.unmerge_adapter()
    hl = hf.base_model.model.model.layers[0].mlp.gate_proj.base_layer
    ol = ours.base_model.model.model.layers[0].mlp.gate_proj.base_layer
    assert torch.equal(ol.weight.data, hl.weight.data)
    merged = ours.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("quant", ["nf4-dq-fp32"])
def test_dora_with_a_second_active_adapter_matches_hf_peft(llama_dir, quant):
    """Several active adapters over a quantized base, a plain LoRA one then a DoRA one (HF's chain)."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    hf_base, our_base = load(llama_dir, quant), load(llama_dir, quant)
    hf = peft.get_peft_model(hf_base, peft.LoraConfig(**kw))
    ours = peft_fast.get_peft_model(our_base, peft_fast.LoraConfig(**kw))
    hf.add_adapter("dora", peft.LoraConfig(**kw, use_dora=True))
    ours.add_adapter("dora", peft_fast.LoraConfig(**kw, use_dora=True))
    for name in ("default", "dora"):
        state = peft.get_peft_model_state_dict(hf, adapter_name=name)
        peft_fast.set_peft_model_state_dict(ours, state, adapter_name=name)
    for m in (hf, ours):
        m.base_model.set_adapter(["default", "dora"])
    _no_avx512_repacking(hf, ours)
    _check_same_training_step(hf, ours, exact=False)
