"""AdaLoRA against HF peft 0.21 (the oracle): config fields and checks, state-dict keys and files in
both directions, outputs, gradients and trainable counts on nn.Linear (Llama) and Conv1D (GPT-2),
the orthogonality penalty, update_and_allocate step by step with identical weights and gradients
(across tinit, deltaT masks, the final masking step and the final phase), merging, disabling,
deleting, the missing-call warning and the Trainer callback."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import hf_and_ours, make_inputs, make_model, training_loss
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import peft_fast
from peft_fast import AdaLoraConfig, PeftModel, get_peft_model
from peft_fast.integrations import AdaLoraCallback

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, lora_alpha=8)


def _config(module, kind: str, **kw):
    args = {**SCHEDULE, "target_modules": TARGETS[kind], "task_type": "CAUSAL_LM", **kw}
    return module.AdaLoraConfig(**args)


def _pair(kind: str, **kw):
    """HF peft's and peft_fast's AdaLoRA models from the same seed, with random E (HF starts E at
    zero, which would hide A's and B's role) copied into both."""
    return hf_and_ours(kind, lambda lib: _config(lib, kind, **kw), "lora_E")


_loss = training_loss


# -- config --------------------------------------------------------------------------------------
def test_config_fields_and_defaults_are_hf_peft():
    ours, theirs = AdaLoraConfig(total_step=10).to_dict(), peft.AdaLoraConfig(total_step=10).to_dict()
    assert set(ours) == set(theirs)
    for key in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "rank_pattern"):
        assert ours[key] == theirs[key], key
    assert ours["peft_type"] == "ADALORA"
    assert type(peft_fast.PeftConfig.from_dict(json.loads(json.dumps(theirs)))) is AdaLoraConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "total_step"),
        ({"total_step": 0}, "total_step"),
        ({"total_step": 10, "tinit": 8, "tfinal": 2}, "tinit"),
        ({"total_step": 10, "use_dora": True}, "DoRA"),
        ({"total_step": 10, "orth_reg_weight": -1.0}, "orth_reg_weight"),
        ({"total_step": 10, "target_modules": "q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"total_step": 10, "layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_config_refusals_hf_peft_shares(kwargs, match):
    """HF peft refuses these with ValueError too (checked, so the comparison cannot drift)."""
    with pytest.raises(ValueError):
        peft.AdaLoraConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"deltaT": 0}, "deltaT"),
        ({"target_r": 13}, "target_r"),
        ({"beta1": 1.0}, "beta1"),
        ({"tinit": -1}, "tinit"),
        ({"use_rslora": True}, "use_rslora"),
        ({"loftq_config": {"loftq_bits": 4}}, "LoftQ"),  # HF peft drops it with a warning
        ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ],
)
def test_config_refuses_what_would_fail_or_be_ignored_later(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(total_step=10, **kwargs)


def test_r_warns_as_hf_peft():
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig(total_step=10, r=4)


def test_unsupported_layers_and_second_trainable_adapter_are_refused():
    with pytest.raises(TypeError, match="Embedding"):
        get_peft_model(make_model("llama"), AdaLoraConfig(total_step=10, target_modules=["embed_tokens"]))
    model = get_peft_model(make_model("llama"), AdaLoraConfig(total_step=10))
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        model.add_adapter("other", AdaLoraConfig(total_step=10))
    model.add_adapter("frozen", AdaLoraConfig(total_step=10, inference_mode=True))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen" in n)


# -- parity: modules, outputs, gradients ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_state_dict_outputs_gradients_and_counts_match_hf(kind):
    theirs, ours = _pair(kind, lora_dropout=0.0)
    hs, fs = theirs.state_dict(), ours.state_dict()
    assert list(hs) == list(fs)
    for k in hs:
        torch.testing.assert_close(fs[k], hs[k], rtol=0, atol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.train(), ours.train()
    loss_h, loss_f = _loss(theirs, kind), _loss(ours, kind)
    torch.testing.assert_close(loss_f, loss_h, rtol=1e-5, atol=1e-6)
    loss_h.backward(), loss_f.backward()
    grads = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert "lora_" in n and grads[n].grad is not None
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6)
        else:
            assert not grads[n].requires_grad


def test_dropout_training_matches_hf_with_the_same_seed():
    theirs, ours = _pair("llama", lora_dropout=0.3)
    theirs.train(), ours.train()
    loss_h, loss_f = _loss(theirs, "llama", seed=11), _loss(ours, "llama", seed=11)
    torch.testing.assert_close(loss_f, loss_h, rtol=1e-5, atol=1e-6)


def test_orthogonal_penalty_is_added_once_as_hf_peft():
    """The loss is the plain model's loss plus orth_reg_weight times the hand-computed penalty."""
    _, ours = _pair("llama", orth_reg_weight=0.7)
    inputs = make_inputs("llama")
    plain = ours.get_base_model()
    logits = ours(**inputs).logits  # no labels: no loss, no penalty
    base_loss = plain.loss_function(logits=logits, labels=inputs["input_ids"], vocab_size=plain.config.vocab_size)
    terms = []
    for n, p in ours.named_parameters():
        if "lora_A.default" in n:
            terms.append(torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0])))
        if "lora_B.default" in n:
            terms.append(torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1])))
    want = base_loss + 0.7 * torch.stack(terms).mean()
    torch.testing.assert_close(ours(**inputs, labels=inputs["input_ids"]).loss, want)
    torch.testing.assert_close(ours.base_model(**inputs, labels=inputs["input_ids"]).loss, want)


