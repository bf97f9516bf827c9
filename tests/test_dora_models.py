"""DoRA (`LoraConfig(use_dora=True)`) against HF peft 0.21.2: parameters, state-dict keys and
files both ways, outputs, gradients and trainable counts on Linear (Llama), Conv1D (GPT-2) and
Embedding, merging, disabling and deleting; several active adapters (DoRA and plain LoRA, in
turn, as HF chains them); mixed-adapter batches; and the errors for what is refused. HF peft is
the oracle; the op-level tests (float64 oracle) are tests/ops/test_dora.py."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import make_inputs, make_model, output_of

import peft_fast
from peft_fast.tuners.lora import LoraLayer

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_proj", "wte"]}


def _cfg(lib, kind, **kw):
    base = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], "init_lora_weights": False, "use_dora": True}
    return lib.LoraConfig(task_type="CAUSAL_LM", **{**base, **kw})


def _twins(kind="llama", second=None, **kw):
    """(HF peft model, peft_fast model): same base, HF's adapter weights loaded into ours."""
    base = make_model(kind)
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(base), _cfg(peft, kind, **kw))
    ours = peft_fast.get_peft_model(copy.deepcopy(base), _cfg(peft_fast, kind, **kw))
    if second is not None:
        theirs.add_adapter("other", _cfg(peft, kind, **second))
        ours.add_adapter("other", _cfg(peft_fast, kind, **second))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _loss_and_grads(model, kind, seed=5):
    inputs = make_inputs(kind)
    torch.manual_seed(seed)  # the same dropout masks in both libraries
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_step_like_hf(kind, dropout):
    theirs, ours = _twins(kind, lora_dropout=dropout)
    trainable = {m: sorted(n for n, p in m.named_parameters() if p.requires_grad) for m in (theirs, ours)}
    assert trainable[ours] == trainable[theirs]
    assert any("lora_magnitude_vector.default.weight" in n for n in trainable[ours])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (theirs, ours):
        model.train()
    (l_t, g_t), (l_o, g_o) = _loss_and_grads(theirs, kind), _loss_and_grads(ours, kind)
    torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)
    assert sorted(g_o) == sorted(g_t)
    assert any("lora_magnitude_vector" in n for n in g_o)
    for name in g_t:
        torch.testing.assert_close(g_o[name], g_t[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_eval_outputs_and_fresh_adapter_like_hf(kind):
    theirs, ours = _twins(kind)
    inputs = make_inputs(kind)
    torch.testing.assert_close(output_of(ours.eval(), inputs), output_of(theirs.eval(), inputs), rtol=1e-5, atol=1e-5)
    # the default init (B = 0): magnitudes are the base weights' norms and the model is unchanged
    base = make_model(kind)
    torch.manual_seed(3)
    fresh_t = peft.get_peft_model(copy.deepcopy(base), _cfg(peft, kind, init_lora_weights=True))
    torch.manual_seed(3)
    fresh_o = peft_fast.get_peft_model(copy.deepcopy(base), _cfg(peft_fast, kind, init_lora_weights=True))
    mags_t = {k: v for k, v in fresh_t.state_dict().items() if "magnitude" in k}
    mags_o = {k: v for k, v in fresh_o.state_dict().items() if "magnitude" in k}
    assert sorted(mags_o) == sorted(mags_t) and mags_o
    for k in mags_t:
        torch.testing.assert_close(mags_o[k], mags_t[k], rtol=0, atol=0)
    torch.testing.assert_close(output_of(fresh_o, inputs), output_of(base, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapter_files_both_ways(kind, tmp_path):
    theirs, ours = _twins(kind)
    inputs = make_inputs(kind)
    want = output_of(theirs.eval(), inputs)
    theirs.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    hf_file = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    # the adapter's own keys (the embedding-layer copies saved alongside are LoRA's, not DoRA's, business)
    adapter_keys = sorted(k for k in hf_file if "lora_" in k)
    assert sorted(k for k in our_file if "lora_" in k) == adapter_keys
    assert any(k.endswith("lora_magnitude_vector") for k in adapter_keys)
    for k in adapter_keys:
        torch.testing.assert_close(our_file[k], hf_file[k], rtol=0, atol=0)
    loaded_o = peft_fast.PeftModel.from_pretrained(make_model(kind), tmp_path / "hf")
    loaded_t = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "ours")
    assert loaded_o.peft_config["default"].use_dora is True
    torch.testing.assert_close(output_of(loaded_o.eval(), inputs), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output_of(loaded_t.eval(), inputs), want, rtol=1e-5, atol=1e-5)


def _layers(model):
    from peft.tuners.lora import LoraLayer as HFLoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, (HFLoraLayer, LoraLayer))}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("adapter_names", [None, ["other"], ["default", "other"]])
def test_merge_unmerge_like_hf(kind, adapter_names):
    theirs, ours = _twins(kind, second={"r": 2, "lora_alpha": 3})
    inputs = make_inputs(kind)
    for model in (theirs, ours):
        model.eval()
        model.merge_adapter(adapter_names=adapter_names)
    w_t = {n: m.get_base_layer().weight for n, m in _layers(theirs).items()}
    for name, layer in _layers(ours).items():
        assert layer.merged_adapters == _layers(theirs)[name].merged_adapters
        torch.testing.assert_close(layer.base_layer.weight, w_t[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), rtol=1e-4, atol=1e-4)
    original = make_model(kind).state_dict()
    for model in (theirs, ours):
        model.unmerge_adapter()
    for name, layer in _layers(ours).items():
        assert not layer.merged
        torch.testing.assert_close(
            layer.base_layer.weight, _layers(theirs)[name].get_base_layer().weight, rtol=1e-5, atol=1e-6
        )
    key = "model.layers.0.self_attn.q_proj.weight" if kind == "llama" else "transformer.h.0.attn.c_attn.weight"
    layer_name = key.rsplit(".", 1)[0]
    ours_w = next(m.base_layer.weight for n, m in _layers(ours).items() if n.endswith(layer_name))
    torch.testing.assert_close(ours_w, original[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_disable_and_delete_like_hf(kind):
    theirs, ours = _twins(kind, second={"r": 2, "lora_alpha": 3})
    inputs = make_inputs(kind)
    for model in (theirs, ours):
        model.eval()
    with theirs.disable_adapter(), ours.disable_adapter():
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(output_of(ours, inputs), output_of(make_model(kind), inputs), rtol=0, atol=0)
    for model in (theirs, ours):
        model.delete_adapter("default")
        model.set_adapter("other")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad
    )
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), rtol=1e-5, atol=1e-5)
    plain_t, plain_o = theirs.merge_and_unload(), ours.merge_and_unload()
    assert sorted(plain_o.state_dict()) == sorted(plain_t.state_dict())
    torch.testing.assert_close(output_of(plain_o, inputs), output_of(plain_t, inputs), rtol=1e-4, atol=1e-4)


