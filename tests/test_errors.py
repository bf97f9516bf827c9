"""Bad input gets a clear ValueError/TypeError whose message names the argument and what was wrong."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_inputs, make_model
from safetensors.torch import load_file, save_file

import peft_fast
from peft_fast import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    set_peft_model_state_dict,
)


def _lora(kind="llama", **kw):
    kw.setdefault("init_lora_weights", False)
    return get_peft_model(make_model(kind), LoraConfig(r=4, **kw)).eval()


# -- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -1, 1.5, True, "8"])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"\br must be a positive integer"):
        LoraConfig(r=r)


@pytest.mark.parametrize("value", [{"q_proj": 0}, {"q_proj": -2}, {"q_proj": 2.5}])
def test_bad_rank_pattern(value):
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]"):
        LoraConfig(rank_pattern=value)


def test_bad_pattern_types():
    with pytest.raises(TypeError, match="rank_pattern"):
        LoraConfig(rank_pattern=[("q_proj", 2)])
    with pytest.raises(TypeError, match="alpha_pattern"):
        LoraConfig(alpha_pattern="q_proj")


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1"])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match="lora_dropout must be in \\[0, 1\\)"):
        LoraConfig(lora_dropout=p)


def test_bad_alpha():
    with pytest.raises(TypeError, match="lora_alpha"):
        LoraConfig(lora_alpha="16")


@pytest.mark.parametrize("bias", ["some", None, True])
def test_bad_bias(bias):
    with pytest.raises(ValueError, match="bias must be"):
        LoraConfig(bias=bias)


def test_bad_init_lora_weights():
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa")


@pytest.mark.parametrize(
    "option",
    [
        {"lora_bias": True},
        {"use_qalora": True},
        {"layer_replication": [[0, 1]]},
        {"loftq_config": {"loftq_bits": 4}},
        {"trainable_token_indices": [1, 2]},
    ],
    ids=lambda o: next(iter(o)),
)
def test_unsupported_hf_options_refused(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{name}=.*not supported"):
        LoraConfig(**option)


def test_unsupported_option_in_a_file_refused(tmp_path):
    _lora().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_qalora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_qalora"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_bad_enums():
    with pytest.raises(ValueError, match="task_type"):
        LoraConfig(task_type="CAUSAL")
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig(peft_type="IA3")


def test_layer_selection_needs_a_list():
    with pytest.raises(ValueError, match="layers_pattern"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_ia3_feedforward_not_subset():
    with pytest.raises(ValueError, match="feedforward_modules.*subset of target_modules"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])  # fine


def test_from_dict_peft_type():
    with pytest.raises(ValueError, match="peft_type 'NOT_A_METHOD'"):
        PeftConfig.from_dict({"peft_type": "NOT_A_METHOD", "r": 8})
    with pytest.raises(ValueError, match="peft_type 'OFT'.*not supported"):
        PeftConfig.from_dict({"peft_type": "OFT"})
    with pytest.raises(ValueError, match="total_step"):  # a method we have, with a config it refuses
        PeftConfig.from_dict({"peft_type": "ADALORA"})
    assert type(PeftConfig.from_dict({"peft_type": "PROMPT_TUNING"})).__name__ == "PromptTuningConfig"
    with pytest.raises(ValueError, match="peft_type"):
        PeftConfig.from_dict({"r": 8})
    with pytest.warns(UserWarning, match="made_up_key"):
        cfg = PeftConfig.from_dict({"peft_type": "LORA", "r": 2, "made_up_key": 1})
    assert isinstance(cfg, LoraConfig) and cfg.r == 2


# -- targets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["not_a_layer"], ["q_proj_x", "nope"], r".*\.not_a_layer"])
def test_targets_matching_nothing(targets):
    model = make_model("llama")
    shown = targets if isinstance(targets, str) else sorted(targets)
    for cfg in (LoraConfig(target_modules=targets), IA3Config(target_modules=targets, feedforward_modules=[])):
        with pytest.raises(ValueError, match=re.escape(repr(shown)) + ".*matched no module"):
            get_peft_model(model, cfg)
        assert not hasattr(model, "peft_config")  # nothing half-done left behind


def test_layers_to_transform_matching_nothing():
    # names the option at fault, not target_modules (which does match q_proj)
    with pytest.raises(ValueError, match=r"layers_to_transform names layers \[5\] that the model does not have"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))


def test_unsupported_target_type():
    with pytest.raises(ValueError, match="input_layernorm.*LlamaRMSNorm"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["input_layernorm"]))
    with pytest.raises(ValueError, match="embed_tokens.*Embedding"):
        get_peft_model(make_model("llama"), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))


def test_no_default_targets():
    model = make_model("llama")
    model.config.model_type = "made_up"
    with pytest.raises(ValueError, match="target_modules is not set.*'made_up'"):
        get_peft_model(model, LoraConfig())


# -- get_peft_model / PeftModel arguments --------------------------------------------------------
def test_get_peft_model_twice():
    model = make_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has adapters.*add_adapter"):
        get_peft_model(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has adapters"):
        get_peft_model(peft_model, LoraConfig(r=2))


def test_get_peft_model_argument_types():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        get_peft_model("llama", LoraConfig())
    with pytest.raises(TypeError, match="peft_config must be a PeftConfig"):
        get_peft_model(make_model("llama"), {"r": 8})
    with pytest.raises(ValueError, match="adapter_name"):
        get_peft_model(make_model("llama"), LoraConfig(), adapter_name="a.b")
    with pytest.raises(ValueError, match="adapter_name"):
        get_peft_model(make_model("llama"), LoraConfig(), adapter_name="")
    with pytest.raises(ValueError, match="mixed=True"):
        get_peft_model(make_model("llama"), LoraConfig(), mixed=True)


def test_adapter_names_for_set_and_delete():
    model = _lora()
    with pytest.raises(ValueError, match="adapter 'nope' does not exist.*default"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="adapter 'nope' does not exist"):
        model.delete_adapter("nope")
    with pytest.raises(TypeError, match="adapter_name must be a string"):
        model.set_adapter(["default"])
    assert model.active_adapter == "default"


def test_add_existing_adapter_name(tmp_path):
    model = _lora()
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        model.add_adapter("default", LoraConfig(r=2))
    # load_adapter into an existing adapter replaces its weights (HF peft's rule, see
    # tests/test_clients.py); the folder must hold the same method and shapes.
    get_peft_model(make_model("llama"), IA3Config()).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="adapter 'default' is LORA; the folder .* holds a IA3 adapter"):
        model.load_adapter(tmp_path / "ia3", adapter_name="default")
    get_peft_model(make_model("llama"), LoraConfig(r=2)).save_pretrained(tmp_path / "r2")
    with pytest.raises(ValueError, match="shapes do not fit"):
        model.load_adapter(tmp_path / "r2", adapter_name="default")
    with pytest.raises(ValueError, match="IA3.*LORA|one method per model"):
        model.add_adapter("ia3", IA3Config())


def test_second_adapter_with_bias():
    model = get_peft_model(make_model("gpt2"), LoraConfig(r=2, bias="all"))
    with pytest.raises(ValueError, match="bias"):
        model.add_adapter("other", LoraConfig(r=2, bias="all"))


# -- mixed batches -------------------------------------------------------------------------------
def test_adapter_names_length_and_names():
    model = _lora()
    model.add_adapter("other", LoraConfig(r=2, init_lora_weights=False))
    inputs = make_inputs("llama", batch=3)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        model(**inputs, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="adapter_names has 4 entries but the batch has 3 rows"):
        model(**inputs, adapter_names=["default"] * 4)
    with pytest.raises(ValueError, match=r"adapter_names contains unknown adapters \['typo'\]"):
        model(**inputs, adapter_names=["default", "typo", "other"])
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        model(**inputs, adapter_names="default")
    inputs.pop("attention_mask")
    with pytest.raises(ValueError, match="adapter_names"):
        model.generate(**inputs, max_new_tokens=2, adapter_names=["default"])


# -- adapter files -------------------------------------------------------------------------------
def _saved(tmp_path, **kw):
    model = _lora(**kw)
    model.save_pretrained(tmp_path)
    return model


def test_shapes_that_do_not_fit(tmp_path):
    _saved(tmp_path)  # r=4
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shapes do not fit.*lora_A.*\(4, 32\).*\(8, 32\)"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    # a base model of another size
    cfg["r"] = 4
    cfg_path.write_text(json.dumps(cfg))
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(ValueError, match="shapes do not fit"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_extra_keys_in_file(tmp_path):
    _saved(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no place for.*mlp\.up_proj\.lora_A\.weight"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_missing_keys_in_file(tmp_path):
    _saved(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del weights[dropped]
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing from the file.*" + re.escape(dropped)):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_state_dict_that_does_not_fit():
    model = _lora()
    sd = peft_fast.get_peft_model_state_dict(model)
    with pytest.raises(ValueError, match="missing from the file"):
        set_peft_model_state_dict(model, dict(list(sd.items())[1:]))
    with pytest.raises(ValueError, match="no place for"):
        set_peft_model_state_dict(model, {**sd, "foo.lora_A.weight": torch.zeros(1)})
    key = next(iter(sd))
    with pytest.raises(ValueError, match="shapes do not fit"):
        set_peft_model_state_dict(model, {**sd, key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="adapter 'nope' does not exist"):
        set_peft_model_state_dict(model, sd, adapter_name="nope")
    with pytest.raises(ValueError, match="adapter 'nope' does not exist"):
        peft_fast.get_peft_model_state_dict(model, adapter_name="nope")
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        set_peft_model_state_dict(model, sd, ignore_mismatched_sizes=True)


def test_missing_adapter_folder(tmp_path):
    missing = tmp_path / "no_such_adapter"
    with pytest.raises(ValueError, match=re.escape(str(missing)) + ".*does not exist"):
        PeftModel.from_pretrained(make_model("llama"), missing)
    with pytest.raises(ValueError, match="does not exist"):
        PeftConfig.from_pretrained(missing)
    with pytest.raises(ValueError, match="does not exist"):
        peft_fast.load_peft_weights(missing)


def test_folder_without_config(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="no adapter_config.json in adapter folder"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    model = _lora()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        model.load_adapter(tmp_path, adapter_name="other")
    assert list(model.peft_config) == ["default"]


def test_folder_without_weights(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors or adapter_model.bin"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_file_arguments(tmp_path):
    model = _saved(tmp_path)
    with pytest.raises(ValueError, match="save_directory must be a directory"):
        model.save_pretrained(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match=r"selected_adapters.*\['nope'\]"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    with pytest.raises(TypeError, match="made_up"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path, made_up=1)
    with pytest.raises(TypeError, match="made_up"):
        PeftConfig.from_pretrained(tmp_path, made_up=1)
