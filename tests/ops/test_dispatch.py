"""peft_fast/ops/dispatch.py: backend names, availability, nesting, and falling back to torch.

Tests that need a backend to look (un)available fake its status check, and
register implementations only under op names of their own; everything is restored afterwards.
"""

from __future__ import annotations

import logging
import re
import threading
import types

import pytest
import torch

import peft_fast
from peft_fast.ops import dispatch, reference

FAKE_OP = "test_dispatch_fake_op"


@pytest.fixture(autouse=True)
def restore_dispatch_state(monkeypatch):
    """Whatever a test sets, the global backend, the debug-once memory and the fake op go back."""
    monkeypatch.setattr(dispatch, "_global_backend", dispatch._global_backend)
    monkeypatch.setattr(dispatch, "_warned", set(dispatch._warned))
    yield
    dispatch._IMPLS.pop(FAKE_OP, None)


def _pretend_available(monkeypatch, *backends):
    """The backend's status check passes and its modules count as loaded (nothing is imported)."""
    for b in backends:
        monkeypatch.setitem(dispatch._STATUS, b, lambda: None)
        monkeypatch.setitem(dispatch._loaded, b, None)


def _pretend_unavailable(monkeypatch, backend, reason):
    monkeypatch.setitem(dispatch._STATUS, backend, lambda: reason)


def _fake_op(**impls):
    """Register FAKE_OP: `impls` maps backend -> (result, reason-or-None)."""
    for backend, (result, reason) in impls.items():
        dispatch.register(FAKE_OP, backend, lambda *a, _r=result, **k: _r, (lambda *a, _w=reason, **k: _w))


# -- names -----------------------------------------------------------------------------------------
def test_available_backends():
    backends = peft_fast.available_backends()
    assert set(backends) == {"torch", "triton", "triton_composite", "cuda"}
    assert backends["torch"] is None
    for name, reason in backends.items():
        assert reason is None or (isinstance(reason, str) and reason), name


@pytest.mark.parametrize("name", ["tpu", "Torch", "", None, 1])
def test_backend_names_validated(name):
    before = peft_fast.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        peft_fast.set_backend(name)
    with pytest.raises(ValueError, match="backend must be one of"), peft_fast.use_backend(name):
        pass
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.unavailable_reason(name)
    assert peft_fast.get_backend() == before


def test_register_validates_backend():
    for bad in ("auto", "tpu"):
        with pytest.raises(ValueError, match="backend must be one of"):
            dispatch.register(FAKE_OP, bad, lambda *a: None)
    assert FAKE_OP not in dispatch._IMPLS


def test_set_and_get_backend():
    assert peft_fast.get_backend() in dispatch.BACKENDS
    peft_fast.set_backend("torch")
    assert peft_fast.get_backend() == "torch"
    peft_fast.set_backend("auto")
    assert peft_fast.get_backend() == "auto"


# -- availability ----------------------------------------------------------------------------------
def test_unavailable_backend_raises_with_reason(monkeypatch):
    _pretend_unavailable(monkeypatch, "cuda", "no CUDA device (faked by the test)")
    peft_fast.set_backend("torch")
    with pytest.raises(
        RuntimeError, match=re.escape("backend 'cuda' is not available: no CUDA device (faked by the test)")
    ):
        peft_fast.set_backend("cuda")
    with (
        pytest.raises(RuntimeError, match=re.escape("no CUDA device (faked by the test)")),
        peft_fast.use_backend("cuda"),
    ):
        pass
    assert peft_fast.get_backend() == "torch"


def test_really_unavailable_backends_name_their_reason():
    unavailable = {b: r for b, r in peft_fast.available_backends().items() if r is not None}
    if not unavailable:
        pytest.skip("every backend is available here")
    for backend, reason in unavailable.items():
        with pytest.raises(RuntimeError, match=re.escape(reason)):
            peft_fast.set_backend(backend)


def test_available_backend_can_be_set(monkeypatch):
    _pretend_available(monkeypatch, "triton")
    peft_fast.set_backend("triton")
    assert peft_fast.get_backend() == "triton"


# -- use_backend -----------------------------------------------------------------------------------
def test_use_backend_nests_and_restores():
    peft_fast.set_backend("auto")
    with peft_fast.use_backend("torch"):
        assert peft_fast.get_backend() == "torch"
        with peft_fast.use_backend("auto"):
            assert peft_fast.get_backend() == "auto"
            with peft_fast.use_backend("torch"):
                assert peft_fast.get_backend() == "torch"
            assert peft_fast.get_backend() == "auto"
        assert peft_fast.get_backend() == "torch"
    assert peft_fast.get_backend() == "auto"


def test_use_backend_restores_after_an_error():
    peft_fast.set_backend("auto")
    with pytest.raises(KeyError), peft_fast.use_backend("torch"):
        raise KeyError("boom")
    assert peft_fast.get_backend() == "auto"


