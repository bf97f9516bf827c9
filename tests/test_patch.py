"""peft_fast.patch_peft on tiny Llama / GPT-2 models built with HF peft (no downloads):
same loss and gradients as unpatched peft on the "torch" and "triton" backends, and peft's
own forward for everything the ops do not cover."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton reads this when kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from unittest import mock  # noqa: E402

import pytest  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import peft_fast  # noqa: E402
import peft_fast.patch  # noqa: E402
from peft_fast.ops import dispatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no RNG outside the adapters
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _lora_model(kind: str, dropout: float = 0.0, **kw):
    base = _llama() if kind == "llama" else _gpt2()
    targets = LLAMA_LORA_TARGETS if kind == "llama" else ["c_attn", "c_proj", "c_fc"]
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False,
        fan_in_fan_out=kind == "gpt2", **kw,
    )  # fmt: skip
    torch.manual_seed(1)
    return peft.get_peft_model(base, cfg).to(DEVICE)


def _ia3_model():
    cfg = peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    )
    torch.manual_seed(1)
    return peft.get_peft_model(_llama(), cfg).to(DEVICE)


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 7), generator=g).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


def _loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(**_batch(), **kw).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(a, b, rtol):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        err = ((ga[n] - gb[n]).norm() / gb[n].norm()).item()
        assert err < rtol, f"{n}: relative error {err:.3g}"


def _spy(name):
    """Count calls of the op patch.py routes through, keeping its behaviour."""
    return mock.patch.object(peft_fast.patch, name, wraps=getattr(peft_fast.patch, name))


def _triton_or_skip():
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_same_loss_and_grads_as_peft(kind, backend):
    if backend == "triton":
        _triton_or_skip()
    model = _lora_model(kind)
    want = _loss_and_grads(model)
    keys = list(model.state_dict())
    peft_fast.patch_peft(model)
    assert list(model.state_dict()) == keys
    n_layers = len(peft_fast.patch.patched_layers(model))
    assert n_layers == (14 if kind == "llama" else 8)  # GPT-2: c_attn, 2 x c_proj, c_fc
    with _spy("lora_linear") as spy, peft_fast.use_backend(backend):
        got = _loss_and_grads(model)
    assert spy.call_count == n_layers  # every layer took the fast path
    _assert_same(got, want, 1e-5 if backend == "triton" else 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ia3_same_loss_and_grads_as_peft(backend):
    if backend == "triton":
        _triton_or_skip()
    model = _ia3_model()
    want = _loss_and_grads(model)
    peft_fast.patch_peft(model)
    with _spy("ia3_linear") as spy, peft_fast.use_backend(backend):
        got = _loss_and_grads(model)
    assert spy.call_count == 6
    _assert_same(got, want, 1e-5)


def test_dropout_torch_backend_is_bitwise_peft():
    model = _lora_model("llama", dropout=0.2)
    model.train()
    torch.manual_seed(3)
    want = _loss_and_grads(model)
    peft_fast.patch_peft(model)
    with peft_fast.use_backend("torch"):
        torch.manual_seed(3)
        got = _loss_and_grads(model)
    _assert_same(got, want, 1e-6)


class _OracleDropout(torch.nn.Module):
    """Dropout with the kernels' rule from the independent Philox (tests/philox_oracle.py),
    drawing its seed from torch's generator as the ops do (one draw per call)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from philox_oracle import keep_mask

        if not self.training:
            return x
        seed = int(torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64))
        K = x.shape[-1]
        keep = torch.from_numpy(keep_mask(seed, x.numel() // K, K, self.p)).reshape(x.shape).to(x.device)
        return x * keep / (1 - self.p)


def test_triton_dropout_trains_like_peft_with_the_oracle_mask():
    """Training with dropout on the Triton kernels: loss and gradients equal unpatched HF peft's
    whose dropout modules draw the independent Philox oracle's masks from the same seeds; eval
    (no dropout) equals peft's eval forward."""
    _triton_or_skip()
    p = 0.2
    model = _lora_model("gpt2", dropout=p)
    oracle = _lora_model("gpt2", dropout=p)
    oracle.load_state_dict(model.state_dict())
    for m in oracle.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout["default"] = _OracleDropout(p)
    oracle.train()
    model.train()
    torch.manual_seed(3)
    want = _loss_and_grads(oracle)
    peft_fast.patch_peft(model)
    with _spy("lora_linear") as spy, peft_fast.use_backend("triton"):
        torch.manual_seed(3)
        got = _loss_and_grads(model)
        assert spy.call_count == len(peft_fast.patch.patched_layers(model))
        _assert_same(got, want, 1e-5)
        model.eval()
        oracle.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**_batch()).logits, oracle(**_batch()).logits, rtol=1e-5, atol=1e-5)


