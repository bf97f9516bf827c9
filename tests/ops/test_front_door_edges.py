"""Edges of the op front doors (`peft_fast.ops.*`) and of dispatch that the backend tests do not
reach: the exact error messages the checks promise, the documented defaults (`training=True`),
the hints a front door hands its backend, and dispatch's shape classes and module registry.

Oracles: the reference ops in float64 under the same torch seed, hand-computed shape classes
and the messages the docstrings promise."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import require_triton

import peft_fast
from peft_fast import ops
from peft_fast.ops import dispatch, dora_reference, reference
from peft_fast.ops.mixed_batch import LoraStackCache


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- error messages ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "feedforward,shape,expected",
    [(True, (3, 1), r"\(1, 8\) for a feed-forward layer, got \(3, 1\)"), (False, (1, 8), r"\(3, 1\) for a non-feed")],
)
def test_ia3_shape_error_names_the_layer_kind_and_the_shape_given(feedforward, shape, expected):
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"ia3_l must have shape " + expected):
        ops.ia3_linear(x, w, None, torch.ones(shape), feedforward)


def test_dora_magnitude_and_weight_errors_name_what_was_given():
    w, A, B = torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 2)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"magnitude must be a \(3,\) tensor .*, got \(5,\)$"):
        ops.dora_linear(x, w, None, A, B, torch.ones(5), 1.0)
    with pytest.raises(ValueError, match=r"magnitude must be a \(3,\) tensor .*, got list$"):
        ops.dora_linear(x, w, None, A, B, [1.0, 1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match=r"weight must be \(out_features, in_features\), got torch.Size\(\[8\]\)"):
        ops.dora_weight_norm(torch.randn(8), A, B, 1.0)


# -- documented defaults ---------------------------------------------------------------------------
def test_lora_linear_mixed_applies_dropout_by_default():
    """`training` defaults to True: the same draws as the float64 reference in training mode."""
    x, w, b = _randn(6, 8, seed=1), _randn(5, 8, seed=2), _randn(5, seed=3)
    As, Bs = [_randn(2, 8, seed=4), _randn(3, 8, seed=5)], [_randn(5, 2, seed=6), _randn(5, 3, seed=7)]
    rows = torch.tensor([0, 1, -1, 1, 0, 0])
    args = (x, w, b, As, Bs, [0.5, 2.0], [0.5, 0.25], rows)
    with peft_fast.use_backend("torch"):
        torch.manual_seed(0)
        got = ops.lora_linear_mixed(*args)
    torch.manual_seed(0)
    expected = reference.lora_linear_mixed(*args, training=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, reference.lora_linear_mixed(*args, training=False))


def test_dora_linear_applies_dropout_by_default():
    x, w, b = _randn(6, 8, seed=1), _randn(5, 8, seed=2), _randn(5, seed=3)
    A, B, m = _randn(2, 8, seed=4), _randn(5, 2, seed=6), _randn(5, seed=8).abs() + 0.5
    with peft_fast.use_backend("torch"):
        torch.manual_seed(0)
        got = ops.dora_linear(x, w, b, A, B, m, 0.7, 0.5)
    norm = dora_reference.dora_weight_norm(w, A, B, 0.7)
    torch.manual_seed(0)
    expected = dora_reference.dora_linear(x, w, b, A, B, m, 0.7, 0.5, True, norm=norm)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, dora_reference.dora_linear(x, w, b, A, B, m, 0.7, 0.5, False, norm=norm))


# -- hints handed to the backend -------------------------------------------------------------------
def test_lora_linear_mixed_hands_its_stack_cache_to_the_kernel_backend():
    require_triton()
    x, w = torch.randn(4, 16), torch.randn(16, 16)
    As, Bs = [torch.randn(16, 16), torch.randn(16, 16)], [torch.randn(16, 16), torch.randn(16, 16)]
    rows = torch.tensor([1, 0, 0, 1])
    cache = LoraStackCache()
    with peft_fast.use_backend("triton"), torch.no_grad():
        got = ops.lora_linear_mixed(x, w, None, As, Bs, [1.0, 0.5], [0.0, 0.0], rows, False, stack=cache)
    assert cache._stack is not None  # the backend filled the caller's cache
    expected = reference.lora_linear_mixed(
        x.double(), w.double(), None, [a.double() for a in As], [b.double() for b in Bs], [1.0, 0.5], [0.0, 0.0], rows
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


# -- dispatch ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,expected",
    [
        ((5,), "tokens<=256"),  # a 1-D input is one token
        ((256, 4), "tokens<=256"),
        ((257, 4), "tokens<=4096"),
        ((2, 2048, 4), "tokens<=4096"),
        ((4097, 1), "tokens>4096"),
        ((), "any"),
    ],
)
def test_shape_class_buckets_tokens_at_the_bounds(shape, expected):
    assert dispatch.shape_class(torch.empty(shape, device="meta")) == expected


def test_auto_order_without_entries_is_the_default_order():
    x = torch.empty(3, 4, device="meta")
    assert dispatch.auto_order("lora_linear", x, table={}) == dispatch.AUTO_DEFAULT["lora_linear"]
    assert dispatch.auto_order("some_op", x, table={"entries": {}}) == dispatch.FALLBACK_ORDER


def test_first_tensor_is_the_first_argument_with_device_and_dtype():
    t = torch.zeros(1)
    assert dispatch._first_tensor((1, None, "x", t, torch.ones(2))) is t
    assert dispatch._first_tensor((1, "x")) is None


def test_register_backend_module_adds_each_module_once_in_order(monkeypatch):
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "cuda", ("a.b",))
    monkeypatch.delitem(dispatch._BACKEND_MODULES, "new_backend", raising=False)
    dispatch.register_backend_module("cuda", "c.d")
    dispatch.register_backend_module("cuda", "a.b")
    dispatch.register_backend_module("cuda", "c.d")
    assert dispatch._BACKEND_MODULES["cuda"] == ("a.b", "c.d")
    dispatch.register_backend_module("new_backend", "e.f")
    assert dispatch._BACKEND_MODULES["new_backend"] == ("e.f",)
    monkeypatch.delitem(dispatch._BACKEND_MODULES, "new_backend")


# -- more messages: the argument named, what was given -----------------------------------------------
def test_check_errors_name_the_argument_and_what_was_given():
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"ia3_l must have shape \(1, 8\) for a feed-forward layer, got \(\)$"):
        ops.ia3_linear(x, w, None, [1.0] * 8, True)
    As, Bs, rows = [torch.randn(2, 8)], [torch.randn(5, 2)], torch.tensor([0, 0, -1, 0, 0, 0])
    with pytest.raises(ValueError, match=r"lora_Bs\[0\] must be \(5, 2\), got torch.Size\(\[5, 3\]\)"):
        ops.lora_linear_mixed(x, w, None, As, [torch.randn(5, 3)], [1.0], [0.0], rows)
    with pytest.raises(ValueError, match=r"^scalings must have one entry per adapter \(1\), got 2$"):
        ops.lora_linear_mixed(x, w, None, As, Bs, [1.0, 2.0], [0.0], rows)
    plan = ops.mixed_batch.group_rows([0, 0, 0], "cpu")
    with pytest.raises(ValueError, match=r"^plan groups 3 rows but x has 6$"):
        ops.lora_linear_mixed(x, w, None, As, Bs, [1.0], [0.0], rows, plan=plan)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        ops.dora_linear(x, w, torch.zeros(4), torch.randn(2, 8), Bs[0], torch.ones(5), 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \(5, 2\), got \(5, 3\)"):
        ops.dora_weight_norm(w, torch.randn(2, 8), torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match=r"weight must be \(num_embeddings, embedding_dim\), got torch.Size\(\[8\]\)"):
        ops.dora_embedding(
            torch.tensor([0, 1]), torch.randn(8), torch.randn(2, 8), torch.randn(4, 2), torch.ones(4), 1.0
        )
    A, B, ts = torch.randn(3, 8), torch.randn(5, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"token_scalings must be .* = \(6, 2\), got \(6, 3\)$"):
        ops.xlora_linear(x, w, None, A, B, [1, 2], ts, [0.0, 0.0])
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        ops.xlora_linear(x, w, torch.zeros(4), A, B, [1, 2], ts[:, :2], [0.0, 0.0])


def test_dora_linear_checks_the_norm_against_the_output_features():
    x, w, A, B, m = torch.randn(4, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2), torch.ones(5)
    with pytest.raises(ValueError, match=r"^norm must be \(5,\), got \(8,\)$"):
        ops.dora_linear(x, w, None, A, B, m, 1.0, norm=torch.ones(8))
    norm = ops.dora_weight_norm(w, A, B, 1.0)
    with peft_fast.use_backend("torch"):
        torch.testing.assert_close(
            ops.dora_linear(x, w, None, A, B, m, 1.0, norm=norm), ops.dora_linear(x, w, None, A, B, m, 1.0)
        )


def test_dora_norm_cache_returns_the_float64_norm_and_clears():
    w, A, B = _randn(5, 8, seed=1), _randn(2, 8, seed=2), _randn(5, 2, seed=3)
    expected = torch.linalg.vector_norm(w + 0.5 * B @ A, dim=1)
    cache = ops.DoraNormCache()
    torch.testing.assert_close(cache.get("a", w, A, B, 0.5).double(), expected, rtol=1e-6, atol=0)
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_dora_embedding_matches_its_formula():
    ids = torch.tensor([[0, 3], [2, 2]])
    w, A, B, m = _randn(4, 6, seed=1), _randn(2, 4, seed=2), _randn(6, 2, seed=3), _randn(6, seed=4).abs() + 0.5
    norm = torch.linalg.vector_norm(w.t() + 0.5 * B @ A, dim=1)
    expected = m / norm * (w[ids] + 0.5 * A[:, ids].movedim(0, -1) @ B.t())
    with peft_fast.use_backend("torch"):
        torch.testing.assert_close(ops.dora_embedding(ids, w, A, B, m, 0.5), expected, rtol=1e-6, atol=0)  # fp32 norm


def test_stack_cache_clear_drops_the_stack():
    cache = LoraStackCache()
    cache.get([torch.randn(2, 4)], [torch.randn(3, 2)], [1.0], [0.0])
    cache.clear()
    assert cache._stack is None and cache._key is None


# -- size guards (meta tensors: no memory) -----------------------------------------------------------
def test_size_reason_counts_rows_over_the_last_dimension_and_takes_1d_inputs():
    from peft_fast.ops.checks import size_reason

    meta = dict(device="meta")
    # 2**16 rows of 8 features times 2**15 outputs: an output of 2**31 elements
    assert "2147483648 elements" in size_reason(torch.empty(2**10, 64, 8, **meta), torch.empty(2**15, 8, **meta))
    assert size_reason(torch.empty(2**10, 64, 8, **meta), torch.empty(2**14, 8, **meta)) is None
    assert "2147483648 elements" in size_reason(torch.empty(8, **meta), torch.empty(2**28, 8, **meta))


# -- backend status and the backend table --------------------------------------------------------------
def test_interpreter_flag_and_triton_status(monkeypatch):
    pytest.importorskip("triton")  # not require_triton(): a broken status check would skip this test
    monkeypatch.setenv("TRITON_INTERPRET", "")
    assert not dispatch.interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.interpreter_enabled()
    if not torch.cuda.is_available():
        assert dispatch._triton_status() is None
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1 is not set" in dispatch._triton_status()


def test_cuda_status_without_registered_modules(monkeypatch):
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "cuda", ())
    assert dispatch._cuda_status() == "no CUDA C++ kernels are registered in this version of peft_fast"


def test_a_backend_module_that_fails_to_import_is_the_reason(monkeypatch):
    require_triton()
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "triton", ("peft_fast.no_such_module",))
    monkeypatch.delitem(dispatch._loaded, "triton", raising=False)
    reason = dispatch.unavailable_reason("triton")
    assert reason.startswith("loading peft_fast.no_such_module failed (ModuleNotFoundError")
    monkeypatch.delitem(dispatch._loaded, "triton")


def test_shipped_table_errors_are_named_without_the_env_note(tmp_path, monkeypatch):
    bad = tmp_path / "table.json"
    bad.write_text("{not json")
    monkeypatch.delenv(dispatch.BACKEND_TABLE_ENV, raising=False)
    monkeypatch.setattr(dispatch, "BACKEND_TABLE", bad)
    monkeypatch.setattr(dispatch, "_table_cache", None)
    with pytest.raises(ValueError, match=r"^backend table " + str(bad).replace(".", r"\.") + r" is not valid JSON \("):
        dispatch.load_backend_table()


def test_missing_backend_table_is_named_without_the_env_note(tmp_path, monkeypatch):
    path = tmp_path / "nope.json"
    monkeypatch.setattr(dispatch, "_table_cache", None)
    with pytest.raises(
        FileNotFoundError, match=r"^backend table " + str(path).replace(".", r"\.") + " does not exist$"
    ):
        dispatch.load_backend_table(path)


def _fake_op_with_default_order(monkeypatch, order, **refusals):
    """An op "edges_fake_op" with an AUTO_DEFAULT entry `order`, impls returning their backend's
    name on every backend (refusing where `refusals` says), every backend pretended available."""
    import types

    op = "edges_fake_op"
    monkeypatch.setitem(dispatch._IMPLS, op, {})
    monkeypatch.setitem(dispatch.AUTO_DEFAULT, op, order)
    for b in ("torch", "triton", "triton_composite", "cuda"):
        why = refusals.get(b)
        dispatch.register(op, b, lambda *a, _b=b, **k: _b, lambda *a, _w=why, **k: _w)
        if b != "torch":
            monkeypatch.setitem(dispatch._STATUS, b, lambda: None)
            monkeypatch.setitem(dispatch._loaded, b, None)
    monkeypatch.setattr(dispatch, "_table_cache", {"entries": {}})
    return op, types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, shape=(4, 8), numel=lambda: 32)


def test_auto_follows_the_ops_default_order_on_cuda_tensors(monkeypatch):
    op, cuda_like = _fake_op_with_default_order(monkeypatch, ("cuda", "torch"))
    with peft_fast.use_backend("auto"):
        assert dispatch.select(op, cuda_like)() == "cuda"  # not FALLBACK_ORDER's "triton"


def test_a_refusing_composite_falls_back_along_the_ops_composites(monkeypatch):
    op, cuda_like = _fake_op_with_default_order(
        monkeypatch, ("triton_composite", "cuda", "torch"), triton_composite="refused"
    )
    with peft_fast.use_backend("triton_composite"):
        assert dispatch.select(op, cuda_like)() == "cuda"  # the fused "triton" is not a composite