def test_safe_merge_like_hf():
    theirs, ours = _twins()
    for model in (theirs, ours):
        model.merge_adapter(safe_merge=True)
    inputs = make_inputs("llama")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), rtol=1e-4, atol=1e-4)
    for model in (theirs, ours):
        model.unmerge_adapter()
        layer = _layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
        with torch.no_grad():
            layer.lora_B["default"].weight[0, 0] = float("inf")
    for model in (theirs, ours):
        with pytest.raises(ValueError):
            model.merge_adapter(safe_merge=True)
    q_proj = _layers(ours)["base_model.model.model.layers.0.self_attn.q_proj"]
    assert not q_proj.merged and torch.isfinite(q_proj.base_layer.weight).all()


def test_eval_norm_cache_follows_every_change():
    _, ours = _twins()
    ours.eval()
    inputs = make_inputs("llama")
    layer = _layers(ours)["base_model.model.model.layers.0.self_attn.q_proj"]
    first = output_of(ours, inputs)
    assert len(layer._dora_norms) == 1  # cached in eval mode
    torch.testing.assert_close(output_of(ours, inputs), first, rtol=0, atol=0)

    def fresh_model_output(scale=1.0):  # the same weights in a model that never cached anything
        twin = peft_fast.get_peft_model(make_model("llama"), _cfg(peft_fast, "llama"))
        twin.load_state_dict(ours.state_dict())
        _layers(twin)["base_model.model.model.layers.0.self_attn.q_proj"].set_scale("default", scale)
        return output_of(twin.eval(), inputs)

    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(1.5)  # an in-place change (what an optimizer does)
    changed = output_of(ours, inputs)
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, fresh_model_output(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        layer.base_layer.weight.add_(0.25)
    torch.testing.assert_close(output_of(ours, inputs), fresh_model_output(), rtol=1e-6, atol=1e-6)
    layer.set_scale("default", 0.5)
    torch.testing.assert_close(output_of(ours, inputs), fresh_model_output(0.5), rtol=1e-6, atol=1e-6)
    layer.set_scale("default", 1.0)
    ours.train()
    assert len(layer._dora_norms) == 0  # train() clears it, as HF peft's cache
    ours.merge_adapter()
    assert len(layer._dora_norms) == 0


def test_embedding_dora_like_hf():
    theirs, ours = _twins("llama", lora_dropout=0.1)
    emb_t = _layers(theirs)["base_model.model.model.embed_tokens"]
    emb_o = _layers(ours)["base_model.model.model.embed_tokens"]
    assert emb_o.lora_magnitude_vector["default"].weight.shape == (32,)
    ids = make_inputs("llama")["input_ids"]
    for model in (theirs, ours):
        model.train()
    out_t, out_o = emb_t(ids), emb_o(ids)
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-6)
    (out_t.square().sum()).backward()
    (out_o.square().sum()).backward()
    for name in ("lora_embedding_A.default", "lora_embedding_B.default", "lora_magnitude_vector.default.weight"):
        got = emb_o.get_parameter(name).grad
        torch.testing.assert_close(got, emb_t.get_parameter(name).grad, rtol=1e-5, atol=1e-6, msg=name)