def test_falls_back_to_peft_where_ops_do_not_apply():
    model = _lora_model("llama")
    model.eval()
    base_model = model.base_model
    with torch.no_grad():
        plain = model(**_batch()).logits
        with model.disable_adapter():
            disabled = model(**_batch()).logits
    peft_fast.patch_peft(model)
    with _spy("lora_linear") as spy, torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(**_batch()).logits, disabled)
        base_model.merge_adapter()
        torch.testing.assert_close(model(**_batch()).logits, plain, rtol=1e-4, atol=1e-4)
        base_model.unmerge_adapter()
        mixed = model(**_batch(), adapter_names=["default", "__base__"]).logits
        torch.testing.assert_close(mixed[0], plain[0])
        torch.testing.assert_close(mixed[1], disabled[1])
    assert spy.call_count == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_layers_routed_with_hf_loss_and_grads(kind, dropout):
    model = _lora_model(kind, dropout=dropout, use_dora=True).train()
    torch.manual_seed(9)  # the same dropout masks on both runs
    want = _loss_and_grads(model)
    assert any("lora_magnitude_vector" in n for n in want[1])
    peft_fast.patch_peft(model)
    torch.manual_seed(9)
    with _spy("dora_linear") as dora_spy, _spy("lora_linear") as lora_spy:
        got = _loss_and_grads(model)
    assert dora_spy.call_count == len(peft_fast.patch.patched_layers(model)) and lora_spy.call_count == 0
    _assert_same(got, want, 1e-5)
    with _spy("dora_linear") as dora_spy, torch.no_grad():  # disabled: peft's own forward, the base output
        with model.disable_adapter():
            model(**_batch())
    assert dora_spy.call_count == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_embedding_layers_routed_with_hf_loss_and_grads(kind):
    """HF peft's DoRA Embedding (lora.Embedding + DoraEmbeddingVariant) through ops.dora_embedding:
    the loss and gradients of unpatched peft, eval outputs too; merged or disabled: peft's forward."""
    embedding = "embed_tokens" if kind == "llama" else "wte"
    model = _lora_model(kind, dropout=0.1, use_dora=True)
    model.add_adapter(
        "emb", peft.LoraConfig(r=4, lora_alpha=8, target_modules=[embedding], init_lora_weights=False, use_dora=True)
    )
    model.base_model.set_adapter("emb")
    model.train()
    want = _loss_and_grads(model)
    assert any("lora_magnitude_vector.emb" in n for n in want[1])
    model.eval()
    with torch.no_grad():
        want_eval = model(**_batch()).logits
    peft_fast.patch_peft(model)
    layer = next(m for n, m in model.named_modules() if n.endswith(embedding) and hasattr(m, "lora_embedding_A"))
    assert layer.__dict__.get("_peft_fast_patched")
    model.train()
    with _spy("dora_embedding") as spy:
        got = _loss_and_grads(model)
    assert spy.call_count == 1
    _assert_same(got, want, 1e-5)
    model.eval()
    with _spy("dora_embedding") as spy, torch.no_grad():
        torch.testing.assert_close(model(**_batch()).logits, want_eval, rtol=1e-5, atol=1e-6)
        with model.disable_adapter():
            model(**_batch())
        assert spy.call_count == 1
        model.merge_adapter()  # (GPT-2 ties wte to its head, so merged logits differ from unmerged ones)
        model(**_batch())
        assert spy.call_count == 1  # merged: peft's forward
        model.unmerge_adapter()
        layer._get_embed_scale = lambda: torch.tensor(2.0)  # a scaled embedding (Gemma3's): peft's forward
        model(**_batch())
        assert spy.call_count == 1


