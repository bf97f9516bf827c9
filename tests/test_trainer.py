"""The HF Trainer with a peft_fast PeftModel (tiny models, CPU, no downloads)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import TASKS, make_model
from transformers import Trainer, TrainingArguments

from peft_fast import LoraConfig, get_peft_model


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_forward_signature_shows_base_model_arguments(kind):
    """Tools that read forward's arguments (the Trainer's unused-column removal) see the base
    model's, plus adapter_names, not `*args, **kwargs`; calls and copies still work."""
    torch.manual_seed(5)  # a non-zero adapter, so that one lost in the copy would show
    model = get_peft_model(make_model(kind), LoraConfig(task_type=TASKS[kind], r=2, init_lora_weights=False))
    params = inspect.signature(model.forward).parameters
    base = inspect.signature(model.get_base_model().forward).parameters
    assert set(base) <= set(params) and "adapter_names" in params
    ids = torch.randint(2, 97, (2, 5))
    copied = copy.deepcopy(model)
    assert copied.forward.__self__ is copied
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert not torch.allclose(want, make_model(kind)(input_ids=ids).logits, atol=1e-4)
        torch.testing.assert_close(copied(input_ids=ids).logits, want)
        with copied.disable_adapter():  # the copy's adapter is its own: disabling it leaves the original
            torch.testing.assert_close(copied(input_ids=ids).logits, make_model(kind)(input_ids=ids).logits)
            torch.testing.assert_close(model(input_ids=ids).logits, want)


def test_trainer_keeps_model_inputs_and_trains(tmp_path):
    """With the Trainer's defaults (remove_unused_columns=True) the inputs reach the model and
    only the adapter changes."""
    model = get_peft_model(
        make_model("llama"), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"])
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(2, 97, (4, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row, "text": "unused"} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)


def test_checkpoints_hold_the_adapter_with_the_callback(tmp_path):
    """Trainer checkpoints written with SaveAdapterCallback reload with PeftModel.from_pretrained."""
    from peft_fast import PeftModel
    from peft_fast.integrations import SaveAdapterCallback

    model = get_peft_model(make_model("llama"), LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False))
    ids = torch.randint(2, 97, (4, 6), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[SaveAdapterCallback()]).train()
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "checkpoint-2")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
