"""PeftModel behaviour that HF peft's own test-suite checks, for LoRA and IA³ on tiny models:
training touches only adapters, save/load, disabling, merging, unloading, several adapters,
mixed-adapter batches, low precision, the meta device, task wrappers and LoraConfig options.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from conftest import TASKS, make_inputs, make_model, output_of
from torch import nn

import peft_fast
from peft_fast import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft_fast.tuners.base import AdapterLayer, ModulesToSaveWrapper
from peft_fast.tuners.ia3 import IA3Linear
from peft_fast.tuners.lora import LoraLayer

KINDS = ["llama", "gpt2", "bert", "t5"]
METHODS = ["lora", "ia3"]
ADAPTER_MARKERS = ("lora_", "ia3_", "modules_to_save")


def _config(lib, method, kind, **kw):
    """A non-identity adapter (random init) with the default targets of `kind`."""
    if method == "lora":
        return lib.LoraConfig(task_type=TASKS[kind], r=4, lora_alpha=8, init_lora_weights=False, **kw)
    return lib.IA3Config(task_type=TASKS[kind], init_ia3_weights=False, **kw)


def _wrap(kind, method, seed=123, adapter_name="default", **kw):
    base = make_model(kind)
    torch.manual_seed(seed)  # adapter init
    return get_peft_model(base, _config(peft_fast, method, kind, **kw), adapter_name=adapter_name).eval()


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _is_adapter_param(name):
    return any(m in name for m in ADAPTER_MARKERS) and ".original_module." not in name


def _loss(logits):
    """A loss whose gradient reaches every logit with a different fixed weight."""
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    return (logits.float() * weights).sum()


def _adapter_modules(model):
    return [m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_parameters_train(kind, method):
    model = _wrap(kind, method)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(_is_adapter_param(n) for n in trainable), sorted(trainable)
    assert any(("lora_" in n or "ia3_" in n) for n in trainable)
    if kind == "bert":  # SEQ_CLS: the classifier head is trained in full
        assert set(model.peft_config["default"].modules_to_save) == {"classifier", "score"}  # as HF peft
        assert any("classifier.modules_to_save.default" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = make_inputs(kind)
    for _ in range(3):
        opt.zero_grad()
        _loss(model(**inputs).logits).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == trainable
        opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_changes_output_and_identity_init_does_not(kind, method):
    inputs = make_inputs(kind)
    base = output_of(make_model(kind), inputs)
    assert not torch.allclose(output_of(_wrap(kind, method), inputs), base, atol=1e-4)
    identity = {"init_lora_weights": True} if method == "lora" else {"init_ia3_weights": True}
    torch.manual_seed(0)
    cfg = _config(peft_fast, method, kind)
    for k, v in identity.items():
        setattr(cfg, k, v)
    model = get_peft_model(make_model(kind), cfg).eval()
    _close(output_of(model, inputs), base)


# -- save and load -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(kind, method, tmp_path):
    model = _wrap(kind, method)
    inputs = make_inputs(kind)
    expected = output_of(model, inputs)
    expected_sd = model.state_dict()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    torch.manual_seed(4321)  # another seed: a load must not depend on the RNG
    loaded = PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode
    _close(output_of(loaded, inputs), expected)
    loaded_sd = loaded.state_dict()
    assert sorted(loaded_sd) == sorted(expected_sd)
    for k, v in expected_sd.items():
        assert torch.equal(loaded_sd[k], v), k

    # is_trainable=True: the adapter trains again; load_adapter reports no missing keys
    torch.manual_seed(99)
    trainable = PeftModel.from_pretrained(make_model(kind), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {n for n, p in _wrap(kind, method).named_parameters() if p.requires_grad}
    result = trainable.load_adapter(tmp_path, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    trainable.set_adapter("again")
    trainable.eval()
    _close(output_of(trainable, inputs), expected)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_load_named_adapters_and_bin_files(tmp_path, safe_serialization):
    model = _wrap("llama", "lora")
    torch.manual_seed(5)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    inputs = make_inputs("llama")
    expected = output_of(model, inputs)
    model.set_adapter("other")
    expected_other = output_of(model, inputs)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert (tmp_path / weights).is_file() and (tmp_path / "other" / weights).is_file()
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    _close(output_of(loaded, inputs), expected)
    loaded.set_adapter("other")
    _close(output_of(loaded, inputs), expected_other)
    # selected_adapters saves only those
    model.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert not (tmp_path / "sel" / "adapter_config.json").exists()
    assert (tmp_path / "sel" / "other" / "adapter_config.json").is_file()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_from_pretrained_low_cpu_mem_usage(kind, tmp_path):
    model = _wrap(kind, "lora")
    inputs = make_inputs(kind)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="low_cpu_mem_usage=True: peft_fast creates the adapter weights"):
        loaded = PeftModel.from_pretrained(make_model(kind), tmp_path, low_cpu_mem_usage=True)
    _close(output_of(loaded, inputs), output_of(model, inputs))


def test_get_peft_model_low_cpu_mem_usage_warns_and_builds_the_same_model():
    """HF peft leaves the adapter weights empty on meta; peft_fast initializes them and says so."""
    from peft_fast import LoraConfig, get_peft_model

    config = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    plain = get_peft_model(make_model("llama"), LoraConfig(**config))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="not empty on the meta device as HF peft does"):
        low = get_peft_model(make_model("llama"), LoraConfig(**config), low_cpu_mem_usage=True)
    sd_plain, sd_low = plain.state_dict(), low.state_dict()
    assert sd_plain.keys() == sd_low.keys()
    assert all(not t.is_meta and torch.equal(t, sd_plain[k]) for k, t in sd_low.items())


# -- disabling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter(kind, method):
    model = _wrap(kind, method)
    inputs = make_inputs(kind)
    base = output_of(make_model(kind), inputs)
    adapted = output_of(model, inputs)
    with model.disable_adapter():
        _close(output_of(model, inputs), base)
    _close(output_of(model, inputs), adapted)
    # a merged adapter is taken out while disabled (IA³ unmerges by dividing: a little rounding)
    model.merge_adapter()
    with model.disable_adapter():
        _close(output_of(model, inputs), base, tol=1e-4)
    _close(output_of(model, inputs), adapted, tol=1e-4)


# -- merging and unloading ----------------------------------------------------------------------
def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_merge_and_unload(kind, method, tmp_path):
    model = _wrap(kind, method)
    inputs = make_inputs(kind)
    unmerged = output_of(model, inputs)
    original = _base_weights(model)

    model.merge_adapter()
    assert all(m.merged for m in model.base_model.adapter_layers())
    merged_weights = _base_weights(model)
    assert any(not torch.allclose(merged_weights[n], original[n]) for n in original if n.endswith("weight"))
    _close(output_of(model, inputs), unmerged, tol=1e-4)
    model.merge_adapter()  # merging twice changes nothing
    for n, w in _base_weights(model).items():
        assert torch.equal(w, merged_weights[n]), n
    _close(output_of(model, inputs), unmerged, tol=1e-4)

    model.unmerge_adapter()
    assert not any(m.merged for m in model.base_model.adapter_layers())
    for n, w in _base_weights(model).items():
        _close(w, original[n], tol=1e-5)
    _close(output_of(model, inputs), unmerged, tol=1e-4)

    # merge_and_unload: the plain base class, no adapter modules, the same weights HF peft merges
    model.save_pretrained(tmp_path)
    base_keys = sorted(make_model(kind).state_dict())
    merged_model = model.merge_and_unload()
    assert type(merged_model) is type(make_model(kind))
    assert not _adapter_modules(merged_model)
    assert not hasattr(merged_model, "peft_config")
    assert sorted(merged_model.state_dict()) == base_keys
    _close(output_of(merged_model, inputs), unmerged, tol=1e-4)
    theirs = peft.PeftModel.from_pretrained(make_model(kind), tmp_path).merge_and_unload()
    theirs_sd = theirs.state_dict()
    for k, v in merged_model.state_dict().items():
        _close(v, theirs_sd[k], tol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_safe_merge_refuses_nan(method):
    for bad in (float("nan"), float("inf")):
        model = _wrap("llama", method)
        layer = next(model.base_model.adapter_layers())
        with torch.no_grad():
            if method == "lora":
                layer.lora_B["default"].weight[0, 0] = bad
            else:
                layer.ia3_l["default"][0, 0] = bad
        weight_before = layer.base_layer.weight.detach().clone()
        with pytest.raises(ValueError, match="NaN or inf"):
            model.merge_adapter(safe_merge=True)
        assert torch.equal(layer.base_layer.weight, weight_before)  # nothing merged into it
        with pytest.raises(ValueError, match="NaN or inf"):
            model.merge_and_unload(safe_merge=True)
    # finite adapters merge safely
    model = _wrap("llama", method)
    inputs = make_inputs("llama")
    expected = output_of(model, inputs)
    _close(output_of(model.merge_and_unload(safe_merge=True), inputs), expected, tol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_unload_restores_base(kind, method):
    base = make_model(kind)
    inputs = make_inputs(kind)
    expected = output_of(base, inputs)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    model = _wrap(kind, method)
    unloaded = model.unload()
    assert type(unloaded) is type(base)
    assert not _adapter_modules(unloaded)
    assert sorted(unloaded.state_dict()) == sorted(base_sd)
    for k, v in unloaded.state_dict().items():
        assert torch.equal(v, base_sd[k]), k
    _close(output_of(unloaded, inputs), expected)
    # the unloaded model can be wrapped again
    get_peft_model(unloaded, _config(peft_fast, method, kind))


# -- several adapters ----------------------------------------------------------------------------
def _add_other(model, kind, method, seed=77):
    torch.manual_seed(seed)
    model.add_adapter("other", _config(peft_fast, method, kind))


def _trainable_adapter_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _of(name, adapter):
    """Whether a parameter name belongs to this adapter (`....default.weight` or `ia3_l.default`)."""
    return f".{adapter}." in f"{name}."


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_two_adapters_and_set_adapter(kind, method):
    model = _wrap(kind, method)
    inputs = make_inputs(kind)
    first = output_of(model, inputs)
    _add_other(model, kind, method)
    assert model.active_adapter == "default"
    _close(output_of(model, inputs), first)  # adding does not activate
    assert not any(_of(n, "other") for n in _trainable_adapter_names(model))

    model.set_adapter("other")
    assert model.active_adapter == "other" and model.active_adapters == ["other"]
    second = output_of(model, inputs)
    assert not torch.allclose(first, second, atol=1e-4)
    trainable = _trainable_adapter_names(model)
    assert trainable and all(_of(n, "other") for n in trainable)
    adapter_params = {n for n, _ in model.named_parameters() if _of(n, "other") and _is_adapter_param(n)}
    assert trainable == adapter_params

    model.set_adapter("default")
    _close(output_of(model, inputs), first)
    trainable = _trainable_adapter_names(model)
    assert trainable and all(_of(n, "default") for n in trainable)

    # switching a merged model unmerges first
    model.merge_adapter()
    model.set_adapter("other")
    assert not any(m.merged for m in model.base_model.adapter_layers())
    _close(output_of(model, inputs), second, tol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_delete_adapter(kind, method):
    model = _wrap(kind, method)
    inputs = make_inputs(kind)
    first = output_of(model, inputs)
    keys_before = set(model.state_dict())
    _add_other(model, kind, method)
    assert any(_of(k, "other") for k in model.state_dict())
    model.delete_adapter("other")
    assert set(model.state_dict()) == keys_before
    assert list(model.peft_config) == ["default"]
    for m in _adapter_modules(model):
        containers = (
            [m.modules_to_save]
            if isinstance(m, ModulesToSaveWrapper)
            else [getattr(m, a) for a in m.adapter_layer_names + m.other_param_names]
        )
        for c in containers:
            assert "other" not in c
        if isinstance(m, LoraLayer):
            assert "other" not in m.lora_embedding_A and "other" not in m.lora_embedding_B
    _close(output_of(model, inputs), first)

    # deleting the active adapter makes the remaining one active (HF peft's rule), in every layer
    _add_other(model, kind, method)
    model.set_adapter("other")
    assert not torch.allclose(output_of(model, inputs), first, atol=1e-4)
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert all(m.active_adapters == ["default"] for m in _adapter_modules(model))
    assert not any(_of(k, "other") for k in model.state_dict())
    trainable = _trainable_adapter_names(model)
    assert trainable and all(_of(n, "default") for n in trainable)
    _close(output_of(model, inputs), first)

    # deleting an inactive adapter leaves the active one as it was
    _add_other(model, kind, method)
    model.set_adapter("other")
    other = output_of(model, inputs)
    model.delete_adapter("default")
    assert model.active_adapter == "other" and list(model.peft_config) == ["other"]
    assert not any(_of(k, "default") for k in model.state_dict())
    _close(output_of(model, inputs), other)
    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")


# -- mixed-adapter batches -----------------------------------------------------------------------
MIXED_NAMES = ["default", "__base__", "other", "default"]


def _mixed_model(kind):
    model = _wrap(kind, "lora")
    torch.manual_seed(77)
    model.add_adapter("other", LoraConfig(task_type=TASKS[kind], r=2, lora_alpha=3, init_lora_weights=False))
    return model


def _rows(inputs, rows):
    return {k: v[rows] for k, v in inputs.items()}


def _per_adapter_logits(model, inputs, names, **kw):
    """Logits of each row computed with its adapter alone (a run per adapter)."""
    out = None
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == "__base__":
            with model.disable_adapter():
                logits = model(**_rows(inputs, rows), **kw).logits
        else:
            model.set_adapter(name)
            logits = model(**_rows(inputs, rows), **kw).logits
        if out is None:
            out = logits.new_zeros((len(names),) + logits.shape[1:])
        out = out.index_copy(0, torch.tensor(rows), logits)
    model.set_adapter("default")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_eval(kind):
    model = _mixed_model(kind).eval()
    inputs = make_inputs(kind, batch=len(MIXED_NAMES))
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=MIXED_NAMES).logits
        expected = _per_adapter_logits(model, inputs, MIXED_NAMES)
    _close(mixed, expected)
    # the mixed batch left no state behind
    assert all(m._mixed_batch is None for m in _adapter_modules(model))
    _close(output_of(model, inputs), _per_adapter_logits(model, inputs, ["default"] * len(MIXED_NAMES)))


def _no_dropout(model):
    """Turn off the base model's dropout (modules, and float rates such as T5Attention.dropout)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr, value in list(vars(m).items()):
            if "dropout" in attr and isinstance(value, float):
                setattr(m, attr, 0.0)


