"""Edges of tuners/base.py and tuners/targets.py found by mutation testing (bench/mutation.sh):
each test checks a value against HF peft 0.21.2 or a hand-computed case."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_inputs, make_model, output_of
from torch import nn

import peft_fast
from peft_fast.tuners.base import BaseTuner, MixedBatch, _layer_index, _suffixes, shortest_target_suffixes


def _lora(lib, **kw):
    base = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
    return lib.LoraConfig(**{**base, **kw})


def _twins(kind, **kw):
    """(HF peft model, peft_fast model) of `kind` with one LoRA adapter and equal weights."""
    cfg = {"task_type": {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}[kind], **kw}
    torch.manual_seed(5)
    theirs = peft.get_peft_model(make_model(kind), _lora(peft, **cfg))
    ours = peft_fast.get_peft_model(make_model(kind), _lora(peft_fast, **cfg))
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


# -- name matching --------------------------------------------------------------------------


def test_layer_index_with_a_list_of_layer_patterns():
    # hand-computed: the number after one of the listed patterns, not after any single character of them
    cfg = peft_fast.LoraConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern=["layers", "h"])
    assert _layer_index(cfg, "model.layers.3.attn.q") == 3
    assert _layer_index(cfg, "transformer.h.2.attn.q") == 2
    assert _layer_index(cfg, "model.s.2.q") is None


def test_name_suffixes_and_the_shortest_target_suffixes():
    assert _suffixes("a.b.c") == ["c", "b.c", "a.b.c"]
    # "c" also names x.c (not a target): the shortest suffix that only targets have is "b.c"
    assert shortest_target_suffixes({"m.a.b.c", "m.d.b.c"}, ["m.x.c", "m.a", "m.d"]) == {"b.c"}


def test_exclude_modules_become_a_set_as_in_hf_peft():
    ours = peft_fast.LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["a", "b"])
    theirs = peft.LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["a", "b"])
    assert isinstance(theirs.exclude_modules, set)
    assert ours.exclude_modules == theirs.exclude_modules
    assert isinstance(ours.exclude_modules, set)


# -- injection ------------------------------------------------------------------------------


class _Plain(nn.Module):
    """A model without a transformers config: a Linear, a ReLU and a nested Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 4)))

    def forward(self, x):
        return self.body(x)


def test_a_model_without_config_gets_lora_as_in_hf_peft():
    torch.manual_seed(0)
    base = _Plain()
    theirs = peft.get_peft_model(_Plain(), _lora(peft, target_modules=["body.0", "body.2.0"]))
    theirs.base_model.model.load_state_dict(base.state_dict(), strict=False)
    ours = peft_fast.get_peft_model(_Plain(), _lora(peft_fast, target_modules=["body.0", "body.2.0"]))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), theirs(x))


def test_no_target_names_the_leaf_modules():
    with pytest.raises(ValueError) as err:
        peft_fast.get_peft_model(_Plain(), _lora(peft_fast, target_modules=["nothing"]))
    # hand-computed: leaves body.0, body.1, body.2.0 -> last name parts {"0", "1"}; "body" and "2" are not leaves
    assert str(err.value).endswith("modules it has include: ['0', '1']")


def test_no_target_message_names_only_the_option_that_removed_them():
    cfg = _lora(
        peft_fast,
        task_type="CAUSAL_LM",
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
        layers_to_transform=[0],
        layers_pattern="blocks",
    )
    with pytest.raises(ValueError) as err:
        peft_fast.get_peft_model(make_model("llama"), cfg)
    msg = str(err.value)
    # the tiny llama has 2 layers, so 2 q_proj; modules_to_save (lm_head) removes none of them
    assert msg.startswith("no module is adapted: target_modules ['q_proj'] matches 2 modules")
    assert msg.endswith(
        "but layers_to_transform=[0] with layers_pattern='blocks' removes 2"
        " (layer indexes found: none, layers_pattern matches no layer)"
    )


def test_all_linear_on_a_classifier_skips_the_head_as_in_hf_peft():
    theirs, ours = _twins("bert", target_modules="all-linear")
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules
    adapted = {n for n, m in ours.named_modules() if isinstance(m, peft_fast.tuners.lora.LoraLayer)}
    assert adapted and not any("classifier" in n for n in adapted)
    inputs = make_inputs("bert")
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs))


def test_tuner_getattr_without_a_model_raises_attribute_error():
    # a tuner whose `model` is not set yet (half-built, or unpickled): an AttributeError, not a recursion
    tuner = BaseTuner.__new__(BaseTuner)
    nn.Module.__init__(tuner)
    with pytest.raises(AttributeError, match="model"):
        tuner.something  # noqa: B018


# -- adapters -------------------------------------------------------------------------------


