"""VeRA against HF peft 0.21 (the oracle): config fields and checks, the shared projections (one
tensor per model in memory, once per adapter file, rebuilt from the PRNG key without
save_projection), state-dict keys and files in both directions, outputs, gradients and
trainable counts on nn.Linear (Llama) and Conv1D (GPT-2), merging, disabling, deleting."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import hf_and_ours, make_inputs, make_model, training_loss
from safetensors.torch import load_file

import peft_fast
from peft_fast import PeftModel, VeraConfig, get_peft_model
from peft_fast.tuners.vera import VeraLinear

TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _config(module, kind: str, **kw):
    return module.VeraConfig(**{"r": 4, "target_modules": TARGETS[kind], "task_type": "CAUSAL_LM", **kw})


def _pair(kind: str, **kw):
    """HF peft's and peft_fast's VeRA models from the same seed, with random λ_b and λ_d (HF
    starts λ_b at zero) copied into both."""
    return hf_and_ours(kind, lambda lib: _config(lib, kind, **kw), "vera_lambda")


_loss = training_loss


def test_config_fields_and_defaults_are_hf_peft():
    ours, theirs = VeraConfig().to_dict(), json.loads(json.dumps(peft.VeraConfig().to_dict()))
    assert set(ours) == set(theirs)
    for key in ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "bias", "init_weights"):
        assert ours[key] == theirs[key], key
    assert type(peft_fast.PeftConfig.from_dict(theirs)) is VeraConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"r": 0}, "r must be"),
        ({"vera_dropout": 1.5}, "vera_dropout"),
        ({"bias": "lora_only"}, "bias"),
    ],
)
def test_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VeraConfig(**kwargs)


def test_config_refusals_hf_shares():
    with pytest.raises(ValueError):
        peft.VeraConfig(layers_pattern="layers")
    with pytest.warns(UserWarning, match="save_projection"):
        VeraConfig(save_projection=False)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_state_dict_outputs_gradients_and_counts_match_hf(kind):
    theirs, ours = _pair(kind)
    hs, fs = theirs.state_dict(), ours.state_dict()
    assert list(hs) == list(fs)
    for k in hs:
        assert torch.equal(fs[k], hs[k]), k
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.train(), ours.train()
    loss_h, loss_f = _loss(theirs, kind), _loss(ours, kind)
    torch.testing.assert_close(loss_f, loss_h, rtol=1e-5, atol=1e-6)
    loss_h.backward(), loss_f.backward()
    grads = dict(theirs.named_parameters())
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trained and all("vera_lambda" in n for n in trained)
    for n in trained:
        torch.testing.assert_close(dict(ours.named_parameters())[n].grad, grads[n].grad, rtol=1e-4, atol=1e-6)


def test_dropout_matches_hf_with_the_same_seed():
    theirs, ours = _pair("llama", vera_dropout=0.3)
    theirs.train(), ours.train()
    torch.testing.assert_close(_loss(ours, "llama", seed=9), _loss(theirs, "llama", seed=9), rtol=1e-5, atol=1e-6)


def test_projections_exist_once_per_model():
    _, ours = _pair("llama")
    layers = [m for m in ours.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 2 * len(TARGETS["llama"])
    shared_A, shared_B = ours.base_model.vera_A, ours.base_model.vera_B
    assert all(layer.vera_A is shared_A and layer.vera_B is shared_B for layer in layers)
    # Sized for the largest targeted layer (Llama's up_proj 32 -> 44, down_proj 44 -> 32).
    assert tuple(shared_A["default"].shape) == (4, 44) and tuple(shared_B["default"].shape) == (44, 4)
    buffers = {b.data_ptr() for b in ours.buffers() if b.shape == (4, 44)}
    assert len(buffers) == 1
    # HF peft's Kaiming-uniform draw from projection_prng_key, hand-computed.
    g = torch.Generator().manual_seed(0)
    bound = (3.0 * 2.0 / 44) ** 0.5
    torch.testing.assert_close(shared_A["default"], torch.empty(4, 44).uniform_(-bound, bound, generator=g))


def test_files_match_hf_and_load_both_ways(tmp_path):
    theirs, ours = _pair("llama")
    theirs.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    h_w, f_w = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("hf", "ours"))
    assert sorted(h_w) == sorted(f_w)
    assert [k for k in f_w if "vera_A" in k] == ["base_model.vera_A"]  # once per file, not per layer
    for k in h_w:
        assert torch.equal(f_w[k], h_w[k]), k
    inputs = make_inputs("llama", seed=4)
    want = theirs.eval()(**inputs).logits
    mine = PeftModel.from_pretrained(make_model("llama"), tmp_path / "hf")
    torch.testing.assert_close(mine(**inputs).logits, want, rtol=1e-5, atol=1e-6)
    hf = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours")
    torch.testing.assert_close(hf(**inputs).logits, want, rtol=1e-5, atol=1e-6)


def test_without_save_projection_the_key_rebuilds_them(tmp_path):
    with pytest.warns(UserWarning):
        theirs, ours = _pair("llama", save_projection=False, projection_prng_key=3)
    ours.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert weights and not any("vera_A" in k or "vera_B" in k for k in weights)
    inputs = make_inputs("llama", seed=4)
    want = theirs.eval()(**inputs).logits
    with pytest.warns(UserWarning, match="projection_prng_key"):
        mine = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    torch.testing.assert_close(mine(**inputs).logits, want, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning):
        hf = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path)
    torch.testing.assert_close(hf(**inputs).logits, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_disable_delete_as_hf(kind):
    theirs, ours = _pair(kind)
    inputs = make_inputs(kind, seed=3)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        adapted = theirs(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, adapted, rtol=1e-5, atol=1e-6)
        base = make_model(kind)(**inputs).logits
        assert not torch.allclose(adapted, base, atol=1e-4)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(**inputs).logits, base, rtol=1e-5, atol=1e-6)
        ours.merge_adapter()
        theirs.merge_adapter()
        for (_n, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)
        merged = ours.merge_and_unload()
        assert not any("vera" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)

    theirs, ours = _pair(kind)
    ours.add_adapter("second", _config(peft_fast, kind))
    theirs.add_adapter("second", _config(peft, kind))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.delete_adapter("default")
    theirs.delete_adapter("default")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.active_adapters == theirs.active_adapters == ["second"]


def test_second_adapter_must_share_the_projections():
    model = get_peft_model(make_model("llama"), VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="projection_prng_key"):
        model.add_adapter("other", VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=1))
    with pytest.raises(ValueError, match="rank"):
        model.add_adapter("other", VeraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="too small"):
        model.add_adapter("other", VeraConfig(r=4, target_modules=["up_proj"]))
    assert list(model.peft_config) == ["default"]


def test_unsupported_layers_are_refused_as_hf():
    only_embedding = {"r": 4, "target_modules": ["embed_tokens"]}
    with pytest.raises(ValueError):
        peft.get_peft_model(make_model("llama"), peft.VeraConfig(**only_embedding))
    with pytest.raises(ValueError, match="no layer VeRA can adapt"):
        get_peft_model(make_model("llama"), VeraConfig(**only_embedding))
    mixed = {"r": 4, "target_modules": ["embed_tokens", "q_proj"]}
    with pytest.raises(TypeError):
        peft.get_peft_model(make_model("llama"), peft.VeraConfig(**mixed))
    with pytest.raises(TypeError, match="Embedding"):
        get_peft_model(make_model("llama"), VeraConfig(**mixed))


@pytest.mark.parametrize("init_weights", [True, False])
def test_initialisation_is_hf_peft_s_seed_for_seed(init_weights):
    """init_weights=False draws λ_d from the global generator (HF's order); True gives λ_b = 0, λ_d = d_initial."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make_model("llama"), _config(peft, "llama", init_weights=init_weights, d_initial=0.3))
    torch.manual_seed(0)
    ours = get_peft_model(make_model("llama"), _config(peft_fast, "llama", init_weights=init_weights, d_initial=0.3))
    hs, fs = theirs.state_dict(), ours.state_dict()
    assert list(hs) == list(fs) and all(torch.equal(fs[k], hs[k]) for k in hs)
    lambda_d = next(p for n, p in ours.named_parameters() if "vera_lambda_d" in n)
    assert torch.all(lambda_d == 0.3) == init_weights