def _train_all_adapters(model):
    for n, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(n))


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_training_with_gradients(kind):
    model = _mixed_model(kind).train()
    _no_dropout(model)
    inputs = make_inputs(kind, batch=len(MIXED_NAMES))
    _train_all_adapters(model)
    mixed = model(**inputs, adapter_names=MIXED_NAMES).logits
    _loss(mixed).backward()
    mixed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # the same rows, one adapter at a time; gradients accumulate over the runs
    weights = torch.randn(mixed.shape, generator=torch.Generator().manual_seed(7))
    for name in dict.fromkeys(MIXED_NAMES):
        rows = [i for i, n in enumerate(MIXED_NAMES) if n == name]
        if name == "__base__":
            with model.disable_adapter():
                logits = model(**_rows(inputs, rows)).logits
        else:
            model.set_adapter(name)
            _train_all_adapters(model)
            logits = model(**_rows(inputs, rows)).logits
            (logits.float() * weights[rows]).sum().backward()
        _close(mixed[rows].detach(), logits.detach())
    expected_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(mixed_grads) == sorted(expected_grads)
    assert any(_of(n, "other") for n in mixed_grads) and any(_of(n, "default") for n in mixed_grads)
    for n, g in expected_grads.items():
        _close(mixed_grads[n], g, tol=1e-4)


