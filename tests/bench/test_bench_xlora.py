"""`peft-fast bench --suite xlora` on CPU with the tiny preset: the record it writes (variants,
ratios, the 8-expert targets, the machine's load) and that "quick" leaves it out. The numbers
are the harness's, not a measurement."""

from __future__ import annotations

import json

import pytest
import torch

from peft_fast_bench import main as bench_module
from peft_fast_bench import xlora
from peft_fast_bench.main import main as bench_main

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU harness"),
    pytest.mark.usefixtures("keep_threads"),
]


def test_xlora_suite_writes_its_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench_main(["--suite", "xlora", "--preset", "tiny", "--rounds", "1", "--out", "out", "--no-plot"]) == 0
    (path,) = (tmp_path / "out").iterdir()
    record = json.loads(path.read_text())
    assert record["suite"] == "xlora" and record["preset"] == "tiny"
    assert len(record["load_average_before"]) == 3 and len(record["load_average_after"]) == 3
    rows = record["rows"]
    assert [(r["experts"], r["variant"]) for r in rows] == [(2, v) for v in xlora.VARIANTS]
    by = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["fwd_ms"] > 0 and r["step_ms"] > 0
        assert r["fwd_vs_lora"] == pytest.approx(r["fwd_ms"] / by["lora"]["fwd_ms"])
    # X-LoRA trains only the classifier (hidden -> experts, with bias), LoRA its adapter.
    hidden = xlora.PRESETS["tiny"]["hidden"]
    assert by["xlora"]["trainable_params"] == by["hf_xlora"]["trainable_params"] == hidden * 2 + 2
    assert by["lora"]["trainable_params"] == by["hf_lora"]["trainable_params"] > 0
    t = record["targets"]["2"]
    assert t["fwd_speedup_vs_hf_xlora"] == pytest.approx(by["hf_xlora"]["fwd_ms"] / by["xlora"]["fwd_ms"])
    assert "met_at_8_experts" not in record["targets"]  # the tiny preset has no 8-expert case


def test_targets_judge_the_8_expert_case():
    rows = [
        xlora.XLoraRow(8, "lora", 10.0, 20.0, 1),
        xlora.XLoraRow(8, "hf_lora", 11.0, 21.0, 1),
        xlora.XLoraRow(8, "hf_xlora", 75.0, 100.0, 1),
        xlora.XLoraRow(8, "xlora", 24.0, 30.0, 1),
    ]
    t = xlora.targets(rows)
    assert t["8"]["fwd_speedup_vs_hf_xlora"] == pytest.approx(75 / 24)
    assert t["met_at_8_experts"] == {"fwd_speedup_vs_hf_xlora>=3": True, "fwd_vs_lora<=2.5": True}
    rows[3] = xlora.XLoraRow(8, "xlora", 26.0, 30.0, 1)
    assert xlora.targets(rows)["met_at_8_experts"] == {"fwd_speedup_vs_hf_xlora>=3": False, "fwd_vs_lora<=2.5": False}


def test_quick_suite_leaves_xlora_out():
    assert "xlora" in bench_module.SUITES and "xlora" not in bench_module.QUICK_SUITES
