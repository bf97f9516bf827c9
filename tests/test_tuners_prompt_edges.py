"""Edges of tuners/prompt_learning found by mutation testing (bench/mutation.sh), checked
against HF peft 0.21.2 or hand-computed values."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_inputs, make_model

import peft_fast


def test_a_single_virtual_token_works_as_in_hf_peft():
    models = []
    for lib in (peft, peft_fast):
        torch.manual_seed(1)
        models.append(
            lib.get_peft_model(make_model("llama"), lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1))
        )
    theirs, ours = models
    ours.load_state_dict(theirs.state_dict(), strict=False)
    with torch.no_grad():
        ours.prompt_encoder["default"].embedding.weight.copy_(theirs.prompt_encoder["default"].embedding.weight)
    inputs = make_inputs("llama")
    with torch.no_grad():
        want = theirs(**inputs).logits
        got = ours(**inputs).logits
    assert got.shape == want.shape == (3, 1 + 7, 97)
    torch.testing.assert_close(got, want)


def test_prefix_tuning_refuses_per_layer_head_dims():
    model = make_model("llama")
    model.config.global_head_dim = 16
    with pytest.raises(ValueError, match="per-layer attention shapes"):
        peft_fast.get_peft_model(model, peft_fast.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def test_zero_init_zeroes_the_prefix_projection_output():
    cfg = peft_fast.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8, init_weights="zero"
    )
    torch.manual_seed(0)
    model = peft_fast.get_peft_model(make_model("llama"), cfg)
    last = model.prompt_encoder["default"].transform[-1]
    # hand-computed: a zero last layer gives an all-zero prefix whatever the embedding
    assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0


def test_unknown_adapter_and_merge_name_the_call():
    model = peft_fast.get_peft_model(
        make_model("llama"), peft_fast.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    with pytest.raises(ValueError, match=r"adapter 'nope' does not exist; adapters: \['default'\]"):
        model.delete_adapter("nope")
    with pytest.raises(TypeError, match=r"^merge_adapter\(\) is not supported for PROMPT_TUNING adapters"):
        model.merge_adapter()
