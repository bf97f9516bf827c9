"""Public LoraLayer / LoraModel / PeftModel methods against HF peft 0.21.2's, call by call.

Twin models: the same base model and the same adapter weights (HF peft's state dict loaded
into peft_fast's model, whose keys are the same), then the same sequence of method calls on
both; after each call the outputs, active adapters, per-layer scalings, merge state and
trainable parameters must agree. HF peft is the oracle.
"""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_inputs, make_model, output_of
from test_dora_models import _warned

import peft_fast
from peft_fast.tuners.base import AdapterLayer

TARGETS = ["q_proj", "v_proj", "embed_tokens"]  # Linear and Embedding LoRA


def _cfg(lib, **kw):
    base = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False}
    return lib.LoraConfig(**{**base, **kw})


def _twins(first=None, second=None):
    """(HF peft model, peft_fast model) with adapters "default" and "other" and equal weights."""
    first, second = first or {}, second or {"r": 2, "lora_alpha": 3}
    torch.manual_seed(11)
    theirs = peft.get_peft_model(make_model("llama"), _cfg(peft, **first))
    theirs.add_adapter("other", _cfg(peft, **second))
    ours = peft_fast.get_peft_model(make_model("llama"), _cfg(peft_fast, **first))
    ours.add_adapter("other", _cfg(peft_fast, **second))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def _lora_layers(model):
    """{name: layer} of the LoRA layers (HF's BaseTunerLayer or ours)."""
    from peft.tuners.lora import LoraLayer as HFLoraLayer

    from peft_fast.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, (HFLoraLayer, LoraLayer))}


def _state(model):
    layers = _lora_layers(model)
    return {
        "active": list(model.active_adapters),
        "scaling": {n: dict(m.scaling) for n, m in layers.items()},
        "merged": {n: list(m.merged_adapters) for n, m in layers.items()},
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    }


def _assert_same(theirs, ours, inputs, tol=1e-5):
    assert _state(ours) == _state(theirs)
    torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), rtol=tol, atol=tol)


def _both(theirs, ours, call):
    """Call `call(model)` on both; they must return equal values or raise the same exception type."""
    results = []
    for model in (theirs, ours):
        try:
            results.append(("ok", call(model)))
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            results.append(("raised", type(e)))
    assert results[1][0] == results[0][0], results
    if results[0][0] == "raised":
        assert issubclass(results[1][1], results[0][1]) or issubclass(results[0][1], results[1][1]), results
    return results[1][1]


# ---- scaling: set_scale, scale_layer, unscale_layer ---------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_set_scale_scale_layer_unscale_layer(rslora):
    theirs, ours = _twins({"use_rslora": rslora}, {"r": 2, "lora_alpha": 3, "use_rslora": rslora})
    inputs = make_inputs("llama")
    _assert_same(theirs, ours, inputs)
    steps = [
        lambda layer: layer.set_scale("default", 1.0),  # rsLoRA: alpha / sqrt(r) stays
        lambda layer: layer.set_scale("default", 0.5),
        lambda layer: layer.set_scale("other", 3.0),  # an inactive adapter
        lambda layer: layer.set_scale("nope", 2.0),  # unknown: ignored
        lambda layer: layer.scale_layer(0.25),
        lambda layer: layer.scale_layer(1),
        lambda layer: layer.unscale_layer(0.5),
        lambda layer: layer.unscale_layer(None),
    ]
    for step in steps:
        for model in (theirs, ours):
            for layer in _lora_layers(model).values():
                step(layer)
        _assert_same(theirs, ours, inputs)
    ours.base_model.set_adapter(["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    for model in (theirs, ours):
        for layer in _lora_layers(model).values():
            layer.scale_layer(3.0)
    _assert_same(theirs, ours, inputs)


def test_rslora_set_scale_keeps_alpha_over_sqrt_r():
    """Hand-computed: r=4, alpha=8 with rsLoRA is 8 / sqrt(4) = 4.0, and set_scale(1.0) keeps it."""
    _, ours = _twins({"use_rslora": True})
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 4.0
    layer.set_scale("default", 1.0)
    assert layer.scaling["default"] == 4.0
    layer.set_scale("nope", 1.0)  # ignored, as in HF peft
    assert "nope" not in layer.scaling


# ---- several active adapters ------------------------------------------------------------------------


def test_several_active_adapters_forward_and_train_like_hf():
    theirs, ours = _twins()
    inputs = make_inputs("llama")
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "other"])
    _assert_same(theirs, ours, inputs)
    # gradients of both adapters
    for model in (theirs, ours):
        model.zero_grad()
        model(**inputs).logits.float().pow(2).mean().backward()
    grads = {}
    for model in (theirs, ours):
        grads[id(model)] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    g_t, g_o = grads[id(theirs)], grads[id(ours)]
    assert sorted(g_o) == sorted(g_t) and any(".other." in n for n in g_o)
    for n in g_t:
        torch.testing.assert_close(g_o[n], g_t[n], rtol=1e-4, atol=1e-6)