# -- several active adapters (HF peft's chain) ------------------------------------------------
# "dora,lora" means the active adapters, in activation order: a DoRA adapter ("default", r=4),
# then a plain LoRA one (r=2), each with its own dropout; HF applies them one after the other.
CHAIN_RANKS = (4, 2, 3)
CHAIN_DROPOUTS = (0.2, 0.1, 0.3)


def _chain_model(kind: str, chain: str, dropout: bool, **kw):
    """An HF peft model whose adapters `chain` ("dora,lora", ...) are all active, in that order."""
    kinds = chain.split(",")
    drops = CHAIN_DROPOUTS if dropout else (0.0,) * 3
    model = _lora_model(kind, dropout=drops[0], use_dora=kinds[0] == "dora", **kw)
    targets = LLAMA_LORA_TARGETS if kind == "llama" else ["c_attn", "c_proj", "c_fc"]
    names = ["default"]
    for i, k in enumerate(kinds[1:], 1):
        cfg = peft.LoraConfig(
            r=CHAIN_RANKS[i], lora_alpha=2 * CHAIN_RANKS[i] + i, lora_dropout=drops[i], target_modules=targets,
            init_lora_weights=False, fan_in_fan_out=kind == "gpt2", use_dora=k == "dora",
        )  # fmt: skip
        names.append(f"a{i}")
        model.add_adapter(names[-1], cfg)
    model.base_model.set_adapter(names)
    g = torch.Generator().manual_seed(4)
    for name, param in model.named_parameters():  # GPT-2 starts with zero biases: make them count
        if name.endswith("base_layer.bias"):
            param.data = torch.randn(param.shape, generator=g).to(param)
    return model.to(DEVICE)


def _chain_spies():
    return {op: _spy(op) for op in ("lora_linear", "dora_linear", "lora_add", "dora_add")}


def _chain_calls(chain: str, n_layers: int) -> dict[str, int]:
    """How often each op runs for one forward of the chain through `n_layers` patched layers."""
    first, *rest = chain.split(",")
    return {
        "lora_linear": n_layers * (first == "lora"),
        "dora_linear": n_layers * (first == "dora"),
        "lora_add": n_layers * rest.count("lora"),
        "dora_add": n_layers * rest.count("dora"),
    }


@pytest.mark.parametrize(
    "kind,chain",
    [("llama", "dora,lora"), ("llama", "lora,dora"), ("llama", "lora,lora"), ("gpt2", "dora,lora,dora"),
     ("llama", "lora,dora,lora")],
)  # fmt: skip
@pytest.mark.parametrize("dropout", [False, True])
def test_adapter_chains_routed_with_hf_loss_and_grads(kind, chain, dropout):
    """Several active adapters (DoRA and LoRA in any order) through the ops, one call each: the
    loss, gradients (magnitudes included) and eval outputs of unpatched HF peft, with the same
    dropout masks (torch backend, same seed)."""
    model = _chain_model(kind, chain, dropout).train()
    torch.manual_seed(9)
    want = _loss_and_grads(model)
    assert sum("lora_A" in n for n in want[1]) == len(chain.split(",")) * (28 if kind == "llama" else 16) // 2
    model.eval()
    with torch.no_grad():
        want_eval = model(**_batch()).logits
    peft_fast.patch_peft(model)
    calls = _chain_calls(chain, len(peft_fast.patch.patched_layers(model)))
    model.train()
    spies = _chain_spies()
    with peft_fast.use_backend("torch"), spies["lora_linear"] as ll, spies["dora_linear"] as dl:
        with spies["lora_add"] as la, spies["dora_add"] as da:
            torch.manual_seed(9)
            got = _loss_and_grads(model)
            counts = {"lora_linear": ll.call_count, "dora_linear": dl.call_count}
            counts |= {"lora_add": la.call_count, "dora_add": da.call_count}
            assert counts == calls  # every layer took the fast path, each adapter once
            model.eval()
            with torch.no_grad():
                torch.testing.assert_close(model(**_batch()).logits, want_eval, rtol=1e-5, atol=1e-5)
            assert la.call_count + da.call_count == 2 * (calls["lora_add"] + calls["dora_add"])
    _assert_same(got, want, 1e-5)


