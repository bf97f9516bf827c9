"""X-LoRA against HF peft 0.21.2 on a tiny Llama: config fields and defaults, classifier,
trainable counts, logits and gradients with the same weights, generate, the X-LoRA methods,
disable_adapter, files both ways, experts with any names, the cheap scaling pass, top-k
dropping unused experts from the work, and bad input.

HF peft 0.21.2 only runs with experts named "0", "1", ... (a KeyError otherwise): where ours
uses other names, the oracle is HF peft run on the same folders under those names."""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from conftest import make_inputs, make_model

import peft_fast
from peft_fast import ops
from peft_fast.ops import dispatch
from peft_fast.tuners.xlora.layer import XLoraLinearLayer

RANKS = (2, 3, 5)  # unpadded, different ranks
TARGETS = (["q_proj", "v_proj", "down_proj"],) * 3


def _base():
    model = make_model("llama")
    model.config.use_cache = False
    return model


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Three LoRA expert folders (random, non-zero) with different ranks and alphas."""
    root = tmp_path_factory.mktemp("experts")
    folders = []
    for i, (r, targets) in enumerate(zip(RANKS, TARGETS)):
        torch.manual_seed(100 + i)
        config = peft_fast.LoraConfig(
            r=r, lora_alpha=2 * r + i, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"
        )
        model = peft_fast.get_peft_model(_base(), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.3)
        model.save_pretrained(root / f"e{i}")
        folders.append(str(root / f"e{i}"))
    return folders


def _pair(folders, names=None, seed=7, **kwargs):
    """HF peft's X-LoRA (experts "0", "1", ...) and ours (experts `names`) on the same folders,
    ours carrying HF's classifier weights."""
    names = names or [str(i) for i in range(len(folders))]
    kwargs = {"task_type": "CAUSAL_LM", "hidden_size": 32, "xlora_size": 16, **kwargs}
    torch.manual_seed(seed)
    hf = peft.get_peft_model(_base(), peft.XLoraConfig(adapters={str(i): f for i, f in enumerate(folders)}, **kwargs))
    ours = peft_fast.get_peft_model(_base(), peft_fast.XLoraConfig(adapters=dict(zip(names, folders)), **kwargs))
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


CONFIGS = [
    {},
    {"xlora_depth": 3, "softmax_temperature": 0.5, "global_scaling_weight": 1.7, "layerwise_scalings": True},
    {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False},
    {"top_k_lora": 1, "scaling_pass_value": 0.4, "xlora_depth": 2, "xlora_dropout_p": 0.0},
]


