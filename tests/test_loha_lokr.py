"""LoHa and LoKr against HF peft 0.21 on tiny models: configs, initialisation, state-dict keys,
trainable counts, outputs and gradients (training mode, with HF's rank and module dropout),
files both ways, merging, disabling and deleting; Linear, Conv1d and Conv2d."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
import torch
from conftest import make_inputs, make_model
from torch import nn

import peft_fast
from peft_fast.ops import lycoris_reference
from peft_fast.tuners.lokr import factorization

METHODS = {"loha": (peft_fast.LoHaConfig, peft.LoHaConfig), "lokr": (peft_fast.LoKrConfig, peft.LoKrConfig)}

CASES = [
    ("loha", {}),
    ("loha", {"r": 2, "alpha": 3, "init_weights": False, "rank_dropout": 0.3, "module_dropout": 0.4}),
    ("loha", {"r": 5, "init_weights": False, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 7}}),
    ("lokr", {}),
    ("lokr", {"r": 4, "init_weights": False, "rank_dropout": 0.3, "rank_dropout_scale": True, "module_dropout": 0.4}),
    ("lokr", {"r": 2, "init_weights": False, "decompose_both": True, "rank_dropout": 0.5}),
    ("lokr", {"r": 3, "init_weights": "lycoris", "decompose_factor": 4}),
]


def _pair(method: str, kwargs: dict, model_fn, seed: int = 5):
    """The same base model wrapped by HF peft and by peft_fast, adapters created from the same seed."""
    ours_cls, hf_cls = METHODS[method]
    torch.manual_seed(seed)
    hf = peft.get_peft_model(model_fn(), hf_cls(**kwargs))
    torch.manual_seed(seed)
    ours = peft_fast.get_peft_model(model_fn(), ours_cls(**kwargs))
    return hf, ours


def _llama_pair(method: str, kwargs: dict):
    return _pair(
        method, {"target_modules": "all-linear", "task_type": "CAUSAL_LM", **kwargs}, lambda: make_model("llama")
    )


def _assert_same_params(hf: nn.Module, ours: nn.Module) -> None:
    hsd, osd = hf.state_dict(), ours.state_dict()
    assert sorted(hsd) == sorted(osd)
    for k in hsd:
        torch.testing.assert_close(osd[k], hsd[k], rtol=0, atol=0, msg=k)


def _train_step(model: nn.Module, inputs: dict, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _force_form(monkeypatch, form: str) -> None:
    """Run with the cost model's choice ("chosen"), or every op forced into one form."""
    if form != "chosen":
        monkeypatch.setattr(lycoris_reference, "loha_form", lambda *a, **k: form)
        monkeypatch.setattr(lycoris_reference, "lokr_form", lambda *a, **k: form)


LLAMA_RUNS = [(m, kw, "chosen") for m, kw in CASES] + [
    (m, kw, form) for m, kw in (CASES[1], CASES[4]) for form in ("factored", "delta_weight")
]


