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
