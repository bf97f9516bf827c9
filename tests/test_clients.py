"""Real clients with a peft_fast model, exactly as with an HF peft model: TRL's SFTTrainer and
DPOTrainer, transformers' Trainer (gradient checkpointing) and accelerate's Accelerator.

The oracle is HF peft: the same script with `peft` and with `peft_fast`, same seeds, gives the
same losses on the torch backend, and the adapter-only checkpoints load in both libraries.
Tiny Llama, a character-level tokenizer built here, a few steps each (no downloads)."""

from __future__ import annotations

import inspect
import os
import string
from contextlib import contextmanager
from unittest import mock

import peft
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import is_peft_model
from conftest import make_model
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments
from transformers.trainer_utils import _is_peft_model, unwrap_peft_model
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.utils import use_adapter

import peft_fast
from peft_fast.hf_identity import hidden_hf_members
from peft_fast.ops import dispatch

LIBS = {"peft": peft, "peft_fast": peft_fast}
TARGETS = ["q_proj", "v_proj"]
SFT_TEXTS = ["hello world", "the cat sat.", "a dog ran far", "hi there, friend", "no more", "yes, we can"]
DPO_ROWS = {
    "prompt": ["the sky is", "cats say", "one two", "good"],
    "chosen": [" blue", " meow", " three", " day"],
    "rejected": [" green", " woof", " five", " grief"],
}


def _tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids below the tiny Llama's vocabulary of 97)."""
    chars = string.ascii_lowercase + " .,!?"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _lora(lib: str, **kw) -> torch.nn.Module:
    """The same tiny Llama with the same LoRA adapter, built by `lib` ("peft" or "peft_fast")."""
    m = LIBS[lib]
    config = m.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, **kw)
    return m.get_peft_model(make_model("llama"), config)


def _common_args(out, steps: int) -> dict:
    return dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        bf16=False,  # TRL defaults to bf16 autocast; fp32 compares exactly (and the Triton interpreter needs it)
    )


def _losses(trainer: Trainer) -> torch.Tensor:
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def _triton_or_skip() -> None:
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(reason)


@contextmanager
def _backend(name: str):
    """Run under `name`; for "triton", count the LoRA calls that reached the Triton kernels
    (the interpreter on CPU) and check at the end that some did."""
    if name == "torch":
        with peft_fast.use_backend("torch"):
            yield
        return
    _triton_or_skip()
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these runs train on CPU: CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1")
    impl = dispatch._IMPLS["lora_linear"]["triton"]
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return impl.fn(*args, **kwargs)

    with mock.patch.dict(dispatch._IMPLS["lora_linear"], {"triton": dispatch.Impl(counted, impl.supports)}):
        with peft_fast.use_backend("triton"):
            yield
    assert calls, "no LoRA call reached the Triton kernels"


def _same_losses(got: torch.Tensor, want: torch.Tensor, backend: str) -> None:
    # torch: the same math in the same order as HF peft; triton: fp32 kernels, another summation order.
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "torch" else dict(rtol=1e-4, atol=1e-5)
    assert len(got) == len(want) > 0
    torch.testing.assert_close(got, want, **tol)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 34, (2, 9), generator=torch.Generator().manual_seed(5))


def _check_adapter_checkpoint(folder, trained: torch.nn.Module) -> None:
    """An adapter-only checkpoint (no full weights), loaded by both libraries into a fresh base
    model, gives the trained model's logits."""
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    want = _logits(trained, IDS)
    for m in (peft, peft_fast):
        loaded = m.PeftModel.from_pretrained(make_model("llama"), folder)
        torch.testing.assert_close(_logits(loaded, IDS), want, rtol=1e-5, atol=1e-5)


# -- the object model clients touch -------------------------------------------------------------
# What TRL 1.16, transformers 5.24's Trainer and accelerate 1.15 call on a PEFT model, its
# `base_model` tuner and its layers (found by reading their PEFT code paths), each checked
# against HF peft's answer on the same model.


def _run_both(fn):
    return fn(_lora("peft")), fn(_lora("peft_fast"))