def test_mixed_batch_with_embedding_lora():
    model = get_peft_model(
        make_model("llama"), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    ).eval()
    torch.manual_seed(3)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    inputs = make_inputs("llama", batch=len(MIXED_NAMES))
    with torch.no_grad():
        _close(model(**inputs, adapter_names=MIXED_NAMES).logits, _per_adapter_logits(model, inputs, MIXED_NAMES))


def test_mixed_batch_errors():
    model = _mixed_model("llama").eval()
    inputs = make_inputs("llama", batch=4)
    with pytest.raises(ValueError, match="adapter_names"):
        model(**inputs, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="typo"):
        model(**inputs, adapter_names=["default", "typo", "other", "default"])
    with pytest.raises(TypeError, match="adapter_names"):
        model(**inputs, adapter_names="default")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(**inputs, adapter_names=MIXED_NAMES)
    assert all(m._mixed_batch is None for m in _adapter_modules(model))
    model.unmerge_adapter()
    model(**inputs, adapter_names=MIXED_NAMES)


def test_mixed_batch_refused_for_ia3():
    model = _wrap("llama", "ia3")
    with pytest.raises(ValueError, match="adapter_names"):
        model(**make_inputs("llama", batch=2), adapter_names=["default", "__base__"])


# -- low precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_forward(kind, method, dtype):
    torch.manual_seed(0)
    model = get_peft_model(make_model(kind).to(dtype), _config(peft_fast, method, kind)).eval()
    adapter = [p for n, p in model.named_parameters() if "lora_" in n or "ia3_" in n]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    # trained heads keep the base dtype, as in HF peft (their input has it)
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "modules_to_save" in n)
    out = output_of(model, make_inputs(kind))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_autocast_adapter_dtype(method):
    base = make_model("llama").to(torch.bfloat16)
    model = get_peft_model(base, _config(peft_fast, method, "llama"), autocast_adapter_dtype=False)
    adapter = [p for n, p in model.named_parameters() if "lora_" in n or "ia3_" in n]
    assert adapter and all(p.dtype == torch.bfloat16 for p in adapter)
    assert torch.isfinite(output_of(model, make_inputs("llama"))).all()
    # add_adapter follows its own flag
    model.add_adapter("fp32", _config(peft_fast, method, "llama"))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if _of(n, "fp32"))
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "base_layer" in n)


