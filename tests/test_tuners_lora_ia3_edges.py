"""Edges of tuners/lora and tuners/ia3 found by mutation testing (bench/mutation.sh), checked
against HF peft 0.21.2 or hand-computed values."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_inputs, make_model, output_of
from test_qlora import llama_dir, load  # noqa: F401 (llama_dir is a fixture)

import peft_fast


def _both(kind, config_of, dtype=None, **kw):
    """(HF peft model, peft_fast model) from the same seed, ours with HF's adapter weights."""
    models = []
    for lib in (peft, peft_fast):
        base = make_model(kind)
        if dtype is not None:
            base = base.to(dtype)
        torch.manual_seed(3)
        models.append(lib.get_peft_model(base, config_of(lib), **kw).eval())
    theirs, ours = models
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _lora(lib, **kw):
    return lib.LoraConfig(
        **{"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["q_proj"]}
        | kw
    )


# -- LoRA -----------------------------------------------------------------------------------------


def test_two_active_adapters_with_different_dropouts_are_refused():
    ours = peft_fast.get_peft_model(make_model("llama"), _lora(peft_fast, lora_dropout=0.1))
    ours.add_adapter("other", _lora(peft_fast, lora_dropout=0.2))
    ours.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"active adapters \['default', 'other'\] have different lora_dropout values"):
        ours(**make_inputs("llama"))


def test_dora_merge_and_unmerge_keep_a_fp16_base_in_fp16_as_hf_peft():
    theirs, ours = _both("llama", lambda lib: _lora(lib, use_dora=True), dtype=torch.float16)
    layers = [m.base_model.model.model.layers[0].self_attn.q_proj.base_layer for m in (theirs, ours)]
    original = layers[1].weight.detach().clone()
    for m in (theirs, ours):
        m.merge_adapter()
    assert layers[1].weight.dtype == layers[0].weight.dtype == torch.float16
    torch.testing.assert_close(layers[1].weight, layers[0].weight, rtol=1e-3, atol=1e-3)
    for m in (theirs, ours):
        m.unmerge_adapter()
    assert layers[1].weight.dtype == layers[0].weight.dtype == torch.float16
    torch.testing.assert_close(layers[1].weight, original, rtol=1e-3, atol=2e-3)


def test_embedding_lora_takes_the_base_dtype_without_autocast_as_hf_peft():
    theirs, ours = _both(
        "llama",
        lambda lib: _lora(lib, target_modules=["embed_tokens"]),
        dtype=torch.float16,
        autocast_adapter_dtype=False,
    )
    want = {n: p.dtype for n, p in theirs.named_parameters() if "lora_embedding" in n}
    assert set(want.values()) == {torch.float16}
    assert {n: p.dtype for n, p in ours.named_parameters() if "lora_embedding" in n} == want


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora"])
def test_fan_in_fan_out_on_a_linear_warns_naming_the_module(method):
    cfg = {
        "lora": lambda: _lora(peft_fast, fan_in_fan_out=True),
        "ia3": lambda: peft_fast.IA3Config(
            task_type="CAUSAL_LM", target_modules=["q_proj"], feedforward_modules=[], fan_in_fan_out=True
        ),
        "adalora": lambda: peft_fast.AdaLoraConfig(
            task_type="CAUSAL_LM", target_modules=["q_proj"], total_step=10, fan_in_fan_out=True
        ),
    }[method]()
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=True but 'model\.layers\.0\.self_attn\.q_proj' is an nn"):
        peft_fast.get_peft_model(make_model("llama"), cfg)


# -- IA3 ------------------------------------------------------------------------------------------


def _ia3(lib, **kw):
    return lib.IA3Config(
        **{"task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"], "feedforward_modules": []} | kw
    )


def _random_ia3(theirs, ours):
    g = torch.Generator().manual_seed(4)
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                own[n].copy_(p)


def test_ia3_two_active_adapters_multiply_as_hf_peft():
    models = []
    for lib in (peft, peft_fast):
        torch.manual_seed(3)
        m = lib.get_peft_model(make_model("llama"), _ia3(lib))
        m.add_adapter("other", _ia3(lib))
        m.base_model.set_adapter(["default", "other"])
        models.append(m.eval())
    theirs, ours = models
    _random_ia3(theirs, ours)
    inputs = make_inputs("llama")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs))