@pytest.mark.parametrize("active", ["default", ("default", "other")])
def test_deleting_an_active_adapter_leaves_the_active_list_of_hf_peft(active):
    models = []
    for lib in (peft, peft_fast):
        m = lib.get_peft_model(make_model("llama"), _lora(lib, task_type="CAUSAL_LM", target_modules=["q_proj"]))
        m.add_adapter("other", _lora(lib, task_type="CAUSAL_LM", target_modules=["q_proj"]))
        m.add_adapter("third", _lora(lib, task_type="CAUSAL_LM", target_modules=["q_proj"]))
        m.base_model.set_adapter(active if isinstance(active, str) else list(active))
        m.base_model.delete_adapter("default")
        models.append(m)
    theirs, ours = models
    assert theirs.base_model.active_adapter == ["other"]
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter
    assert ours.active_adapter == "other"


def test_merge_refuses_a_string_of_adapter_names():
    _, ours = _twins("llama", target_modules=["q_proj"])
    with pytest.raises(TypeError, match="adapter_names must be a list of adapter names, got the string 'default'"):
        ours.base_model.merge_adapter(adapter_names="default")


@pytest.mark.parametrize("merged", [False, True])
def test_layer_passes_extra_arguments_to_its_base_layer_as_hf_peft(merged):
    # no adapter active on q_proj ("other" is on v_proj) or merged: the base layer gets (x, *args), as in HF
    # peft, so nn.Linear refuses the extra argument in both libraries
    for lib in (peft, peft_fast):
        m = lib.get_peft_model(make_model("llama"), _lora(lib, task_type="CAUSAL_LM", target_modules=["q_proj"]))
        m.add_adapter("other", _lora(lib, task_type="CAUSAL_LM", target_modules=["v_proj"]))
        if merged:
            m.base_model.merge_adapter()
        else:
            m.base_model.set_adapter("other")
        layer = m.base_model.model.model.layers[0].self_attn.q_proj
        x = torch.randn(2, layer.in_features)
        with pytest.raises(TypeError, match="positional argument"):
            layer(x, 1)


# -- modules_to_save ------------------------------------------------------------------------


def _wrapper(model):
    return next(m for m in model.modules() if type(m).__name__ == "ModulesToSaveWrapper")


def test_modules_to_save_wrapper_starts_enabled_as_in_hf_peft():
    theirs, ours = _twins("bert", target_modules=["query", "value"])
    assert _wrapper(theirs).disable_adapters is False
    assert _wrapper(ours).disable_adapters is False


def test_modules_to_save_refuses_two_active_copies():
    _, ours = _twins("bert", target_modules=["query", "value"])
    with pytest.raises(ValueError, match=r"modules_to_save can have only one active adapter, got \['a', 'b'\]"):
        _wrapper(ours).set_adapter(["a", "b"])


def test_two_active_adapters_use_the_first_ones_head():
    # documented (activate_modules_to_save): the head of the first active adapter that has one
    _, ours = _twins("bert", target_modules=["query", "value"])
    ours.add_adapter("other", _lora(peft_fast, task_type="SEQ_CLS", target_modules=["query", "value"]))
    wrapper = _wrapper(ours)
    with torch.no_grad():
        wrapper.modules_to_save["other"].weight.add_(1.0)
    ours.base_model.set_adapter(["other", "default"])
    assert wrapper.active_adapter == "other"
    x = torch.randn(2, wrapper.original_module.in_features)
    torch.testing.assert_close(wrapper(x), wrapper.modules_to_save["other"](x))


@pytest.mark.parametrize("names", [["default"] * 3, ["__base__"] * 3, ["default", "__base__", "default"]])
def test_mixed_batch_through_modules_to_save_matches_hf_peft(names):
    theirs, ours = _twins("bert", target_modules=["query", "value"])
    with torch.no_grad():  # a head that differs from the original, so that the rows' choice shows
        for m in (theirs, ours):
            _wrapper(m).modules_to_save["default"].weight.add_(0.5)
    inputs = make_inputs("bert")
    expected = output_of(theirs, inputs, adapter_names=names)
    torch.testing.assert_close(output_of(ours, inputs, adapter_names=names), expected)


def test_mixed_batch_passes_extra_arguments_to_the_head():
    _, ours = _twins("bert", target_modules=["query", "value"])
    wrapper = _wrapper(ours)
    x = torch.randn(3, wrapper.original_module.in_features)
    with ours.base_model.mixed_batch(["default", "__base__", "default"]):
        with pytest.raises(TypeError, match="positional argument"):
            wrapper(x, 1)


def test_mixed_batch_plan_groups_rows_by_the_layers_adapters():
    mb = MixedBatch(["b", "__base__", "a", "b"])
    plan = mb.plan_for(["a", "b"], torch.device("cpu"))
    # hand-computed: rows' indexes into ["a", "b"] are [1, -1, 0, 1]; rows with an adapter sorted by it
    assert plan.row_adapter.tolist() == [1, -1, 0, 1]
    assert plan.row_order.tolist() == [2, 0, 3]
    assert plan.present == (0, 1)
    assert plan.seg_rows == (1, 2)
    assert plan.seg_start.tolist() == [0, 1, 3]
    assert mb.plan_for(["a", "b"], torch.device("cpu")) is plan  # cached per layer adapter list
    assert mb.rows_for(["b"], torch.device("cpu")).tolist() == [0, -1, -1, 0]
