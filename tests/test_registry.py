"""The method registry (`peft_fast.config.register_peft_method`): built-in methods match HF peft's
registry, and a method registered from outside the package (a toy, defined here) is found by
get_peft_model, PeftModel and config loading, and survives a save and load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import peft
import pytest
import torch
from conftest import make_inputs, make_model, output_of
from torch import nn

import peft_fast.config
from peft_fast import (
    IA3Config,
    LoraConfig,
    LoraModel,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    PromptTuningConfig,
    get_peft_model,
)
from peft_fast.config import register_peft_method, registered_method
from peft_fast.tuners.base import AdapterLayer, BaseTuner


# -- a toy method: a learned vector added to the output of nn.Linear layers -----------------------
@dataclass
class ShiftConfig(PeftConfig):
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_shift: float = 0.0

    PEFT_TYPE: ClassVar[str] = "SHIFT"


class ShiftLinear(AdapterLayer):
    adapter_layer_names = ("shift_v",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.shift_v = nn.ParameterDict()

    def update_layer(self, adapter_name: str, init_shift: float) -> None:
        w = self.base_layer.weight
        self.shift_v[adapter_name] = nn.Parameter(torch.full((w.shape[0],), init_shift, dtype=w.dtype))
        self.set_adapter(self.active_adapters or [adapter_name])

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        names = [a for a in self.active_adapters if a in self.shift_v]
        if not names:
            return None
        return self.base_layer(x) + sum(self.shift_v[n] for n in names)


class ShiftModel(BaseTuner):
    prefix = "shift_"
    layer_cls = ShiftLinear

    def _create_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, key: str) -> AdapterLayer:
        if not isinstance(target, nn.Linear):
            raise ValueError(f"{key!r} is not an nn.Linear")
        layer = ShiftLinear(target)
        layer.update_layer(adapter_name, config.init_shift)
        return layer

    def _update_layer(self, layer: AdapterLayer, adapter_name: str, config: PeftConfig, key: str) -> None:
        layer.update_layer(adapter_name, config.init_shift)


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored to the built-in methods after the test."""
    monkeypatch.setattr(peft_fast.config, "_METHODS", dict(peft_fast.config._METHODS))
    return peft_fast.config._METHODS


@pytest.fixture
def shift_registered(registry):
    register_peft_method(name="shift", config_cls=ShiftConfig, model_cls=ShiftModel)
    return registry


# -- built-in methods ------------------------------------------------------------------------------
def test_built_in_methods_are_registered_as_in_hf_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    ours = peft_fast.config._METHODS
    assert set(ours) == {
        "LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "LOHA", "LOKR", "ADALORA", "VERA", "XLORA"
    }  # fmt: skip
    for peft_type, method in ours.items():
        hf_type = peft.PeftType(peft_type)
        assert method.peft_type == peft_type and method.name == peft_type.lower()
        assert method.prefix == PEFT_TYPE_TO_PREFIX_MAPPING[hf_type]
        assert method.config_cls.__name__ == PEFT_TYPE_TO_CONFIG_MAPPING[hf_type].__name__
        assert method.model_cls.__name__ == PEFT_TYPE_TO_TUNER_MAPPING[hf_type].__name__
        assert method.config_cls.PEFT_TYPE == peft_type
    assert registered_method("LORA").model_cls is LoraModel
    assert registered_method(peft_fast.config.PeftType.LORA).config_cls is LoraConfig


@pytest.mark.parametrize("config", [LoraConfig(r=2), IA3Config(), PromptTuningConfig(num_virtual_tokens=3)])
def test_config_files_load_by_peft_type(tmp_path, config):
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.to_dict() == config.to_dict()


def test_from_peft_type_as_hf_peft():
    kwargs = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    ours, theirs = PeftConfig.from_peft_type(**kwargs), peft.PeftConfig.from_peft_type(**kwargs)
    assert type(ours).__name__ == type(theirs).__name__ == "LoraConfig"
    assert (ours.r, ours.lora_alpha, ours.target_modules) == (theirs.r, theirs.lora_alpha, theirs.target_modules)
    # Called on a method's class, peft_type still picks the class (as in HF peft).
    assert type(LoraConfig.from_peft_type(peft_type="IA3")) is IA3Config
    assert type(IA3Config.from_peft_type(target_modules=["k_proj"])) is IA3Config
    with pytest.raises(ValueError, match="needs peft_type"):
        PeftConfig.from_peft_type(r=4)


