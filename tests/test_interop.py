"""Adapter files move both ways between HF peft and peft_fast, with the same outputs,
adapter shapes and trainable-parameter counts."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import TASKS, make_inputs, make_model, output_of
from safetensors.torch import load_file

import peft_fast

KINDS = ["llama", "gpt2", "opt", "bert", "t5"]


def _configs(lib, kind):
    task = TASKS[kind]
    return {
        "lora": lib.LoraConfig(task_type=task, r=4, lora_alpha=8, init_lora_weights=False),
        "lora_all_linear_rslora": lib.LoraConfig(
            task_type=task, r=3, lora_alpha=5, use_rslora=True, target_modules="all-linear", init_lora_weights=False
        ),
        "ia3": lib.IA3Config(task_type=task, init_ia3_weights=False),
    }


def _wrap(lib, kind, name, seed=0):
    torch.manual_seed(123)  # adapter init
    return lib.get_peft_model(make_model(kind, seed), _configs(lib, kind)[name]).eval()


def _adapter_shapes(model):
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if "lora_" in k or "ia3_" in k or "modules_to_save" in k
    }


@pytest.mark.parametrize("name", ["lora", "lora_all_linear_rslora", "ia3"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_structure_and_counts(kind, name):
    ours, theirs = _wrap(peft_fast, kind, name), _wrap(peft, kind, name)
    assert _adapter_shapes(ours) == _adapter_shapes(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs)


@pytest.mark.parametrize("name", ["lora", "lora_all_linear_rslora", "ia3"])
@pytest.mark.parametrize("kind", KINDS)
def test_hf_peft_files_load_into_peft_fast(kind, name, tmp_path):
    theirs = _wrap(peft, kind, name)
    inputs = make_inputs(kind)
    expected = output_of(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    ours = peft_fast.PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert not ours.training
    torch.testing.assert_close(output_of(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    # non-trivial: the adapter changes the output
    assert not torch.allclose(output_of(make_model(kind), inputs), expected, atol=1e-4)


@pytest.mark.parametrize("name", ["lora", "lora_all_linear_rslora", "ia3"])
@pytest.mark.parametrize("kind", KINDS)
def test_peft_fast_files_load_into_hf_peft(kind, name, tmp_path):
    ours = _wrap(peft_fast, kind, name)
    inputs = make_inputs(kind)
    expected = output_of(ours, inputs)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_model(kind), tmp_path)
    torch.testing.assert_close(output_of(theirs, inputs), expected, rtol=1e-5, atol=1e-5)
    # the same file layout HF peft writes
    ours_keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    hf_dir = tmp_path / "hf"
    _wrap(peft, kind, name).save_pretrained(hf_dir)
    assert ours_keys == set(load_file(hf_dir / "adapter_model.safetensors"))
    ours_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    hf_cfg = json.loads((hf_dir / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(hf_cfg)
    for key in (
        "r",
        "lora_alpha",
        "target_modules",
        "feedforward_modules",
        "modules_to_save",
        "fan_in_fan_out",
        "task_type",
        "peft_type",
        "use_rslora",
        "inference_mode",
    ):
        if key in hf_cfg:
            normalize = lambda v: sorted(v) if isinstance(v, list) else v  # noqa: E731
            assert normalize(ours_cfg[key]) == normalize(hf_cfg[key]), key


def test_named_adapters_and_embedding_lora_both_ways(tmp_path):
    """A second adapter in a sub-folder, LoRA on an embedding, rank/alpha patterns."""
    inputs = make_inputs("llama")
    cfg = dict(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    )
    torch.manual_seed(5)
    theirs = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**cfg))
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    theirs.set_adapter("other")
    expected_other = output_of(theirs, inputs)
    theirs.set_adapter("default")
    expected = output_of(theirs, inputs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = peft_fast.PeftModel.from_pretrained(make_model("llama"), tmp_path / "hf")
    ours.load_adapter(tmp_path / "hf" / "other", adapter_name="other")
    torch.testing.assert_close(output_of(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    ours.set_adapter("other")
    torch.testing.assert_close(output_of(ours, inputs), expected_other, rtol=1e-5, atol=1e-5)
    ours.set_adapter("default")
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "other" / "adapter_model.safetensors").is_file()
    back = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours")
    back.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    torch.testing.assert_close(output_of(back, inputs), expected, rtol=1e-5, atol=1e-5)
    back.set_adapter("other")
    torch.testing.assert_close(output_of(back, inputs), expected_other, rtol=1e-5, atol=1e-5)


def test_mixed_batch_matches_hf_peft():
    inputs = make_inputs("llama", batch=4)
    names = ["first", "__base__", "second", "first"]
    outs = []
    for lib in (peft, peft_fast):
        torch.manual_seed(9)
        m = lib.get_peft_model(make_model("llama"), lib.LoraConfig(r=4, init_lora_weights=False), adapter_name="first")
        m.add_adapter("second", lib.LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False))
        m.eval()
        outs.append(output_of(m, inputs, adapter_names=names))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