def test_chains_fall_back_where_hf_arithmetic_differs():
    """A chain whose adapters have different dtypes (HF casts x for each in turn and sums in the
    promoted dtype), a DoRA adapter whose Dropout module is in eval under a training layer (HF
    recomputes x·Wᵀ, the ops would not), and HF's opt-in DoRA caching in eval: peft's forward."""
    model = _chain_model("llama", "dora,lora", dropout=True)
    model.add_adapter("wide", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "a1", "wide"])
    for name, param in model.named_parameters():
        if ".wide." in name:
            param.data = param.data.double()
    model.train()
    torch.manual_seed(5)
    want = _loss_and_grads(model)
    peft_fast.patch_peft(model)
    spies = _chain_spies()
    with peft_fast.use_backend("torch"), spies["dora_linear"] as dl:
        torch.manual_seed(5)
        _assert_same(_loss_and_grads(model), want, 1e-5)
        assert dl.call_count == 12  # every layer but the two q_proj, which hold a float64 adapter
    model.base_model.set_adapter(["default", "a1"])
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    model.train()
    o_proj.lora_dropout["default"].eval()  # no mask drawn, yet HF's DoRA takes dropout(x)·Wᵀ
    with spies["dora_linear"] as dl, torch.no_grad():
        unpatched = peft_fast.unpatch_peft(model)
        torch.manual_seed(5)
        want_logits = unpatched(**_batch()).logits
        peft_fast.patch_peft(model)
        torch.manual_seed(5)
        torch.testing.assert_close(model(**_batch()).logits, want_logits, rtol=1e-5, atol=1e-6)
        assert dl.call_count == 13  # o_proj of layer 0: peft's forward
    from peft.helpers import DoraCaching

    model.eval()
    with spies["dora_linear"] as dl, torch.no_grad(), DoraCaching():
        model(**_batch())
        assert dl.call_count == 0
    with spies["dora_linear"] as dl, torch.no_grad():
        model(**_batch())
        assert dl.call_count == 14


def test_chain_over_a_bf16_base_with_fp32_adapters_falls_back():
    """HF peft keeps fp32 adapters over a bf16 base and sums a chain's updates in fp32, rounding
    once; the ops would round after each adapter: peft's forward runs, with its numbers."""
    model = _chain_model("llama", "lora,dora", dropout=False).to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # HF's autocast_adapter_dtype default
    model.eval()
    with torch.no_grad():
        want = model(**_batch()).logits
        peft_fast.patch_peft(model)
        spies = _chain_spies()
        with spies["lora_linear"] as ll, spies["dora_add"] as da:
            assert torch.equal(model(**_batch()).logits, want)
        assert ll.call_count == 0 and da.call_count == 0
        model.base_model.set_adapter("a1")  # one adapter: the fast path, within bf16 rounding
        want_single = peft_fast.unpatch_peft(model)(**_batch()).logits
        peft_fast.patch_peft(model)
        with spies["dora_linear"] as dl:
            torch.testing.assert_close(model(**_batch()).logits, want_single, rtol=2e-2, atol=2e-2)
        assert dl.call_count == 14


def test_save_pretrained_round_trip(tmp_path):
    model = _lora_model("gpt2")
    peft_fast.patch_peft(model)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_gpt2(), tmp_path).to(DEVICE)
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert list(saved) == list(reloaded)
    for name, tensor in saved.items():
        assert torch.equal(tensor, reloaded[name]), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_batch()).logits, model(**_batch()).logits)
    peft_fast.unpatch_peft(model)
    assert peft_fast.patch.patched_layers(model) == []


def test_bad_model_is_rejected():
    with pytest.raises(TypeError, match="model"):
        peft_fast.patch_peft("not a model")
    with pytest.raises(ValueError, match="no HF peft"):
        peft_fast.patch_peft(torch.nn.Linear(2, 2))
