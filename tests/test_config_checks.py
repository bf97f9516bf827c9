"""Configs that say what they did: warnings where HF peft warns (and where it stays silent but
an option did nothing), refusals that name the option at fault, clear errors for config files
that are not a JSON object."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
from conftest import make_model

import peft_fast
from peft_fast import LoraConfig, PeftModel, get_peft_model
from peft_fast.config import CONFIG_NAME, PeftConfig

TARGETS = ["q_proj", "v_proj"]


def _warnings_of(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, (RuntimeWarning, UserWarning))]


@pytest.mark.parametrize("attr", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_that_match_nothing_warn_as_in_hf_peft(attr):
    patterns = {"q_proj": 2, "nope": 4, "layers.7.self_attn.v_proj": 6}
    ours = _warnings_of(
        lambda: get_peft_model(make_model("llama"), LoraConfig(target_modules=TARGETS, **{attr: patterns}))
    )
    hf = _warnings_of(
        lambda: peft.get_peft_model(make_model("llama"), peft.LoraConfig(target_modules=TARGETS, **{attr: patterns}))
    )
    unmatched = ["layers.7.self_attn.v_proj", "nope"]
    assert any(attr in w and str(unmatched) in w for w in hf), hf  # the oracle: HF peft warns for these keys
    assert [w for w in ours if attr in w] == [
        f"{attr} keys {unmatched} match no adapted module and are ignored; adapted modules include"
        " ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', 'model.layers.1.self_attn.q_proj']"
    ]


def test_matching_pattern_keys_do_not_warn():
    config = LoraConfig(target_modules=TARGETS, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*": 3})
    assert not [w for w in _warnings_of(lambda: get_peft_model(make_model("llama"), config)) if "pattern" in w]


def test_modules_to_save_that_match_nothing_warn():
    """HF peft says nothing here (its strict check is off for modules_to_save); we warn."""
    config = LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head", "no_such_head"])
    ours = _warnings_of(lambda: get_peft_model(make_model("llama"), config))
    assert [w for w in ours if "modules_to_save" in w] == [
        "modules_to_save entries ['no_such_head'] match no module of the base model; nothing is trained or saved"
        " for them"
    ]
    hf_config = peft.LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head", "no_such_head"])
    hf = _warnings_of(lambda: peft.get_peft_model(make_model("llama"), hf_config))
    assert not [w for w in hf if "no_such_head" in w]


def test_task_heads_added_by_the_task_do_not_warn():
    """SEQ_CLS adds both "classifier" and "score" (as HF peft): a model has one of them."""
    config = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"])
    assert not [w for w in _warnings_of(lambda: get_peft_model(make_model("bert"), config)) if "modules_to_save" in w]


def test_lora_alpha_zero_warns():
    assert any("lora_alpha=0" in w for w in _warnings_of(lambda: LoraConfig(lora_alpha=0)))
    assert not [w for w in _warnings_of(lambda: LoraConfig(lora_alpha=1)) if "lora_alpha" in w]


@pytest.mark.parametrize(
    "layers, pattern, message",
    [
        ([0, 5], None, r"layers_to_transform names layers \[5\] that the model does not have.*are \[0, 1\]"),
        ([5], None, r"layers_to_transform names layers \[5\] that the model does not have"),
        (5, "layers", r"names layers \[5\].*\[0, 1\] \(layers_pattern='layers'\)"),
        (-1, None, r"layers_to_transform must be layer indexes >= 0.*\[-1\]"),
        ([0, -2], None, r"layers_to_transform must be layer indexes >= 0.*\[-2\]"),
    ],
)
def test_layers_to_transform_outside_the_model_is_refused(layers, pattern, message):
    """HF peft adapts what is left (or raises "not found" for an all-out-of-range list); we name the bad indexes."""
    config = LoraConfig(target_modules=TARGETS, layers_to_transform=layers, layers_pattern=pattern)
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_model("llama"), config)


def test_layers_to_transform_inside_the_model_adapts_the_same_modules_as_hf_peft():
    kw = dict(target_modules=TARGETS, layers_to_transform=[1], layers_pattern="layers")
    ours = get_peft_model(make_model("llama"), LoraConfig(**kw))
    hf = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**kw))
    assert sorted(k for k in ours.state_dict() if "lora_A" in k) == sorted(k for k in hf.state_dict() if "lora_A" in k)
    assert all(".layers.1." in k for k in ours.state_dict() if "lora_A" in k)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(layers_to_transform=[0], layers_pattern="blocks"), r"layers_pattern='blocks'.*matches no layer"),
        (dict(exclude_modules=["q_proj", "v_proj"]), r"exclude_modules=\['q_proj', 'v_proj'\] removes 4"),
        (dict(exclude_modules=["v_proj"], modules_to_save=["q_proj"]), r"exclude_modules.*removes 2; modules_to_save"),
    ],
)
def test_an_empty_target_set_names_the_option_at_fault(kw, message):
    with pytest.raises(ValueError, match=r"no module is adapted: target_modules \['q_proj', 'v_proj'\] matches 4"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=TARGETS, **kw))
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=TARGETS, **kw))
    # HF peft refuses these configs too (with a message that does not name layers_pattern's part)
    with pytest.raises(ValueError):
        peft.get_peft_model(make_model("llama"), peft.LoraConfig(target_modules=TARGETS, **kw))


def test_targets_that_name_nothing_keep_their_message():
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] matched no module"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["nope"]))


def test_a_failed_injection_leaves_the_model_without_an_adapter():
    base = make_model("llama")
    with pytest.raises(ValueError, match="layers_to_transform"):
        get_peft_model(base, LoraConfig(target_modules=TARGETS, layers_to_transform=[9]))
    assert not hasattr(base, "peft_config")
    assert not any("lora" in k for k in base.state_dict())


@pytest.mark.parametrize(
    "text, kind",
    [("[1, 2, 3, 4]", "list"), ('"LORA"', "str"), ("7", "int"), ("null", "NoneType")],
)
def test_a_config_file_that_is_not_a_json_object(tmp_path, text, kind):
    get_peft_model(make_model("llama"), LoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(text)
    message = rf"adapter config '.*{CONFIG_NAME}' must hold a JSON object .*got a JSON {kind}"
    with pytest.raises(ValueError, match=message):
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


@pytest.mark.parametrize("text", ["", '{"peft_type": "LORA",', "\xff\xfe{}"])
def test_a_config_file_that_is_not_json(tmp_path, text):
    get_peft_model(make_model("llama"), LoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"adapter config '.*{CONFIG_NAME}' is not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)


def test_from_dict_wants_a_dict():
    with pytest.raises(TypeError, match="must be a dict"):
        PeftConfig.from_dict([("peft_type", "LORA")])
    assert isinstance(PeftConfig.from_dict(json.loads('{"peft_type": "LORA"}')), peft_fast.LoraConfig)
