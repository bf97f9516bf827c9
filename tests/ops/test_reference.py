"""peft_fast/ops/reference.py against HF peft's own layers, given the same tensors.

The reference is the oracle for every kernel, so it must compute what HF peft computes:
same forward, same gradients, same dtype handling (fp32 adapters on a low-precision base),
same dropout draws for the same seed.
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.ia3.layer import Linear as HFIA3Linear
from peft.tuners.lora.layer import Embedding as HFLoraEmbedding
from peft.tuners.lora.layer import Linear as HFLoraLinear
from torch import nn

from peft_fast.ops import reference

DTYPES = [torch.float32, torch.bfloat16]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _assert_same(actual, expected, dtype):
    # the same torch ops in the same order: equal up to at most rounding noise
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _assert_same_delta(actual, expected, base_out, dtype):
    """The LoRA delta (output minus the base layer's output) of ours vs HF's, in relative norm.

    Error model: both sides compute the same ops in the same order, then round the sum
    base + delta to `dtype` once (unit roundoff u = eps/2: 6e-8 fp32, 3.9e-3 bf16). So their
    deltas differ by at most about u·|out| per element: ‖Δours − Δhf‖ ≤ 2u·‖out‖, a bound
    relative to ‖Δ‖ of 2u·‖out‖/‖Δ‖. The test asserts that bound is below 10% (here 2-6% in
    bf16), so a 10% error in the delta cannot pass."""
    delta, delta_hf = (actual - base_out).double(), (expected - base_out).double()
    u = torch.finfo(dtype).eps / 2
    bound = 2 * u * actual.double().norm().item() / delta_hf.norm().item() + 1e-12
    assert bound < 0.1, f"the bound {bound:.3g} could not see a 10% error in the delta"
    err = ((delta - delta_hf).norm() / delta_hf.norm()).item()
    assert err <= bound, f"LoRA delta relative error {err:.3g} > {bound:.3g}"


def _hf_lora_linear(base, r, alpha, dropout=0.0, rslora=False, adapter_dtype=torch.float32, conv1d=False):
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, init_lora_weights=False, fan_in_fan_out=conv1d
    )
    layer = HFLoraLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, is_target_conv_1d_layer=conv1d)
    layer.lora_A["default"].to(adapter_dtype)
    layer.lora_B["default"].to(adapter_dtype)
    return layer


def _lora_case(base_dtype, n_in=33, n_out=7, r=5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias).to(base_dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n_out, n_in, generator=g))
        if bias:
            base.bias.copy_(torch.randn(n_out, generator=g))
    x = torch.randn(2, 3, n_in, generator=g).to(base_dtype)
    return base, x


def _grads(*tensors):
    return [t.grad for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_matches_hf(dtype, bias, rslora):
    base, x = _lora_case(dtype, bias=bias)
    torch.manual_seed(0)  # the adapter's random init: fixed, whatever ran before
    layer = _hf_lora_linear(base, r=5, alpha=7, rslora=rslora)
    with torch.no_grad():  # a LoRA delta large enough beside the base output for a bf16 check with power
        layer.lora_B["default"].weight.mul_(4.0)
    layer.base_layer.weight.requires_grad_(True)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # fp32 adapters, also on a bf16 base
    scaling = layer.scaling["default"]
    assert scaling == (7 / 5**0.5 if rslora else 7 / 5)

    x_hf = _leaf(x)
    out_hf = layer(x_hf)
    g = torch.randn(out_hf.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    out_hf.backward(g)

    x_ours, w, A, B = (
        _leaf(x),
        _leaf(base.weight),
        _leaf(layer.lora_A["default"].weight),
        _leaf(layer.lora_B["default"].weight),
    )
    b = _leaf(base.bias) if bias else None
    out = reference.lora_linear(x_ours, w, b, A, B, scaling, 0.0, True)
    out.backward(g)

    _assert_same(out, out_hf, dtype)
    with torch.no_grad():
        _assert_same_delta(out, out_hf, base(x), dtype)
    assert out.dtype == dtype
    _assert_same(x_ours.grad, x_hf.grad, dtype)
    _assert_same(w.grad, layer.base_layer.weight.grad, dtype)
    _assert_same(A.grad, layer.lora_A["default"].weight.grad, torch.float32)
    _assert_same(B.grad, layer.lora_B["default"].weight.grad, torch.float32)
    assert A.grad.dtype == torch.float32
    if bias:
        _assert_same(b.grad, layer.base_layer.bias.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_same_dtype_adapters(dtype):
    """autocast_adapter_dtype=False: adapters in the base dtype."""
    base, x = _lora_case(dtype)
    torch.manual_seed(0)  # the adapter's random init: fixed, whatever ran before
    layer = _hf_lora_linear(base, r=4, alpha=8, adapter_dtype=dtype)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():  # a LoRA delta large enough beside the base output for a bf16 check with power
        B.mul_(4.0)
    assert A.dtype == dtype
    with torch.no_grad():
        out = reference.lora_linear(x, base.weight, base.bias, A, B, 2.0, 0.0, False)
        _assert_same(out, layer(x), dtype)
        _assert_same_delta(out, layer(x), base(x), dtype)


def test_lora_linear_dropout_draws_like_hf():
    base, x = _lora_case(torch.float32)
    layer = _hf_lora_linear(base, r=4, alpha=8, dropout=0.3).train()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.manual_seed(11)
        expected = layer(x)
        torch.manual_seed(11)
        ours = reference.lora_linear(x, base.weight, base.bias, A, B, 2.0, 0.3, True)
        torch.manual_seed(12)
        other_mask = reference.lora_linear(x, base.weight, base.bias, A, B, 2.0, 0.3, True)
        no_dropout = reference.lora_linear(x, base.weight, base.bias, A, B, 2.0, 0.3, False)
        layer.eval()
        expected_eval = layer(x)
    _assert_same(ours, expected, torch.float32)
    assert not torch.allclose(ours, other_mask)
    _assert_same(no_dropout, expected_eval, torch.float32)


def test_lora_linear_conv1d_and_strided_input():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(7, 33)  # weight stored (in, out)
    with torch.no_grad():
        conv.bias.normal_()
    layer = _hf_lora_linear(conv, r=3, alpha=5, conv1d=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(33, 4, 2).permute(2, 1, 0)  # (2, 4, 33), not contiguous
    assert not x.is_contiguous()
    with torch.no_grad():
        out = reference.lora_linear(x, conv.weight.T, conv.bias, A, B, layer.scaling["default"], 0.0, False)
        # (transformers' Conv1D itself needs a contiguous input)
        _assert_same(out, layer(x.contiguous()), torch.float32)


def _hf_ia3(base, feedforward, dtype=torch.float32):
    cfg = peft.IA3Config(init_ia3_weights=False, target_modules=["x"], feedforward_modules=["x"] if feedforward else [])
    layer = HFIA3Linear(base, "default", config=cfg, is_feedforward=feedforward)
    layer.ia3_l["default"].data = layer.ia3_l["default"].data.to(dtype)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_linear_matches_hf(dtype, feedforward):
    base, x = _lora_case(dtype, n_in=19, n_out=11)
    base.weight.requires_grad_(True)
    layer = _hf_ia3(base, feedforward)
    l_hf = layer.ia3_l["default"]
    assert l_hf.shape == ((1, 19) if feedforward else (11, 1))
    assert l_hf.dtype == torch.float32

    x_hf = _leaf(x)
    out_hf = layer(x_hf)
    g = torch.randn(out_hf.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    out_hf.backward(g)

    x_ours, w, b, l = _leaf(x), _leaf(base.weight), _leaf(base.bias), _leaf(l_hf)
    out = reference.ia3_linear(x_ours, w, b, l, feedforward)
    out.backward(g)
    _assert_same(out, out_hf, dtype)
    _assert_same(x_ours.grad, x_hf.grad, dtype)
    _assert_same(w.grad, base.weight.grad, dtype)
    _assert_same(b.grad, base.bias.grad, dtype)
    _assert_same(l.grad, l_hf.grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_embedding_matches_hf(dtype):
    torch.manual_seed(0)
    base = nn.Embedding(23, 9, padding_idx=0).to(dtype)
    cfg = peft.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False)
    layer = HFLoraEmbedding(base, "default", config=cfg, r=3, lora_alpha=5, init_lora_weights=False)
    layer.lora_embedding_A["default"].data = layer.lora_embedding_A["default"].data.float()
    layer.lora_embedding_B["default"].data = layer.lora_embedding_B["default"].data.float()
    ids = torch.tensor([[0, 5, 22, 5], [1, 2, 3, 0]])
    out_hf = layer(ids)
    g = torch.randn(out_hf.shape).to(dtype)
    out_hf.backward(g)

    A, B = _leaf(layer.lora_embedding_A["default"]), _leaf(layer.lora_embedding_B["default"])
    out = reference.lora_embedding(ids, base.weight, A, B, layer.scaling["default"], padding_idx=0)
    out.backward(g)
    _assert_same(out, out_hf, dtype)
    _assert_same(A.grad, layer.lora_embedding_A["default"].grad, torch.float32)
    _assert_same(B.grad, layer.lora_embedding_B["default"].grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_mixed_matches_hf(dtype):
    base, _ = _lora_case(dtype, n_in=17, n_out=13)
    layer = _hf_lora_linear(base, r=4, alpha=8)
    layer.update_layer("other", 2, lora_alpha=3, config=peft.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False))
    layer.lora_A["other"].float()
    layer.lora_B["other"].float()
    names = ["other", "__base__", "default", "other", "default"]
    x = torch.randn(len(names), 3, 17).to(dtype)
    with torch.no_grad():
        expected = layer(x, adapter_names=names)
        order = ["default", "other"]
        rows = torch.tensor([order.index(n) if n in order else -1 for n in names])
        out = reference.lora_linear_mixed(
            x,
            base.weight,
            base.bias,
            [layer.lora_A[n].weight for n in order],
            [layer.lora_B[n].weight for n in order],
            [layer.scaling[n] for n in order],
            [0.0, 0.0],
            rows,
            False,
        )
    _assert_same(out, expected, dtype)
    # rows without an adapter are the base layer's output
    with torch.no_grad():
        _assert_same(out[1], base(x[1]), dtype)


def test_lora_linear_mixed_rows_equal_single_adapter_runs():
    """Row by row, the mixed op equals lora_linear with that row's adapter, gradients included."""
    base, _ = _lora_case(torch.float32, n_in=10, n_out=6)
    g = torch.Generator().manual_seed(5)
    As = [torch.randn(3, 10, generator=g, requires_grad=True), torch.randn(1, 10, generator=g, requires_grad=True)]
    Bs = [torch.randn(6, 3, generator=g, requires_grad=True), torch.randn(6, 1, generator=g, requires_grad=True)]
    scalings = [0.5, 3.0]
    x = torch.randn(4, 7, 10, generator=g)
    rows = torch.tensor([1, -1, 0, 1])
    out = reference.lora_linear_mixed(x, base.weight, base.bias, As, Bs, scalings, [0.0, 0.0], rows, True)
    out.pow(2).sum().backward()
    mixed_grads = [t.grad.clone() for t in As + Bs]
    for t in As + Bs:
        t.grad = None
    for i, k in enumerate(rows.tolist()):
        if k < 0:
            single = nn.functional.linear(x[i], base.weight, base.bias)
        else:
            single = reference.lora_linear(x[i], base.weight, base.bias, As[k], Bs[k], scalings[k], 0.0, True)
        torch.testing.assert_close(out[i], single, rtol=1e-6, atol=1e-6)
        single.pow(2).sum().backward()
    for got, t in zip(mixed_grads, As + Bs):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)