# -- the meta device -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_meta_device_base_model(kind, method, tmp_path):
    real = _wrap(kind, method)
    inputs = make_inputs(kind)
    expected = output_of(real, inputs)
    with torch.device("meta"):
        base = make_model(kind)
    assert all(p.is_meta for p in base.parameters())
    model = get_peft_model(base, _config(peft_fast, method, kind))
    assert type(model) is type(real)
    adapter = {n: p for n, p in model.named_parameters() if "lora_" in n or "ia3_" in n}
    assert adapter and all(p.is_meta for p in adapter.values())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert _trainable_adapter_names(model) == _trainable_adapter_names(real)
    assert model.get_nb_trainable_parameters() == real.get_nb_trainable_parameters()
    with pytest.raises(ValueError, match="meta"):
        model.merge_adapter()
    # materialize, then load every weight and buffer
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    real_buffers = dict(real.named_buffers())
    for name, buf in model.named_buffers():
        buf.copy_(real_buffers[name])
    model.eval()
    _close(output_of(model, inputs), expected)

    # an adapter file loaded onto a meta base model with low_cpu_mem_usage=True: real adapter weights
    real.save_pretrained(tmp_path)
    with torch.device("meta"):
        base = make_model(kind)
    loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    real_sd = real.state_dict()
    for k, v in loaded.state_dict().items():
        if "lora_" in k or "ia3_" in k:
            assert not v.is_meta and torch.equal(v, real_sd[k]), k
        else:
            assert v.is_meta, k


