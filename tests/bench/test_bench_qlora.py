"""`peft-fast bench --suite qlora` (bench/qlora.py through bench/main.py) with the tiny preset:
its table, its record, and what it refuses. The numbers are the harness's, not a measurement."""

from __future__ import annotations

import json

import pytest
import torch

from peft_fast_bench import qlora
from peft_fast_bench.main import main as bench_main

pytest.importorskip("bitsandbytes", reason="the qlora suite loads its 4-bit model through bitsandbytes")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU harness")


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_preset_prints_its_table_and_writes_its_record(tmp_path, capsys):
    out = tmp_path / "results"
    assert bench_main(["--suite", "qlora", "--preset", "tiny", "--out", str(out), "--no-plot"]) == 0
    (path,) = out.iterdir()
    assert path.name.startswith("cpu-qlora-") and path.suffix == ".json"
    record = json.loads(path.read_text())
    assert record["suite"] == "qlora" and record["preset"] == "tiny"
    assert record["command"] == f"peft-fast bench --suite qlora --preset tiny --out {out} --no-plot"
    assert set(record["load_average"]) == {"before", "after"} and not record["isolated_processes"]
    rows = {(r["impl"], r["precision"]): r for r in record["rows"]}
    assert sorted(rows) == sorted(qlora.CASES)
    assert len(record["runs"]) == len(qlora.CASES)
    for (_impl, precision), r in rows.items():
        hf = rows[("hf_peft", precision)]
        assert r["step_ms"] > 0 and r["step_ratio"] == pytest.approx(r["step_ms"] / hf["step_ms"])
        # the same model trained the same way: same trainable count, same loss after the steps
        assert r["trainable_params"] == hf["trainable_params"] > 0
        assert r["last_loss"] == pytest.approx(hf["last_loss"], rel=1e-5)
    # 4 bits: the linear layers' weights at ~0.5 byte per parameter instead of 4
    assert rows[("peft_fast", "4bit")]["base_weight_mib"] < rows[("peft_fast", "fp32")]["base_weight_mib"]
    printed = capsys.readouterr().out
    assert "[qlora] tiny preset" in printed and "peft_fast  4bit" in printed and f"wrote {path}" in printed


def test_isolated_case_runs_in_its_own_process(tmp_path):
    """The cpu/full presets run each case in a fresh process; its numbers come back as JSON."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**qlora.LLAMA_TINY)).save_pretrained(tmp_path)
    case = {"impl": "peft_fast", "precision": "4bit", "checkpoint": str(tmp_path), "tokens": 8, "steps": 1,
            "vocab": qlora.LLAMA_TINY["vocab_size"], "threads": 1}  # fmt: skip
    result = qlora._run_isolated(case)
    assert result["impl"] == "peft_fast" and result["precision"] == "4bit" and len(result["step_s"]) == 1
    assert result["peak_rss_mib"] > 0 and result["trainable"] > 0
    with pytest.raises(ValueError, match=r"case must be one of .*'int3'"):
        qlora.run_case({**case, "precision": "int3"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--suite", "qlora", "--preset", "tiny", "--rounds", "3"], "--rounds: the qlora suite times whole"),
        (["--suite", "qlora", "--preset", "quick"], "the qlora suite has presets"),
    ],
)
def test_refusals(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_main(argv)
    assert message in capsys.readouterr().err
