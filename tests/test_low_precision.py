"""fp16 and bf16 models checked by value, not only by dtype and finiteness.

One adapter file (written by HF peft, random non-zero weights) is loaded into HF peft and into
peft_fast on fp32, fp16 and bf16 copies of the same base model, and into HF peft in float64
(the oracle). The 2x rule (flash-attention's): peft_fast's relative error against the float64
oracle stays within twice HF peft's in the same dtype (HF peft is the unfused torch path); and
both are far smaller than the adapter's own effect, so a lost or mis-scaled adapter shows.
Covered: LoRA and IA³ on the torch backend, LoRA on the Triton backend in fp16 (interpreter on
CPU), several active adapters, Embedding LoRA merged into low-precision weights, and
HF peft models patched with `patch_peft`.
"""

from __future__ import annotations

from unittest import mock

import peft
import pytest
import torch
from conftest import TASKS, make_inputs, make_model, output_of

import peft_fast
import peft_fast.patch
from peft_fast.ops import dispatch

LOW = [torch.float16, torch.bfloat16]
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def _hf_config(method, kind, **kw):
    if method == "lora":
        return peft.LoraConfig(**{"task_type": TASKS[kind], "r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})
    return peft.IA3Config(task_type=TASKS[kind], init_ia3_weights=False, **kw)


def _strengthen(model):
    """Adapters whose effect on the logits is well above bf16 rounding (tiny BERT's logits are small)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(3)
            elif "ia3_l" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{(method, kind, variant): folder} of HF peft adapter files, written on first use."""
    folders = {}

    def get(method, kind, variant="plain"):
        key = (method, kind, variant)
        if key not in folders:
            folder = tmp_path_factory.mktemp(f"{method}-{kind}-{variant}")
            extra = {"target_modules": ["q_proj", "v_proj", EMBEDDING[kind]]} if variant == "embedding" else {}
            torch.manual_seed(123)
            model = peft.get_peft_model(make_model(kind), _hf_config(method, kind, **extra))
            if variant == "two":
                model.add_adapter("other", _hf_config(method, kind, r=2, lora_alpha=3))
            _strengthen(model)
            model.save_pretrained(folder)
            folders[key] = folder
        return folders[key]

    return get


def _load(lib, kind, folder, dtype, two=False):
    base = make_model(kind)
    base = base.double() if dtype == torch.float64 else base.to(dtype)
    model = lib.PeftModel.from_pretrained(base, folder)
    if two:
        model.load_adapter(folder / "other", adapter_name="other")
        model.base_model.set_adapter(["default", "other"])
    if dtype == torch.float64:
        model = model.double()  # the adapters too: the oracle is float64 throughout
    return model.eval()


def _check_two_x(ours, hf, oracle, base_low, fp32_ours, fp32_hf):
    """The 2x rule against the float64 oracle and against fp32, and a visible adapter."""
    err_ours, err_hf = _rel_err(ours, oracle), _rel_err(hf, oracle)
    assert err_ours <= 2 * err_hf + 1e-6, f"ours {err_ours:.3g} > 2 x HF peft's {err_hf:.3g}"
    err_ours32, err_hf32 = _rel_err(ours, fp32_ours), _rel_err(hf, fp32_hf)
    assert err_ours32 <= 2 * err_hf32 + 1e-6, f"vs fp32: ours {err_ours32:.3g} > 2 x HF peft's {err_hf32:.3g}"
    assert _rel_err(fp32_ours, oracle) < 1e-5
    # the base model alone in this dtype (a lost or zero-scaled adapter) fails the 2x rule by a margin
    assert _rel_err(base_low, oracle) > 2.5 * err_hf + 1e-4


_CACHE: dict[tuple, torch.Tensor] = {}


def _output(lib, kind, folder, dtype, inputs, backend="torch", two=False):
    """Logits of `lib`'s model (base None: the bare base model) in dtype; fp32/fp64 ones cached
    across the dtype parametrization (inputs are identified by their shape: make_inputs is seeded)."""
    key = (lib.__name__ if lib else None, kind, str(folder), dtype, backend, two, tuple(inputs["input_ids"].shape))
    if key not in _CACHE:
        with peft_fast.use_backend(backend):
            model = make_model(kind).to(dtype) if lib is None else _load(lib, kind, folder, dtype, two)
            _CACHE[key] = output_of(model, inputs)
    return _CACHE[key]


def _outputs(kind, folder, dtype, inputs, backend="torch", two=False):
    oracle = _output(peft, kind, folder, torch.float64, inputs, two=two)
    base_low = _output(None, kind, folder, dtype, inputs)
    fp32_hf = _output(peft, kind, folder, torch.float32, inputs, two=two)
    hf = _output(peft, kind, folder, dtype, inputs, two=two)
    fp32_ours = _output(peft_fast, kind, folder, torch.float32, inputs, backend, two)
    with peft_fast.use_backend(backend):
        ours = output_of(_load(peft_fast, kind, folder, dtype, two), inputs)
    assert ours.dtype == hf.dtype == dtype
    return ours, hf, oracle, base_low, fp32_ours, fp32_hf


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind, method", [("llama", "lora"), ("gpt2", "lora"), ("bert", "lora"), ("bert", "ia3")])
def test_low_precision_outputs_within_twice_hf_peft_error(kind, method, dtype, adapters):
    inputs = make_inputs(kind)
    _check_two_x(*_outputs(kind, adapters(method, kind), dtype, inputs))


@pytest.mark.parametrize("dtype", LOW)
def test_several_active_adapters_in_low_precision(dtype, adapters):
    inputs = make_inputs("llama")
    outs = _outputs("llama", adapters("lora", "llama", "two"), dtype, inputs, two=True)
    _check_two_x(*outs)
    # both adapters count: the oracle differs from the default adapter alone
    single = _output(peft, "llama", adapters("lora", "llama", "two"), torch.float64, inputs)
    assert _rel_err(single, outs[2]) > 2.5 * _rel_err(outs[1], outs[2]) + 1e-4


@pytest.mark.parametrize("dtype", LOW)
def test_embedding_lora_merged_into_low_precision_weights(dtype, adapters):
    """merge_adapter (LoraEmbedding.delta_weight included) on fp16/bf16 weights: as HF peft's merge."""
    inputs = make_inputs("llama")
    folder = adapters("lora", "llama", "embedding")
    oracle = _output(peft, "llama", folder, torch.float64, inputs)
    hf, ours = _load(peft, "llama", folder, dtype), _load(peft_fast, "llama", folder, dtype)
    emb_hf, emb_ours = hf.base_model.model.model.embed_tokens, ours.base_model.model.model.embed_tokens
    torch.testing.assert_close(
        emb_ours.delta_weight("default"), emb_hf.get_delta_weight("default"), rtol=1e-6, atol=1e-7
    )
    unmerged = output_of(ours, inputs)
    for model in (hf, ours):
        model.merge_adapter()
    assert emb_ours.merged and emb_ours.base_layer.weight.dtype == dtype
    merged_hf, merged_ours = output_of(hf, inputs), output_of(ours, inputs)
    err_ours, err_hf = _rel_err(merged_ours, oracle), _rel_err(merged_hf, oracle)
    assert err_ours <= 2 * err_hf + 1e-6, (err_ours, err_hf)
    assert _rel_err(unmerged, oracle) <= 2 * err_hf + 1e-3  # merged and unmerged agree to rounding
    # unmerging restores the base rows up to the rounding HF peft's unmerge leaves too
    for model in (hf, ours):
        model.unmerge_adapter()
    base_rows = make_model("llama").model.embed_tokens.weight.double()
    err_ours = _rel_err(emb_ours.base_layer.weight, base_rows)
    assert not emb_ours.merged and err_ours <= 2 * _rel_err(emb_hf.base_layer.weight, base_rows) + 1e-6


def _spy_backends():
    """Records the module of every implementation dispatch.select hands out."""
    used = []
    real = dispatch.select

    def select(op, *args, **kwargs):
        fn = real(op, *args, **kwargs)
        used.append((op, fn.__module__))
        return fn

    return used, mock.patch.object(dispatch, "select", select)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_triton_fp16_model_within_twice_hf_peft_error(kind, adapters):
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    inputs = make_inputs(kind, batch=2, seq=5)
    used, spy = _spy_backends()
    with spy:
        outs = _outputs(kind, adapters("lora", kind), torch.float16, inputs, backend="triton")
    _check_two_x(*outs)
    lora_calls = [m for op, m in used if op == "lora_linear"]
    assert lora_calls and all(m == "peft_fast.ops.triton.lora" for m in lora_calls), set(lora_calls)


def _patched_case(dtype, fp32_adapters=False):
    torch.manual_seed(123)
    model = peft.get_peft_model(make_model("llama"), _hf_config("lora", "llama", lora_dropout=0.0)).to(dtype)
    if fp32_adapters:  # as HF peft's autocast_adapter_dtype leaves them on a low-precision base
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    return model


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits.float() * weights).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fp32_adapters", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_patch_peft_on_low_precision_models(dtype, fp32_adapters):
    """Patched fp16/bf16 HF peft models (adapters in the base dtype, or fp32 on a low-precision
    base): outputs and gradients within twice unpatched HF peft's error against the float64 model."""
    inputs = make_inputs("llama")
    want_logits, want_grads = _loss_and_grads(_patched_case(torch.float64), inputs)
    hf = _patched_case(dtype, fp32_adapters)
    adapter_dtype = hf.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype
    assert adapter_dtype == (torch.float32 if fp32_adapters else dtype)
    hf_logits, hf_grads = _loss_and_grads(hf, inputs)
    ours = _patched_case(dtype, fp32_adapters)
    peft_fast.patch_peft(ours)
    used, spy = _spy_backends()
    with spy:
        got_logits, got_grads = _loss_and_grads(ours, inputs)
    assert [op for op, _ in used].count("lora_linear") == len(peft_fast.patch.patched_layers(ours)) > 0
    assert got_logits.dtype == dtype
    assert _rel_err(got_logits, want_logits) <= 2 * _rel_err(hf_logits, want_logits) + 1e-6
    assert got_grads.keys() == hf_grads.keys() == want_grads.keys()
    for name in want_grads:
        err_ours, err_hf = _rel_err(got_grads[name], want_grads[name]), _rel_err(hf_grads[name], want_grads[name])
        assert err_ours <= 2 * err_hf + 1e-6, f"{name}: {err_ours:.3g} > 2 x {err_hf:.3g}"


def test_patch_peft_falls_back_where_input_dtype_casting_is_disabled():
    """patch.py's dtype fallbacks: an input whose dtype differs from the base weight's, or from
    the adapter's while HF peft's input casting is off, goes to HF peft's own forward."""
    from peft.helpers import disable_input_dtype_casting

    torch.manual_seed(123)
    hf = peft.get_peft_model(make_model("llama"), _hf_config("lora", "llama")).eval()
    ours = peft.get_peft_model(make_model("llama"), _hf_config("lora", "llama")).eval()
    ours.load_state_dict(hf.state_dict())
    peft_fast.patch_peft(ours)
    layer_hf = hf.base_model.model.model.layers[0].self_attn.q_proj
    layer_ours = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    # base weight fp16, adapters fp32, x fp16, casting off: HF peft's forward runs (and refuses)
    for layer in (layer_hf, layer_ours):
        layer.base_layer.to(torch.float16)
    with mock.patch.object(peft_fast.patch, "lora_linear") as spy:
        with disable_input_dtype_casting(hf), disable_input_dtype_casting(ours):
            with pytest.raises(RuntimeError) as want:
                layer_hf(x.half())
            with pytest.raises(RuntimeError) as got:
                layer_ours(x.half())
        assert type(got.value) is type(want.value)
        # x fp32 on an fp16 base weight: not the ops' case either
        with pytest.raises(RuntimeError):
            layer_hf(x)
        with pytest.raises(RuntimeError):
            layer_ours(x)
        assert spy.call_count == 0
        # with casting on, x fp16: the fast path, with HF peft's values
        with torch.no_grad():
            want_out = layer_hf(x.half())
    with torch.no_grad():
        got_out = layer_ours(x.half())
    assert got_out.dtype == want_out.dtype == torch.float16
    torch.testing.assert_close(got_out, want_out, rtol=1e-3, atol=1e-3)