# -- state dicts in HF peft's format ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_model_state_dict_roundtrip(kind, method):
    ours = _wrap(kind, method)
    torch.manual_seed(123)
    theirs = peft.get_peft_model(make_model(kind), _config(peft, method, kind)).eval()
    sd = get_peft_model_state_dict(ours)
    assert set(sd) == set(peft.get_peft_model_state_dict(theirs))
    assert not any(_of(k, "default") for k in sd)
    inputs = make_inputs(kind)

    fresh = _wrap(kind, method, seed=5)
    assert not torch.allclose(output_of(fresh, inputs), output_of(ours, inputs), atol=1e-4)
    result = set_peft_model_state_dict(fresh, sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _close(output_of(fresh, inputs), output_of(ours, inputs))

    # under another adapter name the file keys are the same
    named = _wrap(kind, method, adapter_name="other")
    assert set(get_peft_model_state_dict(named, adapter_name="other")) == set(sd)
    # HF peft's state dict loads into peft_fast and computes the same
    set_peft_model_state_dict(named, peft.get_peft_model_state_dict(theirs), adapter_name="other")
    _close(output_of(named, inputs), output_of(theirs, inputs))


# -- parameter counts ---------------------------------------------------------------------------
def test_print_trainable_parameters_gpt2_small(capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        base = GPT2LMHeadModel(GPT2Config())
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(base, config)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)], [str(w.message) for w in caught]
    assert config.fan_in_fan_out is True  # set for Conv1D, as HF peft does
    capsys.readouterr()
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364\n"
    assert model.get_nb_trainable_parameters() == (294_912, 124_734_720)