def test_config_fields_and_defaults_are_hf_peft():
    ours = {f.name: f.default for f in dataclasses.fields(peft_fast.XLoraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.XLoraConfig)}
    xlora_fields = set(theirs) - {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert xlora_fields <= set(ours)
    assert {k: ours[k] for k in xlora_fields} == {k: theirs[k] for k in xlora_fields}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o, t = peft_fast.XLoraConfig(), peft.XLoraConfig()
    assert (
        (o.hidden_size, o.adapters, str(o.peft_type))
        == (t.hidden_size, t.adapters, t.peft_type.value)
        == (
            4096,
            {},
            "XLORA",
        )
    )
    kw = {"hidden_size": 8, "adapters": {"x": "/p"}, "top_k_lora": 2, "enable_softmax_topk": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o_dict, t_dict = peft_fast.XLoraConfig(**kw).to_dict(), peft.XLoraConfig(**kw).to_dict()
    for key in xlora_fields | {"peft_type"}:
        assert o_dict[key] == (t_dict[key].value if hasattr(t_dict[key], "value") else t_dict[key]), key
    with pytest.warns(UserWarning, match="both enabled"):
        peft_fast.XLoraConfig(hidden_size=8, adapters={}, enable_softmax_topk=True, top_k_lora=1)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_logits_scalings_and_trainable_count_match_hf(experts, kwargs):
    hf, ours = _pair(experts, **kwargs)
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    assert str(ours.base_model.internal_xlora_classifier.layers) == str(hf.base_model.internal_xlora_classifier.layers)
    inputs = make_inputs("llama")
    torch.testing.assert_close(_logits(ours, inputs), _logits(hf, inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.get_latest_scalings(), hf.get_latest_scalings(), rtol=1e-6, atol=1e-6)
    # The experts matter: the base model alone gives other logits.
    assert not torch.allclose(_logits(ours, inputs), _logits(_base(), inputs), atol=1e-3)


def test_classifier_init_is_hf_peft():
    """Same seed, same classifier weights (HF peft's architecture and initialisation order)."""
    kwargs = {"task_type": "CAUSAL_LM", "hidden_size": 32, "xlora_size": 16, "xlora_depth": 3}
    a = peft_fast.XLoraConfig(adapters={}, **kwargs)
    b = peft.XLoraConfig(adapters={}, **kwargs)
    from peft.tuners.xlora.classifier import XLoraClassifier as HFClassifier

    from peft_fast.tuners.xlora.classifier import XLoraClassifier

    base = _base()  # HF peft's classifier reads the model's dtype
    torch.manual_seed(3)
    ours = XLoraClassifier(a, 4, 6, None, torch.float32)
    torch.manual_seed(3)
    theirs = HFClassifier(base, b, 4, 6, torch.device("cpu"))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


@pytest.mark.parametrize("trainable", [False, True])
def test_gradients_match_hf(experts, trainable):
    hf, ours = _pair(experts, xlora_depth=2, xlora_dropout_p=0.0, use_trainable_adapters=trainable)
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    inputs = make_inputs("llama")
    grads = []
    for model in (hf, ours):
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert sorted(grads[0]) == sorted(grads[1])
    assert any("lora_A" in n for n in grads[1]) == trainable
    for n, g in grads[0].items():
        assert g is not None and grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_triton_backend_matches_hf(experts, monkeypatch):
    """The model on the Triton kernels (the interpreter on CPU): logits under top-k, and the
    gradients of the classifier and of trainable experts."""
    pytest.importorskip("triton")
    if dispatch.unavailable_reason("triton") is not None:
        pytest.skip(f"triton backend unavailable: {dispatch.unavailable_reason('triton')}")
    from peft_fast.ops.triton import xlora as triton_xlora

    launches = []
    real = triton_xlora.xlora_shrink
    monkeypatch.setattr(triton_xlora, "xlora_shrink", lambda *a, **k: launches.append(1) or real(*a, **k))
    hf, ours = _pair(experts, top_k_lora=2, use_trainable_adapters=True)
    inputs = make_inputs("llama", batch=1, seq=4)
    with peft_fast.use_backend("triton"):
        torch.testing.assert_close(_logits(ours, inputs), _logits(hf, inputs), rtol=1e-4, atol=1e-4)
        grads = []
        for model in (hf, ours):
            model.train()
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    n_layers = len(ours.base_model._xlora_layers)
    assert len(launches) == 3 * n_layers  # eval forward, train forward, backward: the kernels ran
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_experts_with_any_names(experts):
    names = ["math", "code", "chat"]
    inputs = make_inputs("llama")
    with pytest.raises(KeyError):  # HF peft 0.21.2's bug, the reason its comparison uses "0", "1", ...
        peft.get_peft_model(
            _base(), peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=dict(zip(names, experts)))
        )(**inputs)
    hf, ours = _pair(experts, names=names, top_k_lora=2)
    torch.testing.assert_close(_logits(ours, inputs), _logits(hf, inputs), rtol=1e-5, atol=1e-5)


def test_generate_matches_hf(experts):
    hf, ours = _pair(experts, xlora_depth=2)
    ids = make_inputs("llama", batch=2, seq=4)["input_ids"]
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(ours.generate(input_ids=ids, **kw), hf.generate(input_ids=ids, **kw))


def test_methods_match_hf(experts):
    hf, ours = _pair(experts, layerwise_scalings=True)
    inputs = make_inputs("llama")
    assert ours.get_latest_scalings() is None
    for model in (hf, ours):
        model.set_topk_lora(2)
        model.set_global_scaling_weight(0.6)
        model.set_scaling_pass_value(None)  # 1 / n_experts
        model.enable_scalings_logging()
    assert ours.peft_config["default"].top_k_lora == 2 and ours.get_global_scaling_weight() == 0.6
    assert ours.peft_config["default"].scaling_pass_value == pytest.approx(1 / 3)
    torch.testing.assert_close(_logits(ours, inputs), _logits(hf, inputs), rtol=1e-5, atol=1e-5)
    short = make_inputs("llama", seq=4)
    _logits(ours, short), _logits(hf, short)
    log, hf_log = ours.get_scalings_log(), hf.get_scalings_log()
    assert [t.shape for t in log] == [t.shape for t in hf_log] == [(3, 7, 6, 3), (3, 4, 6, 3)]
    for a, b in zip(log, hf_log):
        torch.testing.assert_close(a, b)
    assert {k: v[0] for k, v in ours.get_bucketed_scalings_log().items()} == {7: [0], 4: [1]}
    ours.disable_scalings_logging()
    _logits(ours, inputs)
    assert len(ours.get_scalings_log()) == 2
    ours.clear_scalings_log()
    assert ours.get_scalings_log() == []
    with pytest.raises(ValueError, match="larger than the number of experts"):
        ours.set_topk_lora(4)


def test_disable_adapter_gives_the_base_model(experts):
    _, ours = _pair(experts)
    inputs = make_inputs("llama")
    with ours.disable_adapter():
        torch.testing.assert_close(_logits(ours, inputs), _logits(_base(), inputs), rtol=0, atol=0)
    assert not torch.allclose(_logits(ours, inputs), _logits(_base(), inputs), atol=1e-3)


def test_files_both_ways(experts, tmp_path):
    names = ["math", "code", "chat"]
    hf, ours = _pair(experts, names=names, xlora_depth=2)
    inputs = make_inputs("llama")
    want = _logits(ours, inputs)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "XLORA" and list(saved["adapters"]) == names
    for name in names:  # each expert as a LoRA folder
        assert json.loads((tmp_path / "ours" / name / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # Ours -> ours, without adapters= (the sub-folders).
    loaded = peft_fast.PeftModel.from_pretrained(_base(), tmp_path / "ours")
    assert loaded.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    torch.testing.assert_close(_logits(loaded, inputs), want, rtol=0, atol=0)
    # Ours -> HF peft (its keyword adapters=). HF peft 0.21.2 loads only experts named "0", "1", ...
    # (KeyError otherwise), so this direction uses those names.
    _, numbered = _pair(experts, xlora_depth=2)
    numbered.save_pretrained(tmp_path / "numbered")
    folders = {str(i): str(tmp_path / "numbered" / str(i)) for i in range(len(names))}
    hf_loaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "numbered", adapters=folders)
    assert hf_loaded.get_nb_trainable_parameters() == loaded.get_nb_trainable_parameters()
    torch.testing.assert_close(_logits(hf_loaded, inputs), _logits(numbered, inputs), rtol=1e-5, atol=1e-5)
    # HF peft -> ours: HF peft 0.21.2 saves no classifier key holding ".0." (layers.0 here); those warn.
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(RuntimeWarning, match=r"internal_xlora_classifier\.layers\.0\.weight"):
        from_hf = peft_fast.PeftModel.from_pretrained(_base(), tmp_path / "hf", adapters=dict(zip(names, experts)))
    hf_sd, ours_sd = hf.state_dict(), from_hf.state_dict()
    last = "base_model.internal_xlora_classifier.layers.3.weight"
    assert torch.equal(ours_sd[last], hf_sd[last])


def test_scaling_pass_is_cheap(experts, monkeypatch):
    """The scaling pass builds no autograd graph, and skips the experts when its value is 0."""
    calls = []
    real = ops.xlora_linear

    def spy(x, weight, bias, A, B, ranks, token_scalings, *a, **k):
        calls.append((torch.is_grad_enabled(), list(ranks)))
        return real(x, weight, bias, A, B, ranks, token_scalings, *a, **k)

    monkeypatch.setattr(ops, "xlora_linear", spy)
    _, ours = _pair(experts)
    n_layers = len(ours.base_model._xlora_layers)
    inputs = make_inputs("llama")
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert [g for g, _ in calls] == [True] * n_layers  # the scaling pass ran no expert at all
    calls.clear()
    ours.set_scaling_pass_value(0.5)
    ours(**inputs)
    assert [g for g, _ in calls] == [False] * n_layers + [True] * n_layers


def test_top_k_drops_unpicked_experts_from_the_work(experts, monkeypatch):
    hf, ours = _pair(experts, top_k_lora=1)
    for model in (hf, ours):  # every token picks expert 1
        with torch.no_grad():
            model.base_model.internal_xlora_classifier.layers[-1].bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    calls = []
    real = ops.xlora_linear
    monkeypatch.setattr(ops, "xlora_linear", lambda *a, **k: calls.append(list(a[5])) or real(*a, **k))
    inputs = make_inputs("llama")
    torch.testing.assert_close(_logits(ours, inputs), _logits(hf, inputs), rtol=1e-5, atol=1e-5)
    assert calls and all(ranks == [RANKS[1]] for ranks in calls)


# -- bad input -------------------------------------------------------------------------------------
def _xlora(adapters, **kwargs):
    return peft_fast.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters, **kwargs)


def test_use_cache_true_is_hf_error(experts):
    model = make_model("llama")
    model.config.use_cache = True
    with pytest.raises(ValueError, match="`use_cache` must be False"):
        peft.get_peft_model(model, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters={"0": experts[0]}))
    with pytest.raises(ValueError, match="`use_cache` must be False"):
        peft_fast.get_peft_model(make_model("llama"), _xlora({"a": experts[0]}))


def test_bad_experts_name_the_expert(experts, tmp_path):
    with pytest.raises(ValueError, match=r"X-LoRA expert 'ghost' .*does not exist"):
        peft_fast.get_peft_model(_base(), _xlora({"a": experts[0], "ghost": str(tmp_path / "nope")}))
    other = peft_fast.get_peft_model(_base(), peft_fast.LoraConfig(r=2, target_modules=["k_proj"]))
    other.save_pretrained(tmp_path / "k")
    with pytest.raises(ValueError, match=r"X-LoRA expert 'k' .*adapts other modules than expert 'a'"):
        peft_fast.get_peft_model(_base(), _xlora({"a": experts[0], "k": str(tmp_path / "k")}))
    for name, base in (("k", "org/model"), ("m", "org/other-model")):
        expert = peft_fast.get_peft_model(_base(), peft_fast.LoraConfig(r=2, target_modules=TARGETS[0]))
        expert.save_pretrained(tmp_path / name)
        path = tmp_path / name / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": base}))
    with pytest.raises(ValueError, match=r"X-LoRA expert 'm' .*trained on base model 'org/other-model'"):
        peft_fast.get_peft_model(_base(), _xlora({"k": str(tmp_path / "k"), "m": str(tmp_path / "m")}))
    with pytest.raises(ValueError, match="larger than the number of experts"):
        peft_fast.get_peft_model(_base(), _xlora({"a": experts[0]}, top_k_lora=2))
    with pytest.raises(ValueError, match="at least one"):
        peft_fast.get_peft_model(_base(), _xlora({}))
    with pytest.raises(ValueError, match="top_k_lora must be None or an integer >= 1"):
        _xlora({}, top_k_lora=0)


def test_a_refused_expert_leaves_the_model_as_it_was(experts, tmp_path):
    other = peft_fast.get_peft_model(_base(), peft_fast.LoraConfig(r=2, target_modules=["k_proj"]))
    other.save_pretrained(tmp_path / "k")
    model = _base()
    inputs = make_inputs("llama")
    want = _logits(model, inputs)
    with pytest.raises(ValueError, match="adapts other modules"):
        peft_fast.get_peft_model(model, _xlora({"a": experts[0], "k": str(tmp_path / "k")}))
    assert not any(isinstance(m, peft_fast.tuners.base.AdapterLayer) for m in model.modules())
    torch.testing.assert_close(_logits(model, inputs), want, rtol=0, atol=0)


def test_unload_gives_back_the_plain_model(experts):
    _, ours = _pair(experts)
    inputs = make_inputs("llama")
    plain = ours.unload()
    assert not any(isinstance(m, peft_fast.tuners.base.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, inputs), _logits(_base(), inputs), rtol=0, atol=0)


def test_expert_names_that_are_no_folder_names_refuse_to_save(experts, tmp_path):
    model = peft_fast.get_peft_model(_base(), _xlora({"ok": experts[0], "../up": experts[1]}))
    with pytest.raises(ValueError, match="X-LoRA expert name"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_layers_are_swapped_in_hf_order(experts):
    hf, ours = _pair(experts)
    ours_layers = [x.target for x in ours.base_model._xlora_layers]
    assert all(isinstance(x, XLoraLinearLayer) for x in ours.base_model._xlora_layers)
    names = {id(m): n for n, m in ours.named_modules()}
    hf_names = [n for n, m in hf.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert [names[id(m)] for m in ours_layers] == hf_names
