"""Edges of tuners/lycoris.py, tuners/loha and tuners/lokr found by mutation testing
(bench/mutation.sh), checked against HF peft 0.21.2 or hand-computed values."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_model

import peft_fast


def _pair(method, **kw):
    kw = {"target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "r": 4, "alpha": 8, **kw}
    cls = {"loha": "LoHaConfig", "lokr": "LoKrConfig"}[method]
    models = []
    for lib in (peft, peft_fast):
        torch.manual_seed(5)
        models.append(lib.get_peft_model(make_model("llama"), getattr(lib, cls)(**kw)))
    return models


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_alpha_must_be_a_number(method):
    cls = {"loha": peft_fast.LoHaConfig, "lokr": peft_fast.LoKrConfig}[method]
    with pytest.raises(TypeError, match="alpha must be a number, got 'x'"):
        cls(target_modules=["q_proj"], alpha="x")


def test_loha_rank_dropout_is_not_rescaled_as_in_hf_peft():
    # LoHa has no rank_dropout_scale option (HF peft's LoHa never rescales); LoKr's default is False too
    theirs, ours = _pair("loha", rank_dropout=0.5)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.rank_dropout_scale == {"default": False}
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for (n, p), q in zip(theirs.named_parameters(), ours.parameters()):
            if "hada_w" in n:
                p.normal_(std=0.3)
                q.copy_(p)
    hf_layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    for m in (hf_layer, layer):
        m.train()
    torch.manual_seed(9)
    want = hf_layer(x)
    torch.manual_seed(9)
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_scale_layer_multiplies_the_active_scalings_as_hf_peft(method):
    theirs, ours = _pair(method)
    for m in (theirs, ours):
        for layer in m.base_model.model.model.layers:
            layer.self_attn.q_proj.scale_layer(3.0)
    for h, o in zip(theirs.base_model.model.model.layers, ours.base_model.model.model.layers):
        assert o.self_attn.q_proj.scaling == pytest.approx(h.self_attn.q_proj.scaling)
        assert o.self_attn.q_proj.scaling["default"] == pytest.approx(3.0 * 8 / 4)


def test_lokr_factor_warning_names_the_module():
    cfg = peft_fast.LoKrConfig(target_modules=["gate_proj"], decompose_factor=3, r=16, task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match=r"does not divide the input dimension \(32\) of 'model\.layers\.0\.mlp"):
        peft_fast.get_peft_model(make_model("llama"), cfg)