# -- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate(kind, num_beams):
    model = _mixed_model(kind).eval()
    expected_cls = peft_fast.PeftModelForSeq2SeqLM if kind == "t5" else peft_fast.PeftModelForCausalLM
    assert type(model) is expected_cls
    inputs = make_inputs(kind, batch=3)
    inputs.pop("decoder_input_ids", None)
    gen = {"max_new_tokens": 4, "do_sample": False, "num_beams": num_beams, "pad_token_id": 0}

    def generate(m, rows=None, **kw):
        inp = inputs if rows is None else _rows(inputs, rows)
        return m.generate(**inp, **gen, **kw)

    out = generate(model)
    assert out.shape[0] == 3
    names = ["other", "__base__", "default"]
    mixed = generate(model, adapter_names=names)
    assert mixed.shape == out.shape
    torch.testing.assert_close(mixed[2:], out[2:])  # "default" rows as with the active adapter
    model.set_adapter("other")
    torch.testing.assert_close(mixed[0:1], generate(model, rows=[0]))
    model.set_adapter("default")
    with model.disable_adapter():
        torch.testing.assert_close(mixed[1:2], generate(model, rows=[1]))


# -- task wrappers ------------------------------------------------------------------------------
def _bert_head(cls_name, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        **kw,
    )
    return getattr(transformers, cls_name)(cfg).eval()


def _llama_seq_cls():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            num_labels=3,
            pad_token_id=0,
        )
    ).eval()


TASK_CASES = {
    "CAUSAL_LM": (lambda: make_model("llama"), peft_fast.PeftModelForCausalLM, None),
    "SEQ_2_SEQ_LM": (lambda: make_model("t5"), peft_fast.PeftModelForSeq2SeqLM, None),
    "SEQ_CLS": (
        lambda: _bert_head("BertForSequenceClassification", num_labels=3),
        peft_fast.PeftModelForSequenceClassification,
        "classifier",
    ),
    "SEQ_CLS_llama": (_llama_seq_cls, peft_fast.PeftModelForSequenceClassification, "score"),
    "TOKEN_CLS": (
        lambda: _bert_head("BertForTokenClassification", num_labels=5),
        peft_fast.PeftModelForTokenClassification,
        "classifier",
    ),
    "QUESTION_ANS": (
        lambda: _bert_head("BertForQuestionAnswering"),
        peft_fast.PeftModelForQuestionAnswering,
        "qa_outputs",
    ),
    "FEATURE_EXTRACTION": (lambda: _bert_head("BertModel"), peft_fast.PeftModelForFeatureExtraction, None),
    None: (lambda: make_model("llama"), PeftModel, None),
}


def _first_output(out):
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "start_logits"):
        return torch.cat([out.start_logits, out.end_logits], -1)
    return out.last_hidden_state