def test_ia3_unmerge_restores_the_bias_as_hf_peft():
    theirs, ours = _both("opt", _ia3)
    _random_ia3(theirs, ours)
    bias = ours.base_model.model.model.decoder.layers[0].self_attn.q_proj.base_layer.bias
    want = theirs.base_model.model.model.decoder.layers[0].self_attn.q_proj.base_layer.bias
    with torch.no_grad():  # the tiny OPT starts its biases at zero, which would hide the bias update
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(6)))
        want.copy_(bias)
    original = bias.detach().clone()
    for m in (theirs, ours):
        m.merge_adapter()
        m.unmerge_adapter()
    torch.testing.assert_close(bias, want)
    torch.testing.assert_close(bias, original, rtol=1e-5, atol=1e-6)


# -- bitsandbytes ---------------------------------------------------------------------------------


def test_8bit_lora_refuses_mixed_batches_and_safe_merges_finite_weights(llama_dir):  # noqa: F811
    kw = dict(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ours = peft_fast.get_peft_model(load(llama_dir, "int8"), peft_fast.LoraConfig(**kw))
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"adapter_names \(mixed adapter batches\) are not supported on 8-bit layers"):
        ours(input_ids=ids, adapter_names=["default", "default"])
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.warns(UserWarning, match="8-bit"):
        layer.merge(safe_merge=True)
    assert layer.merged


def test_8bit_ia3_computes_fp16_inputs_in_fp32_as_hf_peft(llama_dir):  # noqa: F811
    # HF peft's int8 IA3 layer casts a non-fp32 input to fp32 (outside autocast); a whole fp16 model then fails
    # in HF peft's attention (query fp32, key fp16), so the oracle is the layer: base_layer(x.float()) * l
    kw = dict(target_modules=["q_proj"], feedforward_modules=[])
    ours = peft_fast.get_peft_model(load(llama_dir, "int8", dtype=torch.float16), peft_fast.IA3Config(**kw)).eval()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.ia3_l["default"].copy_(
            torch.rand(layer.ia3_l["default"].shape, generator=torch.Generator().manual_seed(2))
        )
        x = torch.randn(2, 3, layer.base_layer.in_features, generator=torch.Generator().manual_seed(3)).half()
        got = layer(x)
        want = layer.base_layer(x.float()) * layer.ia3_l["default"].flatten()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_4bit_ia3_gets_the_4bit_layer(llama_dir):  # noqa: F811
    kw = dict(target_modules=["q_proj"], feedforward_modules=[])
    ours = peft_fast.get_peft_model(load(llama_dir, "nf4-dq-fp32"), peft_fast.IA3Config(**kw))
    assert type(ours.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "IA3Linear4bit"


def test_use_dora_changed_after_the_config_is_refused_by_the_layer():
    cfg = _lora(peft_fast)
    cfg.use_dora = "yes"
    with pytest.raises(TypeError, match="use_dora must be True or False, got 'yes'"):
        peft_fast.get_peft_model(make_model("llama"), cfg)


def test_lora_layer_train_defaults_to_training():
    ours = peft_fast.get_peft_model(make_model("llama"), _lora(peft_fast))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    layer.eval()
    layer.train()
    assert layer.training and layer.lora_A.training


def test_injecting_a_second_adapter_keeps_the_layers_active_adapter_as_hf_peft():
    active = []
    for lib in (peft, peft_fast):
        m = lib.get_peft_model(make_model("llama"), _lora(lib))
        if lib is peft:  # HF peft's inject_adapter reads the config from peft_config
            m.base_model.peft_config["other"] = _lora(peft)
            m.base_model.inject_adapter(m.base_model.model, "other")
        else:
            m.base_model.inject_adapter(m.base_model.model, "other", _lora(peft_fast))
        active.append(m.base_model.model.model.layers[0].self_attn.q_proj.active_adapters)
    assert active[0] == ["default"]
    assert active[1] == active[0]


def test_4bit_merge_without_quant_state_names_the_layer(llama_dir):  # noqa: F811
    config = peft_fast.LoraConfig(r=2, target_modules=["k_proj"])
    ours = peft_fast.get_peft_model(load(llama_dir, "nf4-dq-fp32"), config)
    layer = ours.base_model.model.model.layers[1].self_attn.k_proj
    layer.base_layer.weight.quant_state = None
    layer.base_layer.quant_state = None
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.*no quant_state"):
        layer.merge()
