"""Edges of `save_and_load` that the round-trip tests do not reach: the error each unreadable
weights file gets (its message names the file and the fault), and that an `adapter_model.bin`
is read with torch's weights-only unpickler (no code from the file runs).

Oracles: hand-built files (torch.save / safetensors of known tensors, a pickle whose loading
would run a function of this module) and the messages the docstrings promise."""

from __future__ import annotations

import pickle

import pytest
import torch

from peft_fast import save_and_load as sl
from peft_fast.config import WEIGHTS_NAME, WEIGHTS_NAME_PT

_RAN: list[str] = []


def _payload() -> dict[str, torch.Tensor]:
    """What unpickling `_Smuggler` calls: records that code from the file ran."""
    _RAN.append("ran")
    return {"w": torch.ones(2)}


class _Smuggler:
    """Unpickles by calling `_payload`, a function the weights-only unpickler refuses."""

    def __reduce__(self):
        return (_payload, ())


def test_bin_file_is_read_weights_only_and_code_in_it_never_runs(tmp_path):
    with open(tmp_path / WEIGHTS_NAME_PT, "wb") as f:
        pickle.dump(_Smuggler(), f, protocol=2)
    _RAN.clear()
    with pytest.raises(ValueError, match=r"adapter_model\.bin' is not a readable torch file"):
        sl.load_peft_weights(tmp_path)
    assert _RAN == []


def test_bin_file_holding_a_list_is_refused(tmp_path):
    torch.save([torch.ones(2), torch.zeros(3)], tmp_path / WEIGHTS_NAME_PT)
    with pytest.raises(ValueError, match=r"adapter_model\.bin' does not hold a dict of tensors"):
        sl.load_peft_weights(tmp_path)


def test_bin_file_holding_a_non_tensor_value_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / WEIGHTS_NAME_PT)
    with pytest.raises(ValueError, match=r"does not hold a dict of tensors"):
        sl.load_peft_weights(tmp_path)


def test_bin_file_that_is_not_a_pickle_is_refused(tmp_path):
    (tmp_path / WEIGHTS_NAME_PT).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"adapter_model\.bin' is not a readable torch file: "):
        sl.load_peft_weights(tmp_path)


def test_bin_file_values_are_read_back(tmp_path):
    saved = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.5, -2.0])}
    torch.save(saved, tmp_path / WEIGHTS_NAME_PT)
    got = sl.load_peft_weights(tmp_path)
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) and got[k].device.type == "cpu" for k in saved)


def test_safetensors_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors' is not a readable safetensors file: "):
        sl.load_peft_weights(tmp_path)


def test_changed_safetensors_file_names_the_checksum_and_the_likely_cause(tmp_path):
    from safetensors.torch import save_file

    tensors = {"w": torch.arange(4.0)}
    digest = sl.tensors_digest(tensors)
    save_file({"w": torch.arange(4.0) + 1}, tmp_path / WEIGHTS_NAME, metadata={sl.CHECKSUM_KEY: digest})
    changed = r"does not match the checksum written when it was saved: its contents changed"
    with pytest.raises(ValueError, match=changed):
        sl.load_peft_weights(tmp_path)
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={sl.CHECKSUM_KEY: digest})
    assert torch.equal(sl.load_peft_weights(tmp_path)["w"], torch.arange(4.0))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist \(peft_fast loads adapters from local folders only\)"):
        sl.load_peft_weights(tmp_path / "nowhere")


def test_folder_without_weights_lists_what_it_has(tmp_path):
    (tmp_path / "notes.txt").write_text("no weights here")
    listed = r"no adapter_model\.safetensors or adapter_model\.bin in adapter folder .* \(it has \['notes\.txt'\]\)"
    with pytest.raises(ValueError, match=listed):
        sl.load_peft_weights(tmp_path)


# -- state dicts: which keys an adapter's file holds (oracle: HF peft's get_peft_model_state_dict) --
def _both(kind: str, config_kw: dict, add_other: bool = False):
    """(peft_fast model, HF peft model) built alike from the same base weights."""
    import peft
    from conftest import make_model

    from peft_fast import LoraConfig, get_peft_model

    ours = get_peft_model(make_model(kind), LoraConfig(**config_kw))
    hf = peft.get_peft_model(make_model(kind), peft.LoraConfig(**config_kw))
    if add_other:
        ours.add_adapter("other", LoraConfig(**config_kw))
        hf.add_adapter("other", peft.LoraConfig(**config_kw))
    return ours, hf