def test_use_backend_is_per_thread():
    peft_fast.set_backend("auto")
    seen = []
    with peft_fast.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.append(peft_fast.get_backend()))
        t.start()
        t.join()
        assert peft_fast.get_backend() == "torch"
    assert seen == ["auto"]


# -- selection -------------------------------------------------------------------------------------
def _lora_args(device_tensor=None):
    x = torch.randn(2, 8) if device_tensor is None else device_tensor
    return (x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0, 0.0, False)


def test_auto_uses_torch_on_cpu_tensors():
    with peft_fast.use_backend("auto"):
        assert dispatch.select("lora_linear", *_lora_args()) is reference.lora_linear
        assert (
            dispatch.select("ia3_linear", torch.randn(2, 8), torch.randn(4, 8), None, torch.ones(4, 1), False)
            is reference.ia3_linear
        )
    with peft_fast.use_backend("torch"):
        assert dispatch.select("lora_linear", *_lora_args()) is reference.lora_linear


def test_auto_prefers_kernels_for_cuda_tensors_only(monkeypatch):
    _pretend_available(monkeypatch, "triton", "cuda")
    _fake_op(torch=("torch", None), triton=("triton", None))
    cpu = torch.zeros(1)
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # no GPU needed
    with peft_fast.use_backend("auto"):
        assert dispatch.select(FAKE_OP, cpu)() == "torch"  # kernels on CPU only when asked by name
        assert dispatch.select(FAKE_OP, cuda_like)() == "triton"  # no cuda impl: the next in line
    with peft_fast.use_backend("triton"):
        assert dispatch.select(FAKE_OP, cpu)() == "triton"


def test_refusing_backend_falls_back_to_torch(monkeypatch, caplog):
    _pretend_available(monkeypatch, "triton")
    _fake_op(torch=("torch", None), triton=("triton", "dtype float64 not supported (test)"))
    x = torch.zeros(1, dtype=torch.float64)
    with caplog.at_level(logging.DEBUG, logger="peft_fast.dispatch"), peft_fast.use_backend("triton"):
        assert dispatch.select(FAKE_OP, x)() == "torch"
        assert dispatch.select(FAKE_OP, x)() == "torch"
    said = [r.getMessage() for r in caplog.records if "dtype float64 not supported (test)" in r.getMessage()]
    assert len(said) == 1  # once, at debug level
    assert caplog.records[0].levelno == logging.DEBUG
    assert FAKE_OP in said[0] and "'triton'" in said[0]


def test_fallback_follows_the_order(monkeypatch):
    _pretend_available(monkeypatch, "triton", "cuda")
    _fake_op(torch=("torch", None), triton=("triton", None), cuda=("cuda", "shape not supported (test)"))
    with peft_fast.use_backend("cuda"):
        assert dispatch.select(FAKE_OP, torch.zeros(1))() == "triton"
    _fake_op(triton=("triton", "refuses too (test)"))
    with peft_fast.use_backend("cuda"):
        assert dispatch.select(FAKE_OP, torch.zeros(1))() == "torch"


def test_backend_without_an_impl_of_the_op_uses_torch(monkeypatch):
    _pretend_available(monkeypatch, "triton")
    _fake_op(torch=("torch", None))
    with peft_fast.use_backend("triton"):
        assert dispatch.select(FAKE_OP, torch.zeros(1))() == "torch"


def test_unavailable_backend_is_skipped(monkeypatch):
    """An impl registered for a backend that cannot run here is never picked."""
    _pretend_available(monkeypatch, "triton")
    _pretend_unavailable(monkeypatch, "cuda", "no CUDA device (faked by the test)")
    _fake_op(torch=("torch", None), cuda=("cuda", None))
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    with peft_fast.use_backend("auto"):
        assert dispatch.select(FAKE_OP, cuda_like)() == "torch"


def test_op_without_reference_raises():
    with pytest.raises(KeyError, match="no reference implementation"):
        dispatch.select("test_dispatch_no_such_op")
    _fake_op(triton=("triton", None))
    with pytest.raises(KeyError, match="no reference implementation"):
        dispatch.select(FAKE_OP)


def test_ops_run_through_dispatch():
    """The public ops call whatever dispatch selects (a spy registered as torch's impl)."""
    calls = []
    old = dispatch._IMPLS["lora_linear"]["torch"]

    def spy(*args):
        calls.append(len(args))
        return reference.lora_linear(*args)

    try:
        dispatch.register("lora_linear", "torch", spy)
        with peft_fast.use_backend("torch"):
            out = peft_fast.ops.lora_linear(*_lora_args())
    finally:
        dispatch._IMPLS["lora_linear"]["torch"] = old
    assert calls == [8] and out.shape == (2, 4)
    assert dispatch._IMPLS["lora_linear"]["torch"].fn is reference.lora_linear