# (first adapter's use_dora, second's): HF peft applies active adapters in turn, a DoRA one
# rescaling the output its predecessors left (base_result = result - bias without dropout).
CHAINS = {"dora+dora": (True, True), "dora+lora": (True, False), "lora+dora": (False, True)}


def _chained_twins(kind, chain, dropout=0.0):
    first, second = CHAINS[chain]
    other = {"r": 2, "lora_alpha": 3, "use_dora": second, "lora_dropout": dropout}
    theirs, ours = _twins(kind, second=other, use_dora=first, lora_dropout=dropout)
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "other"])
    return theirs, ours


@pytest.mark.parametrize(
    "kind,chain,dropout",
    [("llama", "dora+dora", 0.2), ("llama", "lora+dora", 0.0), ("gpt2", "dora+lora", 0.2), ("gpt2", "dora+dora", 0.0)],
)
def test_several_active_adapters_train_like_hf(kind, chain, dropout):
    theirs, ours = _chained_twins(kind, chain, dropout)
    trainable = {m: sorted(n for n, p in m.named_parameters() if p.requires_grad) for m in (theirs, ours)}
    assert trainable[ours] == trainable[theirs]
    assert any(".other" in n for n in trainable[ours]) and any(".default" in n for n in trainable[ours])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (theirs, ours):
        model.train()
    (l_t, g_t), (l_o, g_o) = _loss_and_grads(theirs, kind), _loss_and_grads(ours, kind)
    torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=1e-6)
    assert sorted(g_o) == sorted(g_t)
    assert any(".other" in n for n in g_o) and any("lora_magnitude_vector" in n for n in g_o)
    for name in g_t:
        torch.testing.assert_close(g_o[name], g_t[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind,chain", [("llama", "dora+lora"), ("gpt2", "lora+dora"), ("llama", "dora+dora")])
def test_several_active_adapters_eval_merge_and_files_like_hf(kind, chain, tmp_path):
    theirs, ours = _chained_twins(kind, chain)
    inputs = make_inputs(kind)
    for model in (theirs, ours):
        model.eval()
    want = output_of(theirs, inputs)
    torch.testing.assert_close(output_of(ours, inputs), want, rtol=1e-5, atol=1e-5)
    ours.base_model.set_adapter("default")  # the chain is not the first adapter alone
    assert not torch.allclose(output_of(ours, inputs), want, rtol=1e-3, atol=1e-3)
    ours.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(output_of(ours, inputs), want, rtol=1e-5, atol=1e-5)  # from the norm cache

    # adapter files both ways: each library loads the other's two adapters and gives the same chain
    theirs.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    for sub, dora in zip(("", "other"), CHAINS[chain]):  # adapters' own keys (embedding-layer copies aside)
        hf_file = peft_fast.load_peft_weights(str(tmp_path / "hf" / sub))
        our_file = peft_fast.load_peft_weights(str(tmp_path / "ours" / sub))
        adapter_keys = sorted(k for k in hf_file if "lora_" in k)
        assert sorted(k for k in our_file if "lora_" in k) == adapter_keys
        assert any(k.endswith("lora_magnitude_vector") for k in adapter_keys) == dora
        for k in adapter_keys:
            torch.testing.assert_close(our_file[k], hf_file[k], rtol=0, atol=0)
    loaded_o = peft_fast.PeftModel.from_pretrained(make_model(kind), tmp_path / "hf")
    loaded_o.load_adapter(tmp_path / "hf" / "other", adapter_name="other")
    loaded_t = peft.PeftModel.from_pretrained(make_model(kind), tmp_path / "ours")
    loaded_t.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    for model in (loaded_o, loaded_t):
        model.base_model.set_adapter(["default", "other"])
        torch.testing.assert_close(output_of(model.eval(), inputs), want, rtol=1e-5, atol=1e-5)

    # merging both (HF merges them in turn, each DoRA norm taken of the unmerged weight)
    for model in (theirs, ours):
        model.merge_adapter()
    for name, layer in _layers(ours).items():
        assert layer.merged_adapters == _layers(theirs)[name].merged_adapters == ["default", "other"]
        want_w = _layers(theirs)[name].get_base_layer().weight
        torch.testing.assert_close(layer.base_layer.weight, want_w, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), rtol=1e-4, atol=1e-4)
    for model in (theirs, ours):
        model.unmerge_adapter()
    torch.testing.assert_close(output_of(ours, inputs), want, rtol=1e-4, atol=1e-4)
    plain_t, plain_o = theirs.merge_and_unload(), ours.merge_and_unload()
    assert sorted(plain_o.state_dict()) == sorted(plain_t.state_dict())
    torch.testing.assert_close(output_of(plain_o, inputs), output_of(plain_t, inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2"])
def test_mixed_batch_with_dora_as_hf(kind):
    """HF peft refuses `adapter_names` naming a DoRA adapter, and serves a batch that names only
    plain LoRA adapters (and "__base__") of a model that also holds DoRA adapters."""
    theirs, ours = _twins(kind, second={"r": 2, "lora_alpha": 3, "use_dora": False})
    inputs = make_inputs(kind)
    for model in (theirs, ours):
        model.eval()
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            output_of(model, inputs, adapter_names=["default", "other", "__base__"])
    names = ["other", "__base__", "other"]
    want = output_of(theirs, inputs, adapter_names=names)
    torch.testing.assert_close(output_of(ours, inputs, adapter_names=names), want, rtol=1e-5, atol=1e-5)
    ours.base_model.set_adapter("other")
    only_other = output_of(ours, inputs)
    torch.testing.assert_close(want[0], only_other[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want[1], output_of(make_model(kind), inputs)[1], rtol=1e-5, atol=1e-5)


def test_refusals():
    _, ours = _twins(second={"r": 2, "lora_alpha": 3})
    inputs = make_inputs("llama")
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        output_of(ours, inputs, adapter_names=["default", "other", "__base__"])
    with pytest.raises(ValueError, match="DoRA does not support megatron_core"):
        peft_fast.LoraConfig(use_dora=True, megatron_config={"a": 1})
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        peft_fast.LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        peft_fast.LoraConfig(use_dora="yes")
    # HF peft refuses the same two combinations
    with pytest.raises(ValueError, match="DoRA does not support megatron_core"):
        peft.LoraConfig(use_dora=True, megatron_config={"a": 1})
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        peft.LoraConfig(use_dora=True, lora_bias=True)


# -- merging several adapters on float layers: the weights HF peft gets, bit for bit ------------------
# HF peft merges adapters in turn; a DoRA adapter's norm needs the base without the adapters merged
# before it, which HF recovers by really unmerging them and merging them again (`_unmerged_base_weight`).
# Every base weight after every merge / unmerge must be torch.equal to HF's (fp32), on Linear (Llama),
# Conv1D with fan_in_fan_out (GPT-2) and Embedding (both), with the warnings HF gives.
MERGE_STACKS = {
    "dora+dora": (True, True),
    "lora+dora": (False, True),
    "dora+lora": (True, False),
    "dora+dora+dora": (True, True, True),
    "dora+lora+dora": (True, False, True),
    "lora+dora+lora": (False, True, False),
}
STACK_NAMES = ("default", "other", "third")


def _stack_twins(kind, doras, dtype=torch.float32):
    """(HF peft model, peft_fast model) over a base in `dtype`, holding one adapter per entry of
    `doras` (True: DoRA), all active."""
    base = make_model(kind).to(dtype)
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(base), _cfg(peft, kind, use_dora=doras[0]))
    ours = peft_fast.get_peft_model(copy.deepcopy(base), _cfg(peft_fast, kind, use_dora=doras[0]))
    for k, (name, dora) in enumerate(zip(STACK_NAMES[1:], doras[1:])):
        more = {"r": 2 + k, "lora_alpha": 3 + k, "use_dora": dora}
        theirs.add_adapter(name, _cfg(peft, kind, **more))
        ours.add_adapter(name, _cfg(peft_fast, kind, **more))
    ours.load_state_dict(theirs.state_dict())
    names = list(STACK_NAMES[: len(doras)])
    for model in (theirs, ours):
        model.base_model.set_adapter(names)
        model.eval()
    return theirs, ours, names


def _warned(call):
    """The UserWarning messages `call()` gives, in order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _same_step(theirs, ours, step):
    """Run `step(model)` on both models: the same warnings, then every base weight equal to HF's."""
    assert _warned(lambda: step(ours)) == _warned(lambda: step(theirs))
    hf_layers = _layers(theirs)
    layers = _layers(ours)
    assert sorted(layers) == sorted(hf_layers)
    for name, layer in layers.items():
        hf = hf_layers[name]
        assert layer.merged_adapters == hf.merged_adapters, name
        assert torch.equal(layer.base_layer.weight, hf.get_base_layer().weight), name


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("stack", list(MERGE_STACKS))
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merging_several_adapters_gives_hf_weights_exactly(kind, stack, safe_merge):
    theirs, ours, names = _stack_twins(kind, MERGE_STACKS[stack])
    kinds = {type(m.base_layer).__name__ for m in _layers(ours).values()}
    assert kinds == ({"Linear", "Embedding"} if kind == "llama" else {"Conv1D", "Embedding"})
    original = {n: m.base_layer.weight.clone() for n, m in _layers(ours).items()}

    _same_step(theirs, ours, lambda m: m.merge_adapter(safe_merge=safe_merge))  # together
    assert all(not torch.equal(m.base_layer.weight, original[n]) for n, m in _layers(ours).items())
    _same_step(theirs, ours, lambda m: m.unmerge_adapter())
    for name in names:  # in turn, from the second on with HF's "Already ... merged" warning
        _same_step(theirs, ours, lambda m, name=name: m.merge_adapter(adapter_names=[name], safe_merge=safe_merge))
    _same_step(theirs, ours, lambda m: m.merge_adapter(safe_merge=safe_merge))  # all merged: nothing to do
    torch.testing.assert_close(output_of(ours, make_inputs(kind)), output_of(theirs, make_inputs(kind)))
    _same_step(theirs, ours, lambda m: m.unmerge_adapter())
    _same_step(theirs, ours, lambda m: m.unmerge_adapter())  # nothing merged: HF warns once per layer
    for name, layer in _layers(ours).items():  # the replays leave the base as it was, to rounding
        torch.testing.assert_close(layer.base_layer.weight, original[name], rtol=1e-4, atol=1e-5)

    plain = {}
    for model in (theirs, ours):
        warned = _warned(lambda model=model: plain.setdefault(model, model.merge_and_unload(safe_merge=safe_merge)))
        assert warned == []
    sd_t, sd_o = plain[theirs].state_dict(), plain[ours].state_dict()
    assert sorted(sd_o) == sorted(sd_t)
    assert all(torch.equal(sd_o[k], sd_t[k]) for k in sd_t)


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("stack", ["lora+dora+lora", "dora+lora+dora"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merging_into_a_bf16_base_gives_hf_weights_exactly(kind, stack, safe_merge):
    """A bf16 base with fp32 adapters (both libraries' autocast_adapter_dtype): HF's Linear / Conv1D
    merge a plain delta uncast without safe_merge (the sum rounded once into bf16) and cast first
    with it; Embedding always casts first; DoRA rounds its fp32 result once."""
    theirs, ours, names = _stack_twins(kind, MERGE_STACKS[stack], dtype=torch.bfloat16)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    assert {m.base_layer.weight.dtype for m in _layers(ours).values()} == {torch.bfloat16}
    for name in names:
        _same_step(theirs, ours, lambda m, name=name: m.merge_adapter(adapter_names=[name], safe_merge=safe_merge))
    _same_step(theirs, ours, lambda m: m.unmerge_adapter())


@pytest.mark.parametrize("stack", ["lora+dora+lora", "dora+lora+dora"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merging_bf16_adapters_on_cpu_gives_hf_weights_exactly(kind, stack):
    """bf16 adapters on a bf16 base: on CPU HF peft computes each delta B A · scaling in fp32 and
    casts it back once (its get_delta_weight); a bf16 product rounds differently."""
    theirs, ours, names = _stack_twins(kind, MERGE_STACKS[stack], dtype=torch.bfloat16)
    for model in (theirs, ours):
        model.to(torch.bfloat16)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.bfloat16}
    for name in names:
        _same_step(theirs, ours, lambda m, name=name: m.merge_adapter(adapter_names=[name]))
    _same_step(theirs, ours, lambda m: m.unmerge_adapter())
    _same_step(theirs, ours, lambda m: m.merge_adapter(safe_merge=True))