def _same_tensor(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def check_is_peft_model():
    # transformers.trainer_utils._is_peft_model / accelerate.utils.is_peft_model (TRL uses the latter):
    # the switch to every PEFT code path below.
    for model in _run_both(lambda m: m):
        assert isinstance(model, peft.PeftModel) and _is_peft_model(model) and is_peft_model(model)


def check_get_base_model():
    # Trainer (signature columns, loss kwargs), TRL (the fused LM head goes on get_base_model()).
    hf, ours = _run_both(lambda m: (type(m.get_base_model()), unwrap_peft_model(m) is m.get_base_model()))
    assert hf == ours == (type(make_model("llama")), True)


def check_base_model_forward():
    # `model.base_model(...)` is the tuner; its forward is the wrapped model's (HF peft's BaseTuner.forward).
    hf, ours = _run_both(lambda m: (_logits(m.base_model, IDS), _logits(m, IDS), m.base_model.model._get_name()))
    _same_tensor(ours[0], hf[0])
    _same_tensor(ours[0], ours[1])
    assert ours[2] == hf[2] == "LlamaForCausalLM"  # Trainer.compute_loss reads base_model.model._get_name()


def check_tuner_delegates_attributes():
    # TRL's activation offloading hooks `model.base_model.lm_head` of a PEFT model.
    hf, ours = _run_both(lambda m: m.base_model.lm_head is m.get_base_model().lm_head)
    assert hf is ours is True


def check_disable_adapter():
    # TRL's use_adapter(model, None): the DPO reference logits with the adapter switched off.
    def run(m):
        with torch.no_grad():
            m.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.normal_()
        with use_adapter(m, None):
            off = _logits(m, IDS)
        return off, _logits(m, IDS)

    (hf_off, hf_on), (off, on) = _run_both(run)
    _same_tensor(off, hf_off)
    _same_tensor(off, _logits(make_model("llama"), IDS))
    assert not torch.allclose(on, off)


def check_active_adapters_and_peft_config():
    # Trainer._load_from_checkpoint (active_adapters), TRL's use_adapter (active_adapter, set_adapter),
    # DPOTrainer (peft_config["default"]).
    def run(m):
        c = m.peft_config["default"]
        return m.active_adapter, m.active_adapters, c.r, c.lora_alpha, sorted(c.target_modules), c.peft_type.value

    hf, ours = _run_both(run)
    assert ours == hf


def check_modules_to_save():
    hf, ours = _run_both(lambda m: m.modules_to_save)
    assert ours is None and hf is None
    both = [
        LIBS[lib].get_peft_model(
            make_model("llama"), LIBS[lib].LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"])
        )
        for lib in LIBS
    ]
    assert both[1].modules_to_save == both[0].modules_to_save == {"lm_head"}


def check_add_adapter_copy():
    # DPOTrainer with a PeftModel and no ref_model: a "ref" copy of the default adapter, then
    # use_adapter(model, "ref") for the reference logits.
    def run(m):
        with torch.no_grad():
            m.base_model.model.model.layers[1].self_attn.v_proj.lora_B.default.weight.normal_()
        m.add_adapter("ref", m.peft_config["default"])
        for name, param in m.named_parameters():
            if ".default." in name:
                m.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
        with use_adapter(m, "ref"):
            ref = _logits(m, IDS)
        trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
        return ref, _logits(m, IDS), m.active_adapter, trainable

    hf, ours = _run_both(run)
    _same_tensor(ours[0], hf[0])
    _same_tensor(ours[0], ours[1])
    assert ours[2:] == hf[2:] and all(".default." in n for n in ours[3])


def check_enable_input_require_grads():
    # TRL with gradient_checkpointing (PEFT models only): embeddings' output requires grad.
    def run(m):
        m.enable_input_require_grads()
        return m.get_input_embeddings()(IDS).requires_grad

    assert _run_both(run) == (True, True)


def check_gradient_checkpointing():
    # Trainer: model.activation_checkpointing_enable(...) reaches the transformers model.
    def run(m):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return m.get_base_model().is_activation_checkpointing

    assert _run_both(run) == (True, True)


def check_prepare_inputs_for_generation():
    def run(m):
        kw = m.prepare_inputs_for_generation(IDS, attention_mask=torch.ones_like(IDS))
        return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}

    hf, ours = _run_both(run)
    assert hf.keys() == ours.keys()
    for k in hf:
        _same_tensor(ours[k], hf[k])


def check_output_embeddings_tuner_layer(tmp_path):
    # TRL refuses an adapter on lm_head by isinstance(get_output_embeddings(), BaseTunerLayer).
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert _run_both(lambda m: isinstance(m.get_output_embeddings(), BaseTunerLayer)) == (False, False)
    for lib in LIBS:
        m = LIBS[lib].get_peft_model(make_model("llama"), LIBS[lib].LoraConfig(target_modules=["lm_head"]))
        assert isinstance(m.get_output_embeddings(), BaseTunerLayer)
        with pytest.raises(ValueError, match="Applying a PEFT adapter to `lm_head` is not supported"):
            SFTTrainer(model=m, args=SFTConfig(**_common_args(tmp_path, 1)), processing_class=_tokenizer(),
                       train_dataset=Dataset.from_dict({"text": SFT_TEXTS}))  # fmt: skip