@pytest.mark.parametrize("case", list(TASK_CASES), ids=str)
def test_task_wrappers(case, tmp_path):
    build, expected_cls, head = TASK_CASES[case]
    task = case.split("_llama")[0] if case else None
    config = LoraConfig(
        task_type=task, r=4, target_modules=["q_proj", "v_proj", "query", "value", "q", "v"], init_lora_weights=False
    )
    model = get_peft_model(build(), config)
    assert type(model) is expected_cls
    hf_config = peft.LoraConfig(task_type=task, r=4, target_modules=["q_proj", "v_proj", "query", "value", "q", "v"])
    hf_model = peft.get_peft_model(build(), hf_config)
    mts = model.peft_config["default"].modules_to_save
    hf_mts = hf_model.peft_config["default"].modules_to_save
    assert set(mts or ()) == set(hf_mts or ())
    inputs = make_inputs("t5" if case == "SEQ_2_SEQ_LM" else "bert")
    if head is None:
        assert not any(isinstance(m, ModulesToSaveWrapper) for m in model.modules())
        return
    assert head in mts
    wrapper = model.get_base_model().get_submodule(head)
    assert isinstance(wrapper, ModulesToSaveWrapper)
    before = {n: p.detach().clone() for n, p in wrapper.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        _first_output(model(**inputs)).float().pow(2).mean().backward()
        opt.step()
    for n, p in wrapper.named_parameters():
        if n.startswith("modules_to_save.default."):
            assert p.requires_grad and not torch.equal(p, before[n]), n
        else:
            assert not p.requires_grad and torch.equal(p, before[n]), n
    # the head is saved and loaded with the adapter
    model.eval()
    sd = get_peft_model_state_dict(model)
    assert any(k.endswith(f"{head}.weight") for k in sd)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    assert type(loaded) is expected_cls
    with torch.no_grad():
        _close(_first_output(loaded(**inputs)), _first_output(model(**inputs)))


# -- LoraConfig options, compared with HF peft --------------------------------------------------
def _lora_layers(model, lib):
    layer_cls = peft.tuners.lora.LoraLayer if lib is peft else LoraLayer
    prefix = "base_model.model."
    return {
        n[len(prefix) :]: (dict(m.r), {k: round(float(v), 6) for k, v in m.scaling.items()})
        for n, m in model.named_modules()
        if isinstance(m, layer_cls)
    }


def _both(kind, method="lora", **kw):
    out = []
    for lib in (peft_fast, peft):
        torch.manual_seed(0)
        cls = lib.LoraConfig if method == "lora" else lib.IA3Config
        out.append(lib.get_peft_model(make_model(kind), cls(task_type=TASKS[kind], **copy.deepcopy(kw))))
    return out


LORA_OPTION_CASES = {
    "list": ("llama", {"target_modules": ["q_proj", "o_proj"]}),
    "regex": ("llama", {"target_modules": r".*\.layers\.1\.self_attn\.(q|k)_proj"}),
    "all_linear_llama": ("llama", {"target_modules": "all-linear"}),
    "all_linear_gpt2": ("gpt2", {"target_modules": "all-linear"}),
    "all_linear_bert": ("bert", {"target_modules": "all-linear"}),
    "all_linear_t5": ("t5", {"target_modules": "all-linear"}),
    "exclude_list": ("llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj", "k_proj"]}),
    "exclude_regex": ("llama", {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*layers\.0\..*"}),
    "layers_pattern": (
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    "layers_int": ("llama", {"target_modules": ["q_proj"], "layers_to_transform": 0}),
    "layers_gpt2": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1]}),
    "layers_bert": (
        "bert",
        {"target_modules": ["query", "dense"], "layers_to_transform": [0], "layers_pattern": "layer"},
    ),
    "regex_bert": ("bert", {"target_modules": r".*encoder\.layer\.\d\.(attention\.self\.key|output\.dense)"}),
    "patterns": (
        "llama",
        {
            "target_modules": ["q_proj", "v_proj"],
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 3},
        },
    ),
    "rslora": ("llama", {"target_modules": ["q_proj"], "r": 4, "lora_alpha": 6, "use_rslora": True}),
    "embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "default_llama": ("llama", {}),
    "default_gpt2": ("gpt2", {}),
    "default_opt": ("opt", {}),
    "default_bert": ("bert", {}),
    "default_t5": ("t5", {}),
}


