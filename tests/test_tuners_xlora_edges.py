"""Edges of tuners/xlora found by mutation testing (bench/mutation.sh): messages that name the
expert and the fix, and experts' dtypes, against HF peft 0.21.2 or hand-written expectations."""

from __future__ import annotations

import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_xlora import _base, _pair, _xlora, experts  # noqa: F401 (experts is a fixture)

import peft_fast
from peft_fast.tuners.xlora.model import XLoraModel


def _copy(folder, tmp_path, name):
    dest = tmp_path / name
    shutil.copytree(folder, dest)
    return dest


def test_an_expert_folder_without_weights_names_the_expert(experts, tmp_path):  # noqa: F811
    bad = _copy(experts[1], tmp_path, "bad")
    for f in bad.iterdir():
        if f.name.startswith("adapter_model"):
            f.unlink()
    with pytest.raises(ValueError, match=r"^X-LoRA expert 'b' \('.*bad'\): "):
        peft_fast.get_peft_model(_base(), _xlora({"a": experts[0], "b": str(bad)}))


def test_an_expert_whose_weights_do_not_fit_names_the_expert_and_why(experts, tmp_path):  # noqa: F811
    bad = _copy(experts[1], tmp_path, "bad")
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError) as err:
        peft_fast.get_peft_model(_base(), _xlora({"a": experts[0], "b": str(bad)}))
    msg = str(err.value)
    assert msg.startswith("X-LoRA expert 'b' (")
    assert "shape" in msg and not msg.endswith(": None")


def test_fp16_experts_are_loaded_in_fp32_as_in_hf_peft(experts, tmp_path):  # noqa: F811
    half = _copy(experts[1], tmp_path, "half")
    weights = load_file(half / "adapter_model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, half / "adapter_model.safetensors")
    folders = [experts[0], str(half)]
    hf, ours = _pair(folders)
    hf_dtypes = {n: p.dtype for n, p in hf.named_parameters() if "lora_A" in n or "lora_B" in n}
    assert set(hf_dtypes.values()) == {torch.float32}
    ours_dtypes = {n: p.dtype for n, p in ours.named_parameters() if "lora_A" in n or "lora_B" in n}
    assert ours_dtypes == hf_dtypes


def test_set_adapter_names_the_one_adapter(experts):  # noqa: F811
    _, ours = _pair(experts[:2])
    with pytest.raises(ValueError, match="an X-LoRA model has the one adapter 'default'; got 'other'"):
        ours.base_model.set_adapter("other")


def test_bad_expert_names_refuse_to_save_naming_the_argument(experts, tmp_path):  # noqa: F811
    model = peft_fast.get_peft_model(_base(), _xlora({"ok": experts[0], "../up": experts[1]}))
    with pytest.raises(ValueError, match=r"^X-LoRA expert name \(it names the expert's sub-folder\)"):
        model.save_pretrained(tmp_path / "out")


def test_load_refuses_adapters_that_are_not_a_dict():
    config = _xlora({"a": "x"})
    with pytest.raises(TypeError, match=r"adapters must be a dict \{expert name: LoRA folder\}, got list"):
        XLoraModel.config_for_load(config, "folder", ["x"])


def test_load_names_a_missing_expert_sub_folder(experts, tmp_path):  # noqa: F811
    model = peft_fast.get_peft_model(_base(), _xlora({"a": experts[0], "b": experts[1]}))
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "saved" / "b")
    with pytest.raises(ValueError, match=r": no such sub-folder in the saved X-LoRA folder; pass adapters="):
        peft_fast.PeftModel.from_pretrained(_base(), tmp_path / "saved")


def test_config_without_adapters_warns_as_hf_peft():
    for lib in (peft, peft_fast):
        with pytest.warns(UserWarning, match=r"^No value was provided for `adapters`\. This will be set to empty"):
            lib.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32)


def test_config_names_a_bad_xlora_size():
    with pytest.raises(ValueError, match="xlora_size must be a positive integer, got 0"):
        _xlora({}, xlora_size=0)


def test_fp16_model_keeps_fp16_activations_as_hf_peft(experts):  # noqa: F811
    kwargs = {"task_type": "CAUSAL_LM", "hidden_size": 32, "xlora_size": 16}
    dtypes, expert_dtypes = [], []
    for lib, names in ((peft, ["0", "1"]), (peft_fast, ["a", "b"])):
        torch.manual_seed(7)
        m = lib.get_peft_model(_base().half(), lib.XLoraConfig(adapters=dict(zip(names, experts[:2])), **kwargs))
        with torch.no_grad():
            dtypes.append(m(input_ids=torch.tensor([[3, 4, 5]])).logits.dtype)
        expert_dtypes.append({p.dtype for n, p in m.named_parameters() if "lora_A" in n or "lora_B" in n})
    assert dtypes == [torch.float16, torch.float16]
    assert expert_dtypes[0] == {torch.float32}  # HF peft's autocast_adapter_dtype: the experts in fp32
    assert expert_dtypes[1] == expert_dtypes[0]