def check_save_and_load_adapter(tmp_path):
    # Trainer._save: save_pretrained(dir, state_dict=..., is_main_process=...); Trainer resume and
    # load_best_model_at_end: load_adapter(dir, <existing adapter>, is_trainable=...) replaces its weights.
    hf, ours = _lora("peft"), _lora("peft_fast")
    for lib, m in (("peft", hf), ("peft_fast", ours)):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(len(n)))
        m.save_pretrained(tmp_path / lib, state_dict=m.state_dict(), is_main_process=True)
    for m in (hf, ours):
        for lib in LIBS:
            fresh = _lora(lib)
            fresh.load_adapter(str(tmp_path / ("peft_fast" if m is ours else "peft")), "default", is_trainable=True)
            _same_tensor(_logits(fresh, IDS), _logits(m, IDS))
            assert any(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)


CLIENT_CALLS = {
    "isinstance(model, peft.PeftModel)": check_is_peft_model,
    "get_base_model": check_get_base_model,
    "base_model.forward": check_base_model_forward,
    "base_model.<attribute of the wrapped model>": check_tuner_delegates_attributes,
    "disable_adapter": check_disable_adapter,
    "active_adapter(s), peft_config, set_adapter": check_active_adapters_and_peft_config,
    "modules_to_save": check_modules_to_save,
    "add_adapter + get_parameter + set_adapter": check_add_adapter_copy,
    "enable_input_require_grads": check_enable_input_require_grads,
    "activation_checkpointing_enable": check_gradient_checkpointing,
    "prepare_inputs_for_generation": check_prepare_inputs_for_generation,
    "isinstance(layer, BaseTunerLayer)": check_output_embeddings_tuner_layer,
    "save_pretrained(state_dict=) / load_adapter(existing)": check_save_and_load_adapter,
}


@pytest.mark.parametrize("call", list(CLIENT_CALLS))
def test_client_calls_behave_as_hf_peft(call, tmp_path):
    check = CLIENT_CALLS[call]
    check(tmp_path) if "tmp_path" in inspect.signature(check).parameters else check()


def test_no_hf_peft_code_runs_on_peft_fast_models():
    """peft_fast's PeftModel passes `isinstance(model, peft.PeftModel)`, but every member HF
    peft's class defines is either peft_fast's own or absent (then looked up on the base model,
    as without HF peft): none of HF peft's code runs on it."""
    hf_members = {}
    for cls in peft.PeftModel.__mro__:
        if cls not in torch.nn.Module.__mro__:
            for name, value in vars(cls).items():
                hf_members.setdefault(name, value)
    hidden = hidden_hf_members(peft.PeftModel)
    assert {
        "forward",
        "save_pretrained",
        "load_adapter",
        "disable_adapter",
        "get_layer_status",
        "push_to_hub",
    } <= hidden
    assert {"__init__", "__getattr__"} <= hidden
    model = _lora("peft_fast")
    for name in sorted(hidden):  # static lookup: peft_fast's member, or the hiding placeholder
        assert inspect.getattr_static(type(model), name) is not hf_members[name], name
    # Absent members: delegated to the transformers model, as without HF peft in the MRO.
    assert not hasattr(model, "get_layer_status")
    assert model.push_to_hub.__self__ is model.get_base_model()
    assert model.get_base_model.__func__ is peft_fast.PeftModel.get_base_model


# -- the clients, trained a few steps -------------------------------------------------------------


def _sft(lib: str, out, steps: int = 4, patch: bool = False, resume=None, model=None) -> Trainer:
    model = _lora(lib) if model is None else model
    if patch:
        peft_fast.patch_peft(model)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**_common_args(out, steps), max_length=16),
        train_dataset=Dataset.from_dict({"text": SFT_TEXTS + SFT_TEXTS[:2]}),
        processing_class=_tokenizer(),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def hf_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_sft")
    trainer = _sft("peft", out)
    return _losses(trainer), trainer.model, out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sft_trainer_same_losses_and_checkpoints_as_hf_peft(backend, hf_sft, tmp_path):
    want, hf_model, hf_out = hf_sft
    steps = 4 if backend == "torch" else 2
    with _backend(backend):
        trainer = _sft("peft_fast", tmp_path, steps=steps)
    got = _losses(trainer)
    _same_losses(got, want[: len(got)], backend)
    _check_adapter_checkpoint(tmp_path / f"checkpoint-{steps}", trainer.model)
    _check_adapter_checkpoint(hf_out / "checkpoint-4", hf_model)  # and HF peft's checkpoints load in peft_fast


