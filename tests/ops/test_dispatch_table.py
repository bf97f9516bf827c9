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
    assert dispatch.auto_order("lora_linear", SMALL) == ("triton_composite", "cuda", "torch")


def test_environment_variable_names_the_table(tmp_path, monkeypatch):
    path = _write(tmp_path / "t.json", {"lora_linear": {"tokens<=256": ["torch", "cuda"]}})
    monkeypatch.setenv(dispatch.BACKEND_TABLE_ENV, str(path))
    assert dispatch.backend_table()["entries"]["lora_linear"] == {"tokens<=256": ["torch", "cuda"]}
    # measured order first, then the op's default order (composites) without those
    assert dispatch.auto_order("lora_linear", SMALL) == ("torch", "cuda", "triton_composite")
    assert dispatch.auto_order("lora_linear", BIG) == dispatch.AUTO_DEFAULT["lora_linear"]
    assert dispatch.auto_order("ia3_linear", SMALL) == dispatch.AUTO_DEFAULT["ia3_linear"]


def test_load_backend_table_switches_the_table_in_force(tmp_path, monkeypatch):
    first = _write(tmp_path / "a.json", {"lora_linear": {"tokens>4096": ["cuda"]}})
    second = _write(tmp_path / "b.json", {"lora_linear": {"tokens>4096": ["torch", "triton"]}})
    monkeypatch.setenv(dispatch.BACKEND_TABLE_ENV, str(first))
    assert dispatch.auto_order("lora_linear", BIG) == ("cuda", "triton_composite", "torch")
    returned = dispatch.load_backend_table(second)
    assert returned is dispatch.backend_table()
    assert dispatch.auto_order("lora_linear", BIG) == ("torch", "triton", "triton_composite", "cuda")
    dispatch.load_backend_table()  # None: back to what the environment names
    assert dispatch.auto_order("lora_linear", BIG) == ("cuda", "triton_composite", "torch")


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


# ---- what "auto" picks on a GPU, checked without one ----------------------------------------------


def test_auto_defaults_are_composites_only():
    """Until measured, no op's "auto" order holds a fully fused matmul kernel: LoRA takes the
    cuBLAS composite, IA³ the CUDA C++ scale kernels around cuBLAS, mixed batches the SGMV/BGMV
    Triton passes around cuBLAS (a composite already); each ends on torch."""
    assert dispatch.AUTO_DEFAULT["lora_linear"] == ("triton_composite", "cuda", "torch")
    assert dispatch.AUTO_DEFAULT["ia3_linear"] == ("cuda", "torch")
    assert dispatch.AUTO_DEFAULT["lora_linear_mixed"] == ("triton", "cuda", "torch")
    # LoHa/LoKr's Triton kernels are adapter-only passes; the base product stays on torch
    assert dispatch.AUTO_DEFAULT["loha_linear"] == ("triton", "torch")
    assert dispatch.AUTO_DEFAULT["lokr_linear"] == ("triton", "torch")
    for op in ("lora_linear", "ia3_linear"):
        assert "triton" not in dispatch.AUTO_DEFAULT[op], op
    # the fused 4-bit matmul replaces the base product: bitsandbytes + cuBLAS until measured
    assert dispatch.AUTO_DEFAULT["lora_linear_4bit"] == ("torch",)


def test_a_measurement_puts_the_fused_4bit_matmul_first(tmp_path, monkeypatch):
    path = _write(tmp_path / "t.json", {"lora_linear_4bit": {"tokens>4096": ["triton"]}})
    assert dispatch.auto_order("lora_linear_4bit", BIG, table={}) == ("torch",)
    monkeypatch.setenv(dispatch.BACKEND_TABLE_ENV, str(path))
    assert dispatch.auto_order("lora_linear_4bit", BIG) == ("triton", "torch")
    assert dispatch.auto_order("lora_linear_4bit", SMALL) == ("torch",)


class _CudaTensor:
    """What dispatch reads of a CUDA tensor (device, dtype, shape, numel), without a GPU."""

    def __init__(self, *shape: int):
        self.shape, self.device, self.dtype = torch.Size(shape), torch.device("cuda"), torch.bfloat16

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()


@pytest.fixture
def every_backend_takes_anything(monkeypatch):
    """Each backend's lora_linear and ia3_linear is a tagged stub that takes any input, and every
    backend is available: what `select` returns is then its choice alone."""
    impls = {op: {b: dispatch.Impl(lambda *a, b=b, **k: b, lambda *a, **k: None) for b in dispatch.BACKENDS[1:]}
             for op in ("lora_linear", "ia3_linear")}  # fmt: skip
    monkeypatch.setattr(dispatch, "_IMPLS", impls)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda backend: None)
    monkeypatch.setattr(dispatch, "_global_backend", "auto")


def _picked(op: str, x) -> str:
    return dispatch.select(op, x)()


def test_auto_on_cuda_picks_the_composite_until_the_table_measures_the_fused_kernel(every_backend_takes_anything):
    small, big = _CudaTensor(2, 8, 64), _CudaTensor(8192, 64)
    assert _picked("lora_linear", small) == _picked("lora_linear", big) == "triton_composite"
    assert _picked("ia3_linear", big) == "cuda"
    # a measured table where the fused kernel won on large token counts only
    dispatch._table_cache = {"entries": {"lora_linear": {"tokens>4096": ["triton", "triton_composite"]}}}
    assert _picked("lora_linear", big) == "triton"
    assert _picked("lora_linear", small) == "triton_composite"
    assert _picked("ia3_linear", big) == "cuda"
    # explicit names still reach every backend
    for name in ("triton", "triton_composite", "cuda", "torch"):
        with dispatch.use_backend(name):
            assert _picked("lora_linear", big) == name
    # choosing the composite for an op without one falls back along the op's composites
    del dispatch._IMPLS["ia3_linear"]["triton_composite"]
    with dispatch.use_backend("triton_composite"):
        assert _picked("ia3_linear", big) == "cuda"
