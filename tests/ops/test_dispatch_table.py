"""peft_fast/ops/dispatch.py's backend table: the shipped default, $PEFT_FAST_BACKEND_TABLE,
`load_backend_table(path)`, and the order "auto" takes from it."""

from __future__ import annotations

import json

import pytest
import torch

from peft_fast.ops import dispatch

SMALL, BIG = torch.empty(4, 3, 8, device="meta"), torch.empty(5000, 8, device="meta")


@pytest.fixture(autouse=True)
def fresh_table(monkeypatch):
    """Each test starts with no table loaded and no $PEFT_FAST_BACKEND_TABLE; both are restored after."""
    monkeypatch.setattr(dispatch, "_table_cache", None)
    monkeypatch.delenv(dispatch.BACKEND_TABLE_ENV, raising=False)


def _write(path, entries):
    path.write_text(json.dumps({"source": "test", "entries": entries}))
    return path


def test_shipped_default_is_read_when_nothing_else_is_named():
    table = dispatch.backend_table()
    assert table == json.loads(dispatch.BACKEND_TABLE.read_text())
    assert table["entries"] == {}
    assert dispatch.auto_order("lora_linear", SMALL) == dispatch.FALLBACK_ORDER


def test_environment_variable_names_the_table(tmp_path, monkeypatch):
    path = _write(tmp_path / "t.json", {"lora_linear": {"tokens<=256": ["torch", "cuda"]}})
    monkeypatch.setenv(dispatch.BACKEND_TABLE_ENV, str(path))
    assert dispatch.backend_table()["entries"]["lora_linear"] == {"tokens<=256": ["torch", "cuda"]}
    # measured order first, then the backends the table left out, in FALLBACK_ORDER
    assert dispatch.auto_order("lora_linear", SMALL) == ("torch", "cuda", "triton")
    assert dispatch.auto_order("lora_linear", BIG) == dispatch.FALLBACK_ORDER
    assert dispatch.auto_order("ia3_linear", SMALL) == dispatch.FALLBACK_ORDER


def test_load_backend_table_switches_the_table_in_force(tmp_path, monkeypatch):
    first = _write(tmp_path / "a.json", {"lora_linear": {"tokens>4096": ["cuda"]}})
    second = _write(tmp_path / "b.json", {"lora_linear": {"tokens>4096": ["torch", "triton"]}})
    monkeypatch.setenv(dispatch.BACKEND_TABLE_ENV, str(first))
    assert dispatch.auto_order("lora_linear", BIG) == ("cuda", "triton", "torch")
    returned = dispatch.load_backend_table(second)
    assert returned is dispatch.backend_table()
    assert dispatch.auto_order("lora_linear", BIG) == ("torch", "triton", "cuda")
    dispatch.load_backend_table()  # None: back to what the environment names
    assert dispatch.auto_order("lora_linear", BIG) == ("cuda", "triton", "torch")


def test_missing_table_is_an_error_naming_where_it_came_from(tmp_path, monkeypatch):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        dispatch.load_backend_table(missing)
    monkeypatch.setenv(dispatch.BACKEND_TABLE_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="PEFT_FAST_BACKEND_TABLE"):
        dispatch.backend_table()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "'entries' object"),
        ('{"entries": []}', "'entries' object"),
        ('{"entries": {"lora_linear": ["triton"]}}', "must map shape classes"),
        ('{"entries": {"lora_linear": {"any": ["tpu"]}}}', "must be a list of backends"),
        ('{"entries": {"lora_linear": {"any": "triton"}}}', "must be a list of backends"),
    ],
)
def test_malformed_table_is_refused_and_the_old_one_stays(tmp_path, content, message):
    good = _write(tmp_path / "good.json", {"lora_linear": {"any": ["torch"]}})
    dispatch.load_backend_table(good)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
        dispatch.load_backend_table(bad)
    assert dispatch.backend_table()["entries"] == {"lora_linear": {"any": ["torch"]}}
