"""peft_fast/cli.py: the `peft-fast` command."""

import json
import re
import sys
import types

import pytest
import torch

from peft_fast.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("peft_fast", "python", "torch", "transformers", "triton", "cuda", "backends:"):
        assert name in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for backend in ("torch", "triton", "cuda"):
        assert backend in lines
    assert "available" in lines["torch"] and "unavailable" not in lines["torch"]


def test_train_end_to_end(tmp_path, capsys):
    """The bundled MiniLM on a tiny JSONL: trains, saves the adapter, reload check passes."""
    data = tmp_path / "tiny.jsonl"
    rows = [
        ("The keeper saved a penalty.", "sports"),
        ("Our team won the cup final.", "sports"),
        ("She ran a fast marathon.", "sports"),
        ("Heavy rain is due tonight.", "weather"),
        ("Snow fell on the hills.", "weather"),
        ("It is windy and cold.", "weather"),
    ]
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    out = tmp_path / "adapter"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--r",
            "4",
            "--output-dir",
            str(out),
            "--seed",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "trainable params" in printed
    assert "accuracy" in printed and "tokens/s" in printed and "peak memory" in printed
    assert re.search(r"reload check: max \|logits diff\| = \S+ \(ok, tolerance", printed), printed
    assert re.search(r"learning check: test loss [\d.]+ -> [\d.]+, accuracy [\d.]+ -> [\d.]+ \(", printed)
    assert re.search(r"test loss +[\d.]+ -> [\d.]+ \((learned|NOT LEARNING)\)", printed)
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data", "/no/such/file.jsonl"], "argument --data: '/no/such/file.jsonl' does not exist"),
        (["--model", "/no/such/model"], "argument --model: '/no/such/model' is not a folder"),
        (["--method", "prefix"], "argument --method: invalid choice: 'prefix'"),
        (["--r", "0"], "argument --r: must be > 0"),
        (["--r", "eight"], "argument --r: invalid int value"),
        (["--dropout", "1"], "argument --dropout: must be in [0, 1)"),
        (["--steps", "-3"], "argument --steps: must be > 0"),
        (["--backend", "metal"], "argument --backend: invalid choice: 'metal'"),
        (
            ["--method", "ia3", "--r", "4"],
            "argument --r: applies to --method lora|qlora|loha|lokr|adalora|vera|dora only",
        ),
        (
            ["--method", "ia3", "--dropout", "0.2"],
            "argument --dropout: applies to --method lora|qlora|adalora|vera|dora only",
        ),
    ],
)
def test_train_bad_arguments_exit_2_naming_the_argument(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


def test_train_dora_runs_the_job_and_saves_a_dora_adapter(tmp_path, capsys):
    """`--method dora` on a tiny BERT: trains, saves an adapter HF peft reads as DoRA (use_dora and
    the magnitude vectors), and the reload check passes."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel, BertTokenizer

    words = "the keeper saved a penalty heavy rain is due tonight".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertModel(cfg).save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    rows = [("the keeper saved a penalty", "sports"), ("heavy rain is due tonight", "weather")] * 3
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    out = tmp_path / "dora"
    args = ["train", "--model", str(tmp_path / "m"), "--data", str(data), "--steps", "2", "--batch-size", "2"]
    assert main([*args, "--method", "dora", "--r", "4", "--dropout", "0.1", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"reload check: max \|logits diff\| = \S+ \(ok, tolerance", printed), printed
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(out / "adapter_model.safetensors"))


def test_train_qlora_reports_the_base_weights(tmp_path, capsys):
    """`--method qlora` (and `--load-in-4bit`) on a tiny BERT: the summary gives the 4-bit base's
    size beside its fp32 size."""
    pytest.importorskip("bitsandbytes")
    from transformers import BertConfig, BertModel, BertTokenizer

    words = "the keeper saved a penalty heavy rain is due tonight".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=1, num_attention_heads=2)
    BertModel(cfg).save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    rows = [("the keeper saved a penalty", "sports"), ("heavy rain is due tonight", "weather")] * 3
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    for flags in (["--method", "qlora", "--r", "4"], ["--load-in-4bit"]):
        out = tmp_path / flags[-1]
        args = ["train", "--model", str(tmp_path / "m"), "--data", str(data), "--steps", "1", "--batch-size", "2"]
        assert main([*args, *flags, "--output-dir", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "4-bit NF4 base" in printed and "base weights" in printed and "MiB in fp32" in printed
        assert (out / "adapter_model.safetensors").is_file()


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "train,info,bench" in capsys.readouterr().err


def test_bench_passes_every_argument_to_the_bench_module(monkeypatch):
    seen = []
    fake = types.ModuleType("peft_fast_bench.main")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "peft_fast_bench.main", fake)
    assert main(["bench", "--op", "lora", "-h"]) == 7
    assert seen == [["--op", "lora", "-h"]]


def test_bench_without_the_bench_package_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft_fast_bench.main", None)  # makes the import fail
    assert main(["bench"]) == 1
    assert "peft_fast_bench" in capsys.readouterr().err


def test_the_library_never_imports_the_bench_suites():
    """peft_fast_bench imports peft_fast, never the reverse (cli imports it on demand only)."""
    import subprocess

    code = "import sys, peft_fast, peft_fast.cli, peft_fast.ops; print('peft_fast_bench' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_train_returns_1_when_the_reload_check_fails(monkeypatch, capsys):
    from peft_fast import cli
    from peft_fast.train import ReloadCheckError

    def failing_run(config):
        raise ReloadCheckError(types.SimpleNamespace(output_dir="runs/x", reload_max_abs_diff=0.5))

    monkeypatch.setattr(cli, "run", failing_run)
    assert main(["train"]) == 1
    assert "does not reproduce the trained model" in capsys.readouterr().err