def test_sft_trainer_resumes_adapter_and_optimizer(tmp_path):
    """Resuming from the step-2 adapter-only checkpoint ends where the uninterrupted run ends:
    the adapter and the optimizer's state (Adam's step count and moments) come back."""
    full = _sft("peft_fast", tmp_path / "full")
    resumed = _sft("peft_fast", tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        if "lora_" in n:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            assert resumed.optimizer.state[b]["step"] == 4  # 2 restored + 2 taken; a fresh optimizer says 2
    _same_losses(_losses(resumed), _losses(full), "torch")  # the log of steps 1-2 comes from the checkpoint


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_peft_in_sft_trainer(backend, hf_sft, tmp_path):
    """An HF peft model routed through peft_fast's ops by patch_peft trains as HF peft does."""
    want, _, _ = hf_sft
    steps = 4 if backend == "torch" else 2
    with _backend(backend):
        trainer = _sft("peft", tmp_path, steps=steps, patch=True)
    assert peft_fast.patch.patched_layers(trainer.model)
    got = _losses(trainer)
    _same_losses(got, want[: len(got)], backend)
    _check_adapter_checkpoint(tmp_path / f"checkpoint-{steps}", trainer.model)


def _dpo(lib: str, out, steps: int = 2, reference: str = "ref adapter") -> DPOTrainer:
    trainer = DPOTrainer(
        model=_lora(lib),
        args=DPOConfig(**_common_args(out, steps), max_length=16, beta=0.5),
        train_dataset=Dataset.from_dict(DPO_ROWS),
        processing_class=_tokenizer(),
    )
    assert trainer.ref_model is None  # the reference is the model itself, adapter copied or switched off
    if reference == "adapter disabled":
        trainer.model.delete_adapter("ref")  # TRL then computes the reference under disable_adapter()
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def hf_dpo(tmp_path_factory):
    trainer = _dpo("peft", tmp_path_factory.mktemp("hf_dpo"))
    return _losses(trainer)


@pytest.mark.parametrize(
    "backend, reference", [("torch", "ref adapter"), ("torch", "adapter disabled"), ("triton", "ref adapter")]
)
def test_dpo_trainer_same_losses_as_hf_peft(backend, reference, hf_dpo, tmp_path):
    """No separate reference model: TRL copies the adapter to "ref" (or, without it, switches
    the adapter off); with a zero-initialized LoRA both references are the base model."""
    with _backend(backend):
        trainer = _dpo("peft_fast", tmp_path, reference=reference)
    _same_losses(_losses(trainer), hf_dpo, backend)
    assert not torch.allclose(_losses(trainer), torch.full((2,), 0.6931), atol=1e-4)  # the policy moved
    trainer.model.set_adapter("default")
    _check_adapter_checkpoint(tmp_path / "checkpoint-2", trainer.model)
    if reference == "ref adapter":  # the ref adapter is saved too, in its sub-folder (as HF peft does)
        assert os.path.isfile(tmp_path / "checkpoint-2" / "ref" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def hf_trainer_losses(tmp_path_factory):
    return _losses(_hf_trainer("peft", tmp_path_factory.mktemp("hf_trainer")))


def _hf_trainer(lib: str, out, steps: int = 2) -> Trainer:
    ids = torch.randint(3, 97, (4, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(**_common_args(out, steps), activation_checkpointing=True)
    trainer = Trainer(model=_lora(lib), args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    trainer.train()
    return trainer


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hf_trainer_with_gradient_checkpointing(backend, hf_trainer_losses, tmp_path):
    want = hf_trainer_losses
    with _backend(backend):
        trainer = _hf_trainer("peft_fast", tmp_path / "ours")
    assert trainer.model.get_base_model().is_activation_checkpointing
    _same_losses(_losses(trainer), want, backend)
    _check_adapter_checkpoint(tmp_path / "ours" / "checkpoint-2", trainer.model)


def _accelerate_loop(lib: str, steps: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    model = _lora(lib).train()
    ids = torch.randint(3, 97, (6, 8), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ids, batch_size=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert accelerator.unwrap_model(model) is model and is_peft_model(model)
    losses = []
    for _, batch in zip(range(steps), loader):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accelerate_prepare_training_loop(backend):
    want = _accelerate_loop("peft")
    with _backend(backend):
        got = _accelerate_loop("peft_fast")
    _same_losses(got, want, backend)


def test_without_hf_peft_peft_model_is_a_plain_module(monkeypatch):
    """Without HF peft installed there is nothing to pass for: the base is nn.Module."""
    from peft_fast import hf_identity

    assert issubclass(hf_identity.hf_peft_model_base(), peft.PeftModel)
    monkeypatch.setattr(hf_identity, "_hf_peft_model", lambda: None)
    assert hf_identity.hf_peft_model_base() is torch.nn.Module