def test_bias_all_with_a_trained_head_saves_what_hf_peft_saves():
    """bias="all" stores every trained bias, but not the frozen original of a modules_to_save head.

    HF peft 0.21.2 also stores the head's bias twice more under raw model keys
    (`classifier.original_module.bias`, `classifier.modules_to_save.bias`, beside
    `classifier.bias`); peft_fast keeps only `classifier.bias`, which HF peft loads."""
    import peft

    kw = dict(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"])
    ours, hf = _both("bert", kw)
    keys = set(sl.get_peft_model_state_dict(ours))
    hf_keys = set(peft.get_peft_model_state_dict(hf))
    extra = {"base_model.model.classifier.original_module.bias", "base_model.model.classifier.modules_to_save.bias"}
    assert keys == hf_keys - extra and extra <= hf_keys
    assert "base_model.model.classifier.bias" in keys


def test_embedding_layers_of_another_adapter_stay_out_of_the_file():
    import peft

    kw = dict(r=2, target_modules=["embed_tokens", "q_proj"])
    ours, hf = _both("llama", kw, add_other=True)
    keys = set(sl.get_peft_model_state_dict(ours, adapter_name="default"))
    # the untargeted lm_head (tied or not) is not stored: HF peft stores only embedding layers that carry an adapter
    assert set(peft.get_peft_model_state_dict(hf, adapter_name="default")) == keys
    assert not any("lm_head" in k for k in keys)
    assert not any("other" in k for k in keys)


def test_unwrap_compiled_reads_the_model_inside_torch_compile():
    from conftest import make_model

    from peft_fast import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    expected = sl.get_peft_model_state_dict(model)
    got = sl.get_peft_model_state_dict(torch.compile(model), unwrap_compiled=True)
    assert got.keys() == expected.keys()
    assert all(got[k].data_ptr() == expected[k].data_ptr() and torch.equal(got[k], expected[k]) for k in got)


def test_load_peft_weights_moves_tensors_to_the_device_asked_for(tmp_path):
    torch.save({"a": torch.ones(2, 3)}, tmp_path / WEIGHTS_NAME_PT)
    got = sl.load_peft_weights(tmp_path, device="meta")
    assert got["a"].device.type == "meta" and got["a"].shape == (2, 3)


def test_adapter_names_may_hold_any_other_character():
    for name in ("X", "aXb", "adapter-1", "ünï"):
        sl.check_adapter_name(name)


def test_set_state_dict_errors_name_the_option_and_join_the_faults():
    from conftest import make_model

    from peft_fast import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    weights = sl.get_peft_model_state_dict(model)
    with pytest.raises(ValueError, match=r"^ignore_mismatched_sizes=True is not supported: adapter weights must fit"):
        sl.set_peft_model_state_dict(model, weights, ignore_mismatched_sizes=True)
    bad = dict(weights)
    dropped = sorted(bad)[0]
    del bad[dropped]
    bad["no.such.key"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"1 keys the model has no place for, e\.g\. \['no\.such\.key'\]; 1 weights of adapter 'default'",
    ):
        sl.set_peft_model_state_dict(model, bad)


def test_xlora_file_holds_the_classifier_under_its_path(tmp_path):
    """X-LoRA's classifier is stored under its module path (oracle: the classifier's own state dict)."""
    from conftest import make_model

    import peft_fast

    expert = peft_fast.get_peft_model(make_model("llama"), peft_fast.LoraConfig(r=2, target_modules=["q_proj"]))
    expert.save_pretrained(tmp_path / "e0")
    base = make_model("llama")
    base.config.use_cache = False
    config = peft_fast.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=32, xlora_size=8, adapters={"e0": str(tmp_path / "e0")}
    )
    model = peft_fast.get_peft_model(base, config)
    classifier = model.base_model.internal_xlora_classifier.state_dict()
    assert classifier
    for root, prefix in (
        (model, "base_model.internal_xlora_classifier."),
        (model.base_model, "internal_xlora_classifier."),
    ):
        saved = sl.get_peft_model_state_dict(root)
        for k, v in classifier.items():
            assert torch.equal(saved[prefix + k], v)
