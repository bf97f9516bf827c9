"""Guards that no other CPU test reaches: the kernels' int32 size limits, the dropout seed
checks, SaveAdapterCallback's type check, and the prompt-learning generate() errors.
Each case checks the exact outcome (the exception and what its message names, or the
fallback taken), with sizes hand-computed around the 2**31 limit."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import make_inputs, make_model

import peft_fast
from peft_fast import LoraConfig, PromptTuningConfig, get_peft_model
from peft_fast.ops import dispatch
from peft_fast.ops.checks import size_reason

LIMIT = 2**31


def _huge(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) fp32 CPU tensor that takes no memory (one element, stride 0)."""
    return torch.zeros(1, 1).expand(rows, cols)


# ---- int32 size guards ------------------------------------------------------------------------------


def test_size_reason_at_the_int32_limit():
    w = torch.zeros(8, 4)
    assert size_reason(_huge(LIMIT // 4 - 1, 4), torch.zeros(2, 4)) is None  # 2**31 - 4 elements
    assert "2147483648 elements" in size_reason(_huge(LIMIT // 4, 4), torch.zeros(2, 4))  # x itself
    # the output (rows x out) is the biggest: 2**28 rows x 8 = 2**31
    assert "2147483648 elements" in size_reason(_huge(LIMIT // 8, 4), w)
    assert size_reason(_huge(LIMIT // 8 - 1, 4), w) is None
    assert "elements" in size_reason(torch.zeros(1, 4), _huge(LIMIT // 4, 4))  # the weight


def test_dropout_numbering_limit():
    from peft_fast.kernels.dropout import MAX_ELEMENTS, check_dropout, check_numbering

    assert MAX_ELEMENTS == LIMIT - 1
    check_numbering(LIMIT - 1, 1)
    with pytest.raises(ValueError, match=r"M \* K < 2\*\*31.*M=65536, K=32768"):
        check_numbering(2**16, 2**15)
    seed = torch.tensor([1], dtype=torch.int64)
    assert check_dropout(0.0, None, torch.device("cpu"), 2**16, 2**15) is False  # no dropout: no limit
    with pytest.raises(ValueError, match="2\\*\\*31"):
        check_dropout(0.1, seed, torch.device("cpu"), 2**16, 2**15)


def test_kernels_refuse_oversized_inputs_and_dispatch_falls_back():
    """Triton's `supports` names the int32 limit (dropout numbering, offsets) so dispatch takes torch."""
    if dispatch.unavailable_reason("triton") is not None:
        pytest.skip(f"triton backend unavailable: {dispatch.unavailable_reason('triton')}")
    from peft_fast.ops.triton import lora as lora_triton
    from peft_fast.ops.triton import mixed as sgmv_triton

    W, A, B = torch.zeros(4, 2**15), torch.zeros(2, 2**15), torch.zeros(4, 2)
    x = _huge(2**16, 2**15)  # 2**31 elements
    with peft_fast.use_backend("triton"):
        assert "int32 mask numbering" in lora_triton.supports(x, W, None, A, B, 1.0, 0.1, True)
        # without dropout the offsets limit still applies
        assert "int32 offsets" in lora_triton.supports(x, W, None, A, B, 1.0, 0.0, True)
        assert lora_triton.supports(x[:2], W, None, A, B, 1.0, 0.1, True) is None
        x3 = torch.zeros(1, 1, 1).expand(2**8, 2**8, 2**15)
        reason = sgmv_triton.supports(x3, W, None, [A], [B], [1.0], [0.1], torch.zeros(2**8, dtype=torch.long))
        assert "int32 mask numbering" in reason
        fn = dispatch.select("lora_linear", x, W, None, A, B, 1.0, 0.1, True)
    assert fn.__module__.endswith("reference")


# ---- dropout seed checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, match",
    [
        (7, "one-element int64 tensor"),
        (torch.tensor([7], dtype=torch.int32), "one-element int64 tensor"),
        (torch.tensor([7, 8], dtype=torch.int64), "one-element int64 tensor"),
        (torch.tensor([7], dtype=torch.int64, device="meta"), "seed must be on cpu, got meta"),
    ],
)
def test_bad_seeds_are_refused(seed, match):
    from peft_fast.kernels.dropout import check_dropout, check_seed, dropout_mask

    with pytest.raises(ValueError, match=match):
        check_seed(seed, torch.device("cpu"))
    with pytest.raises(ValueError, match=match):
        check_dropout(0.5, seed, torch.device("cpu"), 4, 4)
    with pytest.raises(ValueError, match=match):
        dropout_mask(seed, 4, 4, 0.5, "cpu")


def test_dropout_needs_a_seed_and_p_in_range():
    from peft_fast.kernels.dropout import check_dropout, dropout_mask

    seed = torch.tensor([7], dtype=torch.int64)
    with pytest.raises(ValueError, match="seed is required when dropout_p > 0"):
        check_dropout(0.5, None, torch.device("cpu"), 4, 4)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            check_dropout(p, seed, torch.device("cpu"), 4, 4)
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            dropout_mask(seed, 4, 4, p, "cpu")
    assert check_dropout(0.5, seed, torch.device("cpu"), 4, 4) is True
    empty = dropout_mask(seed, 0, 4, 0.5, "cpu")
    assert empty.shape == (0, 4) and empty.dtype == torch.bool


# ---- SaveAdapterCallback ----------------------------------------------------------------------------


def test_save_adapter_callback_type_check_and_main_process_only(tmp_path):
    from peft_fast import PeftModel
    from peft_fast.integrations import SaveAdapterCallback

    callback = SaveAdapterCallback()
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    main = types.SimpleNamespace(is_world_process_zero=True, global_step=3)
    with pytest.raises(TypeError, match="needs a peft_fast PeftModel, got Linear"):
        callback.on_save(args, main, None, model=torch.nn.Linear(2, 2))
    assert not any(tmp_path.iterdir())
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    other = types.SimpleNamespace(is_world_process_zero=False, global_step=3)
    callback.on_save(args, other, None, model=model)  # other processes write nothing
    assert not any(tmp_path.iterdir())
    callback.on_save(args, main, None, model=model)
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "checkpoint-3")
    inputs = make_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model.eval()(**inputs).logits)


# ---- prompt-learning generate() errors ---------------------------------------------------------------


def _prompt_model(base):
    torch.manual_seed(0)
    return get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))


def test_prompt_generate_without_a_generating_base_model():
    model = _prompt_model(make_model("llama").model)  # LlamaModel: no LM head, no generate()
    with pytest.raises(AttributeError, match="LlamaModel has no generate"):
        model.generate(**make_inputs("llama"))


def test_prompt_generation_step_refuses_embeddings_and_non_2d_masks():
    """The per-step input hook: its two refusals, and what it builds for a valid first step."""
    model = _prompt_model(make_model("llama"))
    ids = make_inputs("llama", batch=2, seq=5)["input_ids"]

    def original(**kw):
        return dict(kw)

    with pytest.raises(ValueError, match="needs input_ids, not inputs_embeds"):
        model._prepare_prompt_inputs(original, input_ids=None, inputs_embeds=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="2-D attention masks"):
        model._prepare_prompt_inputs(original, input_ids=ids, attention_mask=torch.ones(2, 1, 5, 5))
    step = model._prepare_prompt_inputs(original, input_ids=ids, attention_mask=torch.ones(2, 5))
    assert step["input_ids"] is None and step["inputs_embeds"].shape == (2, 3 + 5, 32)
    assert step["attention_mask"].shape == (2, 8) and bool(step["attention_mask"].all())