# ---- switching, disabling, deleting, adding ------------------------------------------------------


def test_set_adapter_disable_and_enable_like_hf():
    theirs, ours = _twins()
    inputs = make_inputs("llama")
    _both(theirs, ours, lambda m: m.set_adapter("other"))
    _assert_same(theirs, ours, inputs)
    assert _both(theirs, ours, lambda m: m.active_adapter) == "other"
    assert _both(theirs, ours, lambda m: m.active_peft_config.r) == 2
    _both(theirs, ours, lambda m: m.set_adapter("nope"))  # both raise
    with theirs.disable_adapter(), ours.disable_adapter():
        torch.testing.assert_close(output_of(ours, inputs), output_of(theirs, inputs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(output_of(ours, inputs), output_of(make_model("llama"), inputs))
    _assert_same(theirs, ours, inputs)
    for model in (theirs, ours):
        model.base_model.disable_adapter_layers()
    _assert_same(theirs, ours, inputs)
    for model in (theirs, ours):
        model.base_model.enable_adapter_layers()
    _assert_same(theirs, ours, inputs)


@pytest.mark.parametrize("deleted", ["default", "other"])
def test_delete_adapter_like_hf(deleted):
    """Deleting the active adapter, and an inactive one."""
    theirs, ours = _twins()
    inputs = make_inputs("llama")
    _both(theirs, ours, lambda m: m.set_adapter("other"))
    _both(theirs, ours, lambda m: m.delete_adapter(deleted))
    assert list(ours.peft_config) == list(theirs.peft_config)
    assert ours.active_adapter == theirs.active_adapter
    _assert_same(theirs, ours, inputs)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    _both(theirs, ours, lambda m: m.delete_adapter("nope"))  # both raise


def test_add_and_load_adapter_like_hf(tmp_path):
    theirs, ours = _twins()
    inputs = make_inputs("llama")
    theirs.save_pretrained(tmp_path, selected_adapters=["other"])
    for model in (theirs, ours):
        model.load_adapter(tmp_path / "other", adapter_name="third")
    _assert_same(theirs, ours, inputs)  # loading does not activate
    _both(theirs, ours, lambda m: m.set_adapter("third"))
    _assert_same(theirs, ours, inputs)
    assert _both(theirs, ours, lambda m: m.get_nb_trainable_parameters()) == theirs.get_nb_trainable_parameters()


def test_trainable_parameter_report_like_hf(capsys):
    theirs, ours = _twins()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    want = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == want
    assert type(ours.get_base_model()) is type(theirs.get_base_model())


# ---- merging and unloading --------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_names", [None, ["other"], ["default", "other"]])
def test_merge_unmerge_and_delta_weights_like_hf(adapter_names):
    theirs, ours = _twins()
    inputs = make_inputs("llama")
    t_layers, o_layers = _lora_layers(theirs), _lora_layers(ours)
    for name, layer in o_layers.items():
        for adapter in ("default", "other"):
            torch.testing.assert_close(
                layer.delta_weight(adapter), t_layers[name].get_delta_weight(adapter), rtol=1e-6, atol=1e-7
            )
        assert layer.get_base_layer() is layer.base_layer
    for model in (theirs, ours):
        model.merge_adapter(adapter_names=adapter_names)
    assert all(m.merged for m in _lora_layers(ours).values())
    _assert_same(theirs, ours, inputs, tol=1e-4)
    for model in (theirs, ours):
        model.unmerge_adapter()
    _assert_same(theirs, ours, inputs, tol=1e-4)


@pytest.mark.parametrize("how", ["merge_and_unload", "merge_and_unload_other", "unload"])
def test_merge_and_unload_and_unload_like_hf(how):
    theirs, ours = _twins()
    inputs = make_inputs("llama")
    calls = {
        "merge_and_unload": lambda m: m.merge_and_unload(),
        "merge_and_unload_other": lambda m: m.merge_and_unload(adapter_names=["other"]),
        "unload": lambda m: m.unload(),
    }
    plain_t, plain_o = calls[how](theirs), calls[how](ours)
    assert type(plain_o) is type(plain_t)
    assert sorted(plain_o.state_dict()) == sorted(plain_t.state_dict())
    torch.testing.assert_close(output_of(plain_o, inputs), output_of(plain_t, inputs), rtol=1e-4, atol=1e-4)


def test_safe_merge_refuses_non_finite_weights_like_hf():
    theirs, ours = _twins()
    for model in (theirs, ours):
        layer = _lora_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
        with torch.no_grad():
            layer.lora_B["default"].weight[0, 0] = float("inf")
    _both(theirs, ours, lambda m: m.merge_adapter(safe_merge=True))  # both raise ValueError
    # the refused layer keeps finite base weights; the others are merged or not as in HF peft
    q_proj = _lora_layers(ours)["base_model.model.model.layers.0.self_attn.q_proj"]
    assert not q_proj.merged and torch.isfinite(q_proj.base_layer.weight).all()
    assert _state(ours)["merged"] == _state(theirs)["merged"]


# ---- HF peft's "Already unmerged. Nothing to do." on every layer type that gives it ---------------
UNMERGE_WARNING_CONFIGS = {
    "lora": ("LoraConfig", {"target_modules": TARGETS, "r": 4}),
    "dora": ("LoraConfig", {"target_modules": TARGETS, "r": 4, "use_dora": True}),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "vera": ("VeraConfig", {"target_modules": ["q_proj", "o_proj"], "r": 4}),
    "loha": ("LoHaConfig", {"target_modules": ["q_proj", "v_proj"], "r": 4}),
    "lokr": ("LoKrConfig", {"target_modules": ["q_proj", "v_proj"], "r": 4}),
    "adalora": ("AdaLoraConfig", {"target_modules": ["q_proj", "v_proj"], "r": 4, "total_step": 10}),
}


@pytest.mark.parametrize("method", list(UNMERGE_WARNING_CONFIGS))
def test_unmerge_when_nothing_is_merged_warns_like_hf(method):
    config_name, kw = UNMERGE_WARNING_CONFIGS[method]
    models = [
        lib.get_peft_model(make_model("llama"), getattr(lib, config_name)(task_type="CAUSAL_LM", **kw))
        for lib in (peft, peft_fast)
    ]
    theirs, ours = (m.eval() for m in models)
    n_layers = len([m for m in ours.modules() if isinstance(m, AdapterLayer)])
    assert n_layers > 0
    warned = _warned(ours.unmerge_adapter)
    assert warned == ["Already unmerged. Nothing to do."] * n_layers  # one per layer, as HF peft
    assert warned == _warned(theirs.unmerge_adapter)
    for model in (theirs, ours):
        model.merge_adapter()
    assert _warned(ours.unmerge_adapter) == _warned(theirs.unmerge_adapter)  # merged: no such warning
    layer = next(m for m in ours.modules() if isinstance(m, AdapterLayer))
    weight = layer.get_base_layer().weight.clone()
    assert _warned(layer.unmerge) == ["Already unmerged. Nothing to do."]
    assert torch.equal(layer.get_base_layer().weight, weight)
