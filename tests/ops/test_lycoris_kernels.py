"""The LoHa and LoKr Triton kernels (kernels/loha_*.py, kernels/lokr_apply.py through
peft_fast/ops/triton/{loha,lokr}.py) against a float64 oracle built by hand from the formulas
(ΔW = (w1a w1b) ⊙ (w2a w2b) · s, ΔW = kron(w1, w2) · s), forward and backward, on odd shapes,
strided and 3-D inputs, with and without rank dropout's row scale. Under the interpreter on CPU
(fp32, fp16), on the GPU when there is one (bf16 too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, KERNEL_DTYPES, assert_close_to_oracle, grads_of, leaf, randn, require_triton

from peft_fast import ops
from peft_fast.ops import dispatch
from peft_fast.ops.triton import loha as triton_loha
from peft_fast.ops.triton import lokr as triton_lokr


@pytest.fixture(autouse=True)
def _triton():
    require_triton()


def _x(lead: tuple[int, ...], n_in: int, layout: str, seed: int) -> torch.Tensor:
    """float64 input (..., n_in): contiguous, or a strided view (every other column of a wider tensor)."""
    if layout == "strided":
        return randn(*lead, 2 * n_in, seed=seed)[..., ::2]
    return randn(*lead, n_in, seed=seed)


def _check(name, got_out, got_grads, oracle_out, oracle_grads, torch_out, torch_grads, dtype):
    assert got_out.dtype == dtype and got_out.shape == oracle_out.shape
    assert_close_to_oracle(f"{name} y", got_out, oracle_out, dtype, torch_out)
    for i, (g, o, t) in enumerate(zip(got_grads, oracle_grads, torch_grads)):
        assert g.shape == o.shape
        assert_close_to_oracle(f"{name} grad {i}", g, o, dtype, t)


LOHA_CASES = [  # lead dims, in, out, rank, x's layout, rank dropout
    ((37,), 33, 50, 3, "strided", True),
    ((2, 7), 17, 19, 1, "contiguous", True),
    ((1,), 100, 33, 8, "contiguous", False),
    ((2, 3), 24, 40, 5, "strided", False),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(("lead", "n_in", "n_out", "r", "layout", "rank_dropout"), LOHA_CASES)
def test_loha_kernels_match_float64(dtype, lead, n_in, n_out, r, layout, rank_dropout):
    seed = n_in * 7 + n_out + r
    x = _x(lead, n_in, layout, seed)
    ws = [randn(n_out, r, seed=seed + 1), randn(r, n_in, seed=seed + 2) / n_in**0.5]
    ws += [randn(n_out, r, seed=seed + 3), randn(r, n_in, seed=seed + 4) / n_in**0.5]
    row_scale = ((randn(n_out, seed=seed + 5) > -0.5).double() * 1.6) if rank_dropout else None
    dy = randn(*lead, n_out, seed=seed + 6)
    s = 0.75

    # Oracle: ΔW built by hand in float64, applied with F.linear.
    inputs64 = [x.clone().requires_grad_(True)] + [w.clone().requires_grad_(True) for w in ws]
    dw = (inputs64[1] @ inputs64[2]) * (inputs64[3] @ inputs64[4]) * s
    if row_scale is not None:
        dw = dw * row_scale[:, None]
    oracle = F.linear(inputs64[0], dw)
    oracle_grads = grads_of(oracle, dy, inputs64)

    rs = row_scale.to(dtype) if row_scale is not None else None
    with ops.use_backend("torch"):
        t_in = [leaf(t, dtype) for t in [x, *ws]]
        t_out = ops.loha_linear(*t_in, s, rs, form="factored")
        t_grads = grads_of(t_out, dy, t_in)
    with ops.use_backend("triton"):
        k_in = [leaf(t, dtype) for t in [x, *ws]]
        assert dispatch.select("loha_linear", *k_in, s, rs, "factored") is triton_loha.loha_linear
        k_out = ops.loha_linear(*k_in, s, rs, form="factored")
        k_grads = grads_of(k_out, dy, k_in)
    _check("loha", k_out, k_grads, oracle, oracle_grads, t_out, t_grads, dtype)


LOKR_CASES = [  # lead dims, a, c, b, d, x's layout, rank dropout
    ((37,), 5, 7, 6, 3, "strided", True),
    ((2, 9), 1, 3, 33, 1, "contiguous", False),
    ((4,), 24, 17, 20, 19, "contiguous", True),
    ((2, 3), 8, 8, 16, 16, "strided", False),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(("lead", "a", "c", "b", "d", "layout", "rank_dropout"), LOKR_CASES)
def test_lokr_kernel_matches_float64(dtype, lead, a, c, b, d, layout, rank_dropout):
    seed = a * 100 + c * 10 + b + d
    x = _x(lead, c * d, layout, seed)
    w1, w2 = randn(a, c, seed=seed + 1), randn(b, d, seed=seed + 2) / (c * d) ** 0.5
    row_scale = ((randn(a * b, seed=seed + 3) > -0.5).float() * 1.4) if rank_dropout else None
    dy = randn(*lead, a * b, seed=seed + 4)
    s = 0.5

    inputs64 = [x.clone().requires_grad_(True), w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)]
    dw = torch.kron(inputs64[1], inputs64[2]) * s
    if row_scale is not None:
        dw = dw * row_scale.double()[:, None]
    oracle = F.linear(inputs64[0], dw)
    oracle_grads = grads_of(oracle, dy, inputs64)

    with ops.use_backend("torch"):
        t_in = [leaf(t, dtype) for t in [x, w1, w2]]
        t_out = ops.lokr_linear(*t_in, s, row_scale, form="factored")
        t_grads = grads_of(t_out, dy, t_in)
    with ops.use_backend("triton"):
        k_in = [leaf(t, dtype) for t in [x, w1, w2]]
        assert dispatch.select("lokr_linear", *k_in, s, row_scale, "factored") is triton_lokr.lokr_linear
        k_out = ops.lokr_linear(*k_in, s, row_scale, form="factored")
        k_grads = grads_of(k_out, dy, k_in)
    _check("lokr", k_out, k_grads, oracle, oracle_grads, t_out, t_grads, dtype)


def test_only_the_weights_need_grad():
    """A frozen input (no grad for x) still gives every factor's gradient, equal to the torch path's."""
    x = randn(9, 20, seed=1, dtype=torch.float32)
    ws = [randn(12, 2, seed=2, dtype=torch.float32), randn(2, 20, seed=3, dtype=torch.float32)]
    ws += [randn(12, 2, seed=4, dtype=torch.float32), randn(2, 20, seed=5, dtype=torch.float32)]
    dy = randn(9, 12, seed=6, dtype=torch.float32)
    got = {}
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            params = [leaf(w, torch.float32) for w in ws]
            got[backend] = grads_of(ops.loha_linear(x, *params, 0.5, form="factored"), dy, params)
    for g, t in zip(got["triton"], got["torch"]):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)


def test_the_delta_weight_form_goes_to_torch():
    """The kernels implement the factored form only: where the count (or the caller) picks ΔW,
    "triton" declines and dispatch runs the torch path, with the same result."""
    x = randn(4, 8, seed=1, dtype=torch.float32)
    ws = [randn(8, 8, seed=s, dtype=torch.float32) for s in range(2, 6)]
    with ops.use_backend("triton"):
        assert triton_loha.supports(x, *ws, 1.0, None, None) is not None  # r² = 64 > a 8-wide layer
        assert dispatch.select("loha_linear", x, *ws, 1.0, None, None) is not triton_loha.loha_linear
        w1, w2 = randn(1, 1, seed=7, dtype=torch.float32), randn(8, 8, seed=8, dtype=torch.float32)
        assert triton_lokr.supports(x, w1, w2, 1.0, None, "delta_weight") is not None
        assert dispatch.select("lokr_linear", x, w1, w2, 1.0, None, "delta_weight") is not triton_lokr.lokr_linear
        torch.testing.assert_close(
            ops.lokr_linear(x, w1, w2, 1.0, form="delta_weight"), F.linear(x, torch.kron(w1, w2)), rtol=1e-5, atol=1e-5
        )


def test_kernel_launchers_refuse_bad_shapes():
    from peft_fast.kernels.loha_expand import loha_expand
    from peft_fast.kernels.loha_factor_grad import loha_factor_grad
    from peft_fast.kernels.loha_shrink import loha_shrink
    from peft_fast.kernels.lokr_apply import MAX_C_PAD, lokr_apply

    x, u = torch.zeros(4, 6, device=DEVICE), torch.zeros(5, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \(M, K\), u and v \(K, r\) do not fit"):
        loha_shrink(x, u, u)
    with pytest.raises(ValueError, match=r"h \(M, r²\), u and v \(N, r\) do not fit"):
        loha_expand(torch.zeros(4, 3, device=DEVICE), u, u)
    with pytest.raises(ValueError, match=r"P \(M, 4\) and Q \(M, 5\) do not fit"):
        loha_factor_grad(torch.zeros(4, 4, device=DEVICE), torch.zeros(3, 5, device=DEVICE), u, u)
    with pytest.raises(ValueError, match="x has 6 features but kron"):
        lokr_apply(x, torch.zeros(2, 2, device=DEVICE), torch.zeros(2, 2, device=DEVICE))
    with pytest.raises(ValueError, match=f"at most {MAX_C_PAD} columns"):
        lokr_apply(torch.zeros(1, MAX_C_PAD + 1, device=DEVICE), torch.zeros(1, MAX_C_PAD + 1, device=DEVICE),
                   torch.zeros(1, 1, device=DEVICE))  # fmt: skip


def test_lycoris_models_train_the_same_on_triton(monkeypatch):
    """A LoHa and a LoKr model (layers -> ops front doors -> "triton") give the torch backend's loss
    and gradients: the layers reach the kernels only through the ops."""
    from conftest import make_inputs, make_model

    import peft_fast

    calls = {"loha_linear": 0, "lokr_linear": 0}
    for op in calls:
        impl = dispatch._IMPLS[op]["triton"]

        def counted(*args, _fn=impl.fn, _op=op):
            calls[_op] += 1
            return _fn(*args)

        monkeypatch.setitem(dispatch._IMPLS[op], "triton", dispatch.Impl(counted, impl.supports))

    for config in (
        peft_fast.LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False, rank_dropout=0.3),
        peft_fast.LoKrConfig(r=4, target_modules=["q_proj"], init_weights=False, rank_dropout=0.3),
    ):
        results = {}
        for backend in ("torch", "triton"):
            torch.manual_seed(0)
            model = peft_fast.get_peft_model(make_model("llama"), config).to(DEVICE).train()
            torch.manual_seed(1)  # the same rank-dropout draws for both backends
            with ops.use_backend(backend):
                loss = model(**{k: v.to(DEVICE) for k, v in make_inputs("llama").items()}).logits.square().mean()
                loss.backward()
            results[backend] = (loss, [p.grad for p in model.parameters() if p.requires_grad])
        torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
        for g, t in zip(results["triton"][1], results["torch"][1]):
            torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-6)
    assert calls == {"loha_linear": 2, "lokr_linear": 2}  # q_proj of two layers, once each
