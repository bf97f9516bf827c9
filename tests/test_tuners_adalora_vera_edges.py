"""Edges of tuners/adalora and tuners/vera found by mutation testing (bench/mutation.sh): each
test checks a value against HF peft 0.21.2 or a hand-computed case."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import make_inputs, make_model
from safetensors.torch import load_file, save_file

import peft_fast
from peft_fast import PeftModel

SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, lora_alpha=8)


def _ada(lib, **kw):
    return lib.AdaLoraConfig(**{**SCHEDULE, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", **kw})


def _vera(lib, **kw):
    return lib.VeraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", **kw})


def _random_like_hf(theirs, ours, key):
    """Random values for the parameters whose name holds `key` (HF starts them at zero), the same in both."""
    g = torch.Generator().manual_seed(5)
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if key in n:
                p.copy_(torch.randn(p.shape, generator=g))
                own[n].copy_(p)


# -- AdaLoRA --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [({"init_r": 0}, "init_r must be"), ({"target_r": 0}, "target_r must be")],
)
def test_adalora_config_names_the_bad_rank(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _ada(peft_fast, **kwargs)


def test_adalora_target_rank_one_is_accepted_as_in_hf_peft():
    assert _ada(peft_fast, target_r=1).target_r == _ada(peft, target_r=1).target_r == 1


def test_adalora_in_inference_mode_computes_the_plain_loss():
    # HF peft 0.21.2 fails here (AttributeError: no trainable_adapter_name), so the oracle is the
    # causal-LM cross entropy computed by hand from the logits: no orthogonal penalty without a trainable adapter
    torch.manual_seed(0)
    ours = peft_fast.get_peft_model(make_model("llama"), _ada(peft_fast, inference_mode=True))
    inputs = make_inputs("llama")
    out = ours(**inputs, labels=inputs["input_ids"])
    logits, labels = out.logits[:, :-1].float(), inputs["input_ids"][:, 1:]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_adalora_two_active_adapters_match_hf_peft():
    models = []
    for lib in (peft, peft_fast):
        torch.manual_seed(0)
        m = lib.get_peft_model(make_model("llama"), _ada(lib))
        m.add_adapter("other", _ada(lib, inference_mode=True, init_r=3))
        m.base_model.set_adapter(["default", "other"])
        models.append(m.eval())
    theirs, ours = models
    _random_like_hf(theirs, ours, "lora_E")
    inputs = make_inputs("llama")
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits)


def test_adalora_orthogonal_penalty_skips_layers_without_the_trainable_adapter():
    torch.manual_seed(0)
    ours = peft_fast.get_peft_model(make_model("llama"), _ada(peft_fast, target_modules=["v_proj"]))
    ours.add_adapter("frozen", _ada(peft_fast, target_modules=["q_proj"], inference_mode=True))
    tuner = ours.base_model
    assert tuner.trainable_adapter_name == "default"
    # hand-computed: the mean over the v_proj layers of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F (q_proj holds only "frozen")
    terms = []
    for layer in tuner.model.model.layers:
        A, B = layer.self_attn.v_proj.lora_A["default"], layer.self_attn.v_proj.lora_B["default"]
        terms += [
            torch.linalg.norm(A @ A.T - torch.eye(A.shape[0])),
            torch.linalg.norm(B.T @ B - torch.eye(B.shape[1])),
        ]
    torch.testing.assert_close(tuner.orthogonal_penalty(), torch.stack(terms).mean())


# -- VeRA -----------------------------------------------------------------------------------------


def test_vera_only_bias_trains_the_adapted_layers_biases_as_hf_peft():
    trainable = []
    for lib in (peft, peft_fast):
        torch.manual_seed(0)
        m = lib.get_peft_model(make_model("opt"), _vera(lib, bias="vera_only"))
        trainable.append(sorted(n for n, p in m.named_parameters() if p.requires_grad))
    theirs, ours = trainable
    assert any(n.endswith("q_proj.base_layer.bias") for n in theirs)
    assert ours == theirs


def test_vera_without_save_projection_warns_on_the_config():
    with pytest.warns(UserWarning, match="save_projection=False: vera_A and vera_B are not saved"):
        _vera(peft_fast, save_projection=False)


def test_vera_file_projections_are_ignored_without_save_projection(tmp_path):
    torch.manual_seed(0)
    ours = peft_fast.get_peft_model(make_model("llama"), _vera(peft_fast, projection_prng_key=3))
    ours.save_pretrained(tmp_path)
    # the file now says save_projection=False but still holds (zeroed) projections: they must not load
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["save_projection"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(weights)
    weights = {k: torch.zeros_like(v) if k.startswith("base_model.vera_") else v for k, v in weights.items()}
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="the adapter file holds vera_A/vera_B but save_projection=False"):
        mine = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    layer, want = mine.base_model.model.model.layers[0].self_attn.q_proj, ours.base_model.model.model.layers[0]
    for key in ("vera_A", "vera_B"):  # rebuilt from projection_prng_key, as saved
        torch.testing.assert_close(getattr(layer, key)["default"], getattr(want.self_attn.q_proj, key)["default"])


def test_vera_second_adapter_on_a_larger_layer_names_the_fix():
    ours = peft_fast.get_peft_model(make_model("llama"), _vera(peft_fast))
    with pytest.raises(ValueError, match="the first VeRA adapter must target the largest layers"):
        ours.add_adapter("other", _vera(peft_fast, target_modules=["up_proj"]))


def test_vera_lambdas_take_the_base_dtype_without_autocast_as_hf_peft():
    dtypes = []
    for lib in (peft, peft_fast):
        base = make_model("llama").to(torch.float16)
        m = lib.get_peft_model(base, _vera(lib), autocast_adapter_dtype=False)
        dtypes.append(
            {n.rsplit(".", 1)[0].rsplit(".", 1)[-1]: p.dtype for n, p in m.named_parameters() if "lambda" in n}
        )
    theirs, ours = dtypes
    assert theirs == {"vera_lambda_b": torch.float16, "vera_lambda_d": torch.float16}
    assert ours == theirs


def test_vera_lambdas_live_on_the_base_layers_device():
    # a base model on the meta device (as from_pretrained's empty weights): every VeRA tensor there too, as in HF peft
    for lib in (peft, peft_fast):
        with torch.device("meta"):
            base = make_model("llama")
        m = lib.get_peft_model(base, _vera(lib))
        devices = {n.rsplit(".", 2)[-2]: p.device.type for n, p in m.named_parameters() if "vera_lambda" in n}
        assert devices == {"vera_lambda_b": "meta", "vera_lambda_d": "meta"}, lib.__name__
