"""Test set-up, and tiny transformers models built from configs (fixed seed, no downloads).

Triton kernel tests run on the GPU when there is one, else on CPU tensors under Triton's
interpreter: TRITON_INTERPRET must be set before any kernel is defined (Triton reads it when
`@triton.jit` runs), so it is set here, before any test module imports peft_fast's kernels.
"auto" never sends CPU tensors to the interpreter, so model tests still run the reference.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    )


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(
        OPTConfig(
            vocab_size=97,
            hidden_size=32,
            ffn_dim=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    )


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            num_labels=3,
        )
    )


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=97,
            d_model=32,
            d_kv=8,
            d_ff=40,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


BUILDERS = {"llama": _llama, "gpt2": _gpt2, "opt": _opt, "bert": _bert_cls, "t5": _t5}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "opt": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of this kind, in eval mode, with weights fixed by `seed`."""
    torch.manual_seed(seed)
    return BUILDERS[kind]().eval()


def make_inputs(kind: str, batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(2, 97, (batch, 5), generator=g)
    return inputs


def hf_and_ours(kind: str, config_of, randomized: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """HF peft's and peft_fast's models of `kind` built from the same seed with
    `config_of(library)` (the `peft` or `peft_fast` module -> its config); every parameter whose
    name contains `randomized` gets the same standard-normal values in both (for the adapters HF
    initialises to zero or to a constant, which would hide the others' role). The parameter
    names must match one to one."""
    import peft

    import peft_fast

    torch.manual_seed(0)
    theirs = peft.get_peft_model(make_model(kind), config_of(peft))
    torch.manual_seed(0)
    ours = peft_fast.get_peft_model(make_model(kind), config_of(peft_fast))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for (n, p), (m, q) in zip(theirs.named_parameters(), ours.named_parameters(), strict=True):
            assert n == m
            if randomized in n:
                p.copy_(torch.randn(p.shape, generator=g))
                q.copy_(p)
    return theirs, ours


def training_loss(model: torch.nn.Module, kind: str, seed: int = 0) -> torch.Tensor:
    """The language-model loss on `make_inputs(kind)`, with torch's generator set to `seed` first
    (it fixes the base model's own dropout and the adapters')."""
    inputs = make_inputs(kind)
    torch.manual_seed(seed)
    return model(**inputs, labels=inputs["input_ids"]).loss


def output_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kw).logits


@pytest.fixture
def keep_threads():
    """For the bench-harness tests (`pytestmark = pytest.mark.usefixtures("keep_threads")`): the
    bench sets one CPU thread for stable medians; the rest of the suite gets its count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