@pytest.mark.parametrize(("method", "kwargs", "form"), LLAMA_RUNS)
def test_init_keys_counts_outputs_and_gradients_match_hf(method, kwargs, form, monkeypatch):
    _force_form(monkeypatch, form)
    hf, ours = _llama_pair(method, kwargs)
    _assert_same_params(hf, ours)
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    inputs = make_inputs("llama")
    # Training mode, same seed: HF's module and rank dropout draw the same numbers in both.
    h_loss, h_grads = _train_step(hf, inputs, 11)
    o_loss, o_grads = _train_step(ours, inputs, 11)
    torch.testing.assert_close(o_loss, h_loss, rtol=1e-5, atol=1e-6)
    assert sorted(o_grads) == sorted(h_grads)
    for n in h_grads:
        torch.testing.assert_close(o_grads[n], h_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    hf.eval()
    ours.eval()
    torch.testing.assert_close(ours(**inputs).logits, hf(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_config_fields_and_json_match_hf(method, tmp_path):
    ours_cls, hf_cls = METHODS[method]
    hf_fields = {f.name for f in dataclasses.fields(hf_cls)}
    ours_fields = {f.name for f in dataclasses.fields(ours_cls)}
    # Every LoHa/LoKr field of HF's (beyond PeftConfig's generic ones) exists here with HF's default.
    own_hf = hf_fields - {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert own_hf <= ours_fields, own_hf - ours_fields
    for f in dataclasses.fields(hf_cls):
        if f.name in own_hf:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert getattr(ours_cls(), f.name) == default, f.name
    # An HF adapter_config.json reads into ours with the same values.
    hf_cls(r=4, alpha=16, target_modules=["q_proj"], rank_dropout=0.1).save_pretrained(tmp_path)
    loaded = peft_fast.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is ours_cls and loaded.r == 4 and loaded.alpha == 16 and loaded.rank_dropout == 0.1
    assert loaded.target_modules == {"q_proj"}


@pytest.mark.parametrize(("method", "kwargs"), [CASES[1], CASES[4]])
def test_files_load_both_ways(method, kwargs, tmp_path):
    hf, ours = _llama_pair(method, kwargs)
    inputs = make_inputs("llama")
    # Make the adapters differ between the two before exchanging files.
    for p in ours.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "hf" / "adapter_model.safetensors")
    )
    hf_loaded = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours")
    ours_loaded = peft_fast.PeftModel.from_pretrained(make_model("llama"), tmp_path / "hf")
    ours.eval()
    hf.eval()
    torch.testing.assert_close(hf_loaded(**inputs).logits, ours(**inputs).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_loaded(**inputs).logits, hf(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_merge_unmerge_disable_delete_match_hf(method):
    hf, ours = _llama_pair(method, {"r": 3, "init_weights": False})
    inputs = make_inputs("llama")
    second = {"r": 2, "init_weights": False, "target_modules": ["q_proj", "v_proj"]}
    torch.manual_seed(8)
    hf.add_adapter("other", METHODS[method][1](**second))
    torch.manual_seed(8)
    ours.add_adapter("other", METHODS[method][0](**second))
    hf.eval()
    ours.eval()

    def same(msg: str) -> None:
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, hf(**inputs).logits, rtol=1e-5, atol=1e-5, msg=msg)

    same("default adapter")
    for m in (hf, ours):
        m.base_model.set_adapter(["default", "other"])
    same("two active adapters")
    for m in (hf, ours):
        m.merge_adapter()
    same("merged")
    for m in (hf, ours):
        m.unmerge_adapter()
    same("unmerged")
    with hf.disable_adapter(), ours.disable_adapter():
        same("disabled")
    for m in (hf, ours):
        m.set_adapter("other")
        m.delete_adapter("default")
    same("after deleting default")
    with torch.no_grad():
        merged = ours.merge_and_unload(safe_merge=True)(**inputs).logits
        hf_merged = hf.merge_and_unload()(**inputs).logits
    torch.testing.assert_close(merged, hf_merged, rtol=1e-5, atol=1e-5)


def _cp_by_autograd(t1, w1a, w1b, t2, w2a, w2b, scale):
    """HF peft's LoHa CP forward (HadaWeightCP.forward), left to autograd."""
    r1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
    r2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    return r1 * r2 * scale


class ConvNet(nn.Module):
    """Conv2d (3x3, 1x1, grouped), Conv1d and Linear layers in one small model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.pointwise = nn.Conv2d(6, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.temporal = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grouped(torch.relu(self.pointwise(torch.relu(self.conv(x)))))
        h = self.temporal(h.flatten(2))
        return self.head(h.mean(-1))


CONV_TARGETS = ["conv", "pointwise", "grouped", "temporal", "head"]


CONV_RUNS = [(m, eff, r, "chosen") for m in ("loha", "lokr") for eff in (False, True) for r in (1, 4)] + [
    (m, False, 4, form) for m in ("loha", "lokr") for form in ("factored", "delta_weight")
]


@pytest.mark.parametrize(("method", "effective", "r", "form"), CONV_RUNS)
def test_conv_layers_match_hf(method, effective, r, form, monkeypatch):
    _force_form(monkeypatch, form)
    if method == "loha" and effective:
        # HF peft's hand-written CP backward is wrong for hada_w*_a (see the next test); compare
        # against HF's forward differentiated by autograd instead.
        import peft.tuners.loha.layer as hf_loha

        monkeypatch.setattr(hf_loha, "make_weight_cp", _cp_by_autograd)
    targets = CONV_TARGETS
    if method == "lokr" and effective:
        targets = [t for t in targets if t != "temporal"]  # HF peft crashes there (see the test below)
    kwargs = {"target_modules": targets, "r": r, "init_weights": False, "use_effective_conv2d": effective}
    kwargs["rank_dropout"] = 0.2
    hf, ours = _pair(method, kwargs, lambda: (torch.manual_seed(0), ConvNet())[1])
    _assert_same_params(hf, ours)
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(2))
    for m in (hf, ours):
        m.train()
    torch.manual_seed(3)
    h_out = hf(x)
    torch.manual_seed(3)
    o_out = ours(x)
    torch.testing.assert_close(o_out, h_out, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(h_out)
    h_out.backward(g)
    o_out.backward(g)
    o_params = dict(ours.named_parameters())
    for n, p in hf.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(o_params[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    for m in (hf, ours):
        m.eval()
        m.merge_adapter()
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


def test_loha_effective_conv_gradients_are_autograds():
    """Where HF peft's hand-written CP backward is wrong, ours equals float64 autograd of HF's forward."""
    from peft.tuners.loha.layer import HadaWeightCP

    torch.manual_seed(0)
    model = peft_fast.get_peft_model(
        ConvNet().double(),
        peft_fast.LoHaConfig(target_modules=["conv"], r=3, init_weights=False, use_effective_conv2d=True),
    )
    layer = model.base_model.model.conv
    names = ["hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"]
    params = [getattr(layer, n)["default"] for n in names]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out = layer(x)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, params, g)

    scale = torch.tensor(layer.scaling["default"], dtype=torch.float64)

    def through(weight_fn):
        dw = weight_fn(*params)
        base = layer.base_layer
        return base(x) + torch.nn.functional.conv2d(x, dw, stride=base.stride, padding=base.padding)

    want = torch.autograd.grad(through(lambda *p: _cp_by_autograd(*p, scale)), params, g)
    for n, a, b in zip(names, ours, want):
        torch.testing.assert_close(a, b, msg=n)
    hf_grads = torch.autograd.grad(through(lambda *p: HadaWeightCP.apply(*p, scale)), params, g)
    assert not torch.allclose(hf_grads[1], want[1])  # HF's w1_a gradient is the known-wrong one


def test_lokr_effective_conv1d_runs_where_hf_crashes():
    """HF peft 0.21 cannot run LoKr's CP form on a Conv1d (torch.kron refuses the strides of its
    einsum output); ours gives base + conv1d(x, kron(w1, t2 ×₁ w2_a ×₂ w2_b)) computed by hand."""
    kwargs = {"target_modules": ["temporal"], "r": 1, "init_weights": False, "use_effective_conv2d": True}
    hf, ours = _pair("lokr", kwargs, ConvNet)
    x = torch.randn(2, 8, 5)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        hf.base_model.model.temporal(x)
    layer = ours.base_model.model.temporal
    p = {n: getattr(layer, n)["default"].detach().double() for n in ("lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b")}
    b, d = p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1]
    w2 = torch.zeros(b, d, 3, dtype=torch.float64)
    for i in range(b):
        for j in range(d):
            w2[i, j] = (
                p["lokr_t2"][:, :, :, 0] * torch.outer(p["lokr_w2_a"][:, i], p["lokr_w2_b"][:, j])[..., None]
            ).sum((0, 1))
    a, c = p["lokr_w1"].shape
    dw = torch.zeros(a * b, c * d, 3, dtype=torch.float64)
    for i1 in range(a):
        for j1 in range(c):
            dw[i1 * b : (i1 + 1) * b, j1 * d : (j1 + 1) * d] = p["lokr_w1"][i1, j1] * w2
    base = layer.base_layer
    want = base.double()(x.double()) + torch.nn.functional.conv1d(x.double(), dw * layer.scaling["default"], padding=1)
    base.float()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_transformers_conv1d_is_refused_like_hf(method):
    ours_cls, hf_cls = METHODS[method]
    with pytest.raises(TypeError, match="not supported"):
        peft.get_peft_model(make_model("gpt2"), hf_cls(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match=r"Conv1D.*nn\.Linear, nn\.Conv1d and nn\.Conv2d"):
        peft_fast.get_peft_model(make_model("gpt2"), ours_cls(target_modules=["c_attn"]))


def test_factorization_is_hfs():
    from peft.tuners.lokr.layer import factorization as hf_factorization

    for dim in (1, 7, 32, 44, 97, 128, 768, 3072, 4096):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 100):
            assert factorization(dim, factor) == hf_factorization(dim, factor), (dim, factor)


def test_decompose_factor_that_does_not_divide_warns_and_keeps_hfs_shapes():
    kwargs = {"target_modules": ["gate_proj"], "decompose_factor": 3, "r": 16}
    with pytest.warns(UserWarning, match=r"decompose_factor=3 does not divide the input dimension \(32\)"):
        hf, ours = _pair("lokr", kwargs, lambda: make_model("llama"))
    _assert_same_params(hf, ours)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decompose_factor": 0}, "decompose_factor must be -1"),
        ({"decompose_factor": -2}, "decompose_factor must be -1"),
        ({"r": 0}, "r must be a positive integer"),
        ({"rank_dropout": 1.0}, r"rank_dropout must be in \[0, 1\)"),
        ({"module_dropout": -0.1}, r"module_dropout must be in \[0, 1\]"),
        ({"init_weights": "gaussian"}, "init_weights must be True, False or 'lycoris'"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ],
)
def test_bad_config_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        peft_fast.LoKrConfig(**kwargs)


def test_loha_refuses_lycoris_init():
    with pytest.raises(ValueError, match="init_weights must be True or False for LoHa"):
        peft_fast.LoHaConfig(init_weights="lycoris")


def test_mixed_adapter_batches_are_refused_by_name():
    _, ours = _llama_pair("loha", {})
    inputs = make_inputs("llama")
    with pytest.raises(ValueError, match=r"adapter_names \(mixed adapter batches\) are not supported by LoHaLayer"):
        ours(**inputs, adapter_names=["default"] * 3)


def test_no_warning_for_dividing_factor():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft_fast.get_peft_model(
            make_model("llama"), peft_fast.LoKrConfig(target_modules=["q_proj"], decompose_factor=4)
        )


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_bf16_base_keeps_hfs_dtypes_and_outputs(method):
    """HF peft's autocast_adapter_dtype: fp32 adapters on a bf16 base, output in bf16."""
    kwargs = {"target_modules": "all-linear", "task_type": "CAUSAL_LM", "init_weights": False}
    hf, ours = _pair(method, kwargs, lambda: make_model("llama").to(torch.bfloat16))
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in hf.named_parameters()}
    assert any(p.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)
    inputs = make_inputs("llama")
    with torch.no_grad():
        got, want = ours(**inputs).logits, hf(**inputs).logits
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