# -- a method registered from outside the package --------------------------------------------------
def test_unregistered_method_is_refused(registry):
    with pytest.raises(ValueError, match="peft_type 'SHIFT' is not supported by peft_fast"):
        PeftConfig.from_dict({"peft_type": "SHIFT", "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="peft_type 'SHIFT' is not supported by peft_fast"):
        get_peft_model(make_model("llama"), ShiftConfig(target_modules=["q_proj"]))


def test_registered_method_is_found_by_get_peft_model_and_config_loading(shift_registered, tmp_path):
    base = make_model("llama")
    inputs = make_inputs("llama")
    expected = output_of(base, inputs)

    model = get_peft_model(base, ShiftConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert isinstance(model, PeftModelForCausalLM) and isinstance(model.base_model, ShiftModel)
    layers = [m for m in model.modules() if isinstance(m, ShiftLinear)]
    n_layers, hidden = base.config.num_hidden_layers, base.config.hidden_size
    assert len(layers) == n_layers
    # Only the shift vectors train: one (hidden,) vector per q_proj (q_proj maps hidden -> hidden here).
    assert model.get_nb_trainable_parameters()[0] == n_layers * hidden
    assert all("shift_v" in n for n, p in model.named_parameters() if p.requires_grad)
    # Zero shift: the base model's output, exactly.
    assert torch.equal(output_of(model, inputs), expected)

    # A layer computes x Wᵀ + b + v (hand-computed oracle), and the model's output moves.
    torch.manual_seed(3)
    for layer in layers:
        layer.shift_v["default"].data.normal_()
    x = torch.randn(2, 5, hidden)
    layer = layers[0]
    oracle = x @ layer.base_layer.weight.T + layer.shift_v["default"]
    if layer.base_layer.bias is not None:
        oracle = oracle + layer.base_layer.bias
    torch.testing.assert_close(layer(x), oracle)
    shifted = output_of(model, inputs)
    assert not torch.allclose(shifted, expected)

    # Saved and loaded: the config by its peft_type, the tuner class, the weights.
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SHIFT"
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is ShiftConfig and config.target_modules == ["q_proj"]
    assert type(PeftConfig.from_peft_type(peft_type="SHIFT", init_shift=0.5)) is ShiftConfig
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert isinstance(loaded, PeftModelForCausalLM) and isinstance(loaded.base_model, ShiftModel)
    assert torch.equal(output_of(loaded, inputs), shifted)


def test_model_cls_of_a_layer_method_must_be_a_tuner(registry):
    register_peft_method(name="shift", config_cls=ShiftConfig, model_cls=ShiftLinear, prefix="shift_")
    with pytest.raises(TypeError, match="ShiftLinear, which is not a BaseTuner subclass"):
        get_peft_model(make_model("llama"), ShiftConfig(target_modules=["q_proj"]))


@dataclass
class _OtherConfig(PeftConfig):
    PEFT_TYPE: ClassVar[str] = "OTHER"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "Shift", "config_cls": ShiftConfig, "model_cls": ShiftModel}, ValueError, "lower-case"),
        ({"name": "shift_", "config_cls": ShiftConfig, "model_cls": ShiftModel}, ValueError, "trailing"),
        ({"name": "shift", "config_cls": dict, "model_cls": ShiftModel}, TypeError, "PeftConfig subclass"),
        ({"name": "other", "config_cls": ShiftConfig, "model_cls": ShiftModel}, ValueError, "PEFT_TYPE must be"),
        ({"name": "shift", "config_cls": ShiftConfig, "model_cls": "ShiftModel"}, TypeError, "must be a class"),
        ({"name": "shift", "config_cls": ShiftConfig, "model_cls": ShiftModel, "prefix": "sh_"}, ValueError, "differs"),
        ({"name": "lora", "config_cls": LoraConfig, "model_cls": LoraModel}, KeyError, "already registered"),
        ({"name": "other", "config_cls": _OtherConfig, "model_cls": nn.Module, "prefix": "lora_"}, KeyError, "prefix"),
    ],
)
def test_register_peft_method_refuses_bad_registrations(registry, kwargs, error, match):
    before = dict(registry)
    with pytest.raises(error, match=match):
        register_peft_method(**kwargs)
    assert registry == before


def test_a_derived_method_may_share_its_parents_prefix(registry):
    """AdaLoRA's tuner subclasses LoRA's and shares "lora_" (as in HF peft); an unrelated class may not."""
    from peft_fast.tuners.adalora import AdaLoraModel

    assert registered_method("ADALORA").prefix == registered_method("LORA").prefix == "lora_"
    assert issubclass(AdaLoraModel, LoraModel)

    class OtherModel(LoraModel):
        pass

    register_peft_method(name="other", config_cls=_OtherConfig, model_cls=OtherModel, prefix="lora_")
    assert registered_method("OTHER").model_cls is OtherModel