@pytest.mark.parametrize("case", list(LORA_OPTION_CASES))
def test_lora_targets_match_hf_peft(case):
    kind, kw = LORA_OPTION_CASES[case]
    ours, theirs = _both(kind, **kw)
    layers = _lora_layers(ours, peft_fast)
    assert layers and layers == _lora_layers(theirs, peft)
    if case.startswith("all_linear"):
        assert not any(n.endswith(("lm_head", "classifier")) for n in layers)
    if case == "rslora":
        assert {s["default"] for _, s in layers.values()} == {round(6 / 4**0.5, 6)}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


IA3_OPTION_CASES = {
    **{f"default_{kind}": (kind, {}) for kind in ["llama", "gpt2", "opt", "bert", "t5"]},
    # feedforward_modules left unset: the model type's default, as in HF peft
    "targets_only": ("llama", {"target_modules": ["k_proj", "down_proj"]}),
    "targets_and_ff": ("gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}),
    "regex_ff": ("llama", {"target_modules": r".*\.(v_proj|up_proj)", "feedforward_modules": r".*\.up_proj"}),
}


@pytest.mark.parametrize("case", list(IA3_OPTION_CASES))
def test_ia3_targets_match_hf_peft(case):
    kind, kw = IA3_OPTION_CASES[case]
    ours, theirs = _both(kind, method="ia3", **kw)
    hf_layer = peft.tuners.ia3.IA3Layer
    prefix = "base_model.model."
    ours_layers = {n[len(prefix) :]: m.is_feedforward for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    theirs_layers = {n[len(prefix) :]: m.is_feedforward for n, m in theirs.named_modules() if isinstance(m, hf_layer)}
    assert ours_layers and ours_layers == theirs_layers
    assert any(ours_layers.values()) and not all(ours_layers.values())


def test_init_lora_weights_options():
    inputs = make_inputs("llama")
    base = output_of(make_model("llama"), inputs)
    for init in (True, "gaussian", False):
        torch.manual_seed(0)
        model = get_peft_model(
            make_model("llama"),
            LoraConfig(r=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=init),
        ).eval()
        linear = [m for m in model.modules() if isinstance(m, LoraLayer) and m.lora_A]
        emb = [m for m in model.modules() if isinstance(m, LoraLayer) and m.lora_embedding_A]
        assert linear and emb
        A = torch.cat([m.lora_A["default"].weight.flatten() for m in linear])
        B = torch.cat([m.lora_B["default"].weight.flatten() for m in linear])
        if init is False:
            assert (B != 0).any() and (emb[0].lora_embedding_A["default"] != 0).any()
            assert not torch.allclose(output_of(model, inputs), base, atol=1e-4)
        else:
            assert (B == 0).all() and (A != 0).all()
            assert (emb[0].lora_embedding_A["default"] == 0).all() and (emb[0].lora_embedding_B["default"] != 0).all()
            _close(output_of(model, inputs), base)
        if init == "gaussian":
            assert abs(A.std().item() - 1 / 8) < 0.02


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_lora_bias_trainable_and_saved(bias, tmp_path):
    ours, theirs = _both("gpt2", target_modules=["c_attn"], bias=bias, init_lora_weights=False)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith("bias")}
    assert biases
    if bias == "lora_only":
        assert all(".c_attn.base_layer.bias" in n for n in biases)
    else:
        assert any(".mlp.c_fc.bias" in n for n in biases)
    # train a step: biases change, and are saved with the adapter
    ours.train()
    _no_dropout(ours)
    inputs = make_inputs("gpt2")
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    _loss(ours(**inputs).logits).backward()
    opt.step()
    for n in biases:
        assert not torch.equal(dict(ours.named_parameters())[n], before[n]), n
    sd = get_peft_model_state_dict(ours)
    assert {n.replace("base_model.model.", "", 1) for n in biases} <= {
        k.replace("base_model.model.", "", 1) for k in sd
    }
    ours.eval()
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    _close(output_of(loaded, inputs), output_of(ours, inputs))