# -- rank allocation ------------------------------------------------------------------------------
def test_update_and_allocate_matches_hf_step_by_step():
    """Same weights and gradients each step (HF's copied into ours): same importance EMAs, same
    masks, same rank pattern and budget after every step, across every phase of the schedule."""
    theirs, ours = _pair("llama")
    config = theirs.peft_config["default"]
    opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    own = dict(ours.named_parameters())
    seen_mask_steps = []
    for step in range(config.total_step + 2):
        theirs.train()
        inputs = make_inputs("llama", seed=100 + step)
        theirs(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                own[n].copy_(p)
                own[n].grad = None if p.grad is None else p.grad.clone()
        before = theirs.peft_config["default"].rank_pattern
        theirs.base_model.update_and_allocate(step)
        ours.base_model.update_and_allocate(step)
        if theirs.peft_config["default"].rank_pattern is not before:
            seen_mask_steps.append(step)
        assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
        for n, p in theirs.named_parameters():
            assert torch.equal(own[n], p), (step, n)
        h_alloc, f_alloc = theirs.base_model.rankallocator, ours.base_model.rankallocator
        assert f_alloc.budget_schedule(step) == h_alloc.budget_schedule(step)
        assert set(f_alloc.exp_avg_ipt) == set(h_alloc.exp_avg_ipt)
        for n in h_alloc.exp_avg_ipt:
            assert torch.equal(f_alloc.exp_avg_ipt[n], h_alloc.exp_avg_ipt[n])
            assert torch.equal(f_alloc.exp_avg_unc[n], h_alloc.exp_avg_unc[n])
        opt.zero_grad()
    # Masks came at the deltaT steps of the budgeting phase and at total_step - tfinal = 9.
    assert seen_mask_steps == [4, 6, 8, 9]
    pattern = ours.peft_config["default"].rank_pattern
    kept = sum(sum(v) for v in pattern.values())
    assert kept == SCHEDULE["target_r"] * len(pattern)  # the final budget, exactly
    for name, mask in pattern.items():  # pruned triplets have E == 0
        e = own["base_model.model." + name]
        assert torch.all(e[~torch.tensor(mask)] == 0)


def test_missing_update_and_allocate_warns_with_the_fix():
    _, ours = _pair("llama")
    ours.train()
    with pytest.warns(RuntimeWarning, match="update_and_allocate.*AdaLoraCallback"):
        for _ in range(SCHEDULE["tinit"] + 2):
            _loss(ours, "llama").backward()
    # Calling it every step: no warning.
    _, ours = _pair("llama")
    ours.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for step in range(SCHEDULE["tinit"] + 4):
            _loss(ours, "llama").backward()
            ours.base_model.update_and_allocate(step)
            ours.zero_grad()


def test_update_and_allocate_without_gradients_names_the_fix():
    _, ours = _pair("llama")
    with pytest.raises(ValueError, match="after loss.backward"):
        ours.base_model.update_and_allocate(0)


def test_trainer_callback_allocates_ranks(tmp_path):
    _, ours = _pair("llama", total_step=6, tinit=1, tfinal=1, deltaT=1)
    ids = torch.randint(2, 97, (12, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # neither the missing-call nor the total_step warning
        Trainer(model=ours, args=args, train_dataset=data, callbacks=[AdaLoraCallback()]).train()
    pattern = ours.peft_config["default"].rank_pattern
    assert pattern is not None and sum(sum(v) for v in pattern.values()) == SCHEDULE["target_r"] * len(pattern)
    with pytest.raises(TypeError, match="AdaLoRA adapter"):
        AdaLoraCallback().on_optimizer_step(args, None, None, model=make_model("llama"))


# -- files ----------------------------------------------------------------------------------------
def _allocated_pair():
    """A pair trained through the final masking step with identical gradients (see above)."""
    theirs, ours = _pair("llama")
    own = dict(ours.named_parameters())
    for step in range(SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1):
        theirs.train()
        inputs = make_inputs("llama", seed=100 + step)
        theirs(**inputs, labels=inputs["input_ids"]).loss.backward()
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                own[n].grad = None if p.grad is None else p.grad.clone()
        theirs.base_model.update_and_allocate(step)
        ours.base_model.update_and_allocate(step)
        theirs.zero_grad()
    return theirs, ours


def test_files_match_hf_and_load_both_ways(tmp_path):
    theirs, ours = _allocated_pair()
    theirs.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    h_w, f_w = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("hf", "ours"))
    assert list(sorted(h_w)) == list(sorted(f_w))
    assert any(t.shape[0] < SCHEDULE["init_r"] for k, t in f_w.items() if k.endswith("lora_E"))  # pruned rows gone
    for k in h_w:
        assert torch.equal(f_w[k], h_w[k]), k
    h_c, f_c = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("hf", "ours"))
    assert f_c["rank_pattern"] == h_c["rank_pattern"] and ".default" not in next(iter(f_c["rank_pattern"]))

    inputs = make_inputs("llama", seed=7)
    theirs.eval()
    want = theirs(**inputs).logits
    # HF's folder into peft_fast, ours into HF peft: same outputs, resized to the pattern.
    mine = PeftModel.from_pretrained(make_model("llama"), tmp_path / "hf")
    torch.testing.assert_close(mine(**inputs).logits, want, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in mine.parameters())
    hf = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours")
    torch.testing.assert_close(hf(**inputs).logits, want, rtol=1e-5, atol=1e-6)
    for (n, p), (m, q) in zip(mine.named_parameters(), hf.named_parameters()):
        assert n == m and p.shape == q.shape
    for _name, layer in mine.base_model.model.named_modules():
        if hasattr(layer, "ranknum"):
            assert layer._ranknum_value["default"] == float(SCHEDULE["init_r"]) == float(layer.ranknum["default"])


# -- merging, disabling, deleting -------------------------------------------------------------------
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
        torch.testing.assert_close(ours(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)
        for (_n, p), (_m, q) in zip(theirs.named_parameters(), ours.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)
        merged = ours.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)
        assert merged(**inputs, labels=inputs["input_ids"]).loss is not None  # no hook left behind

    theirs, ours = _pair(kind)
    ours.add_adapter("second", _config(peft_fast, kind, inference_mode=True))
    theirs.add_adapter("second", _config(peft, kind, inference_mode=True))
    ours.delete_adapter("default")
    theirs.delete_adapter("default")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.active_adapters == theirs.active_adapters == ["second"]
    # The trainable adapter is gone: the loss has no penalty term, and allocation says why it cannot run.
    ours.train()
    assert torch.isfinite(_loss(ours, kind))
    with pytest.raises(ValueError, match="trainable AdaLoRA adapter"):
        ours.base_model.update_and_allocate(0)


@pytest.mark.parametrize("init_lora_weights", [True, False])
def test_initialisation_is_hf_peft_s_seed_for_seed(init_lora_weights):
    """init_lora_weights=False keeps the standard-normal draws; True: E = 0, A and B normal(0, 0.02)."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make_model("gpt2"), _config(peft, "gpt2", init_lora_weights=init_lora_weights))
    torch.manual_seed(0)
    ours = get_peft_model(make_model("gpt2"), _config(peft_fast, "gpt2", init_lora_weights=init_lora_weights))
    hs, fs = theirs.state_dict(), ours.state_dict()
    assert list(hs) == list(fs) and all(torch.equal(fs[k], hs[k]) for k in hs)
    lora_e = next(p for n, p in ours.named_parameters() if "lora_E" in n)
    assert bool(torch.all(lora_e == 0)) == init_lora_weights
