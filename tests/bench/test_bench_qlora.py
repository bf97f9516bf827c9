"""`peft-fast bench --suite qlora` (bench/qlora.py and bench/qlora_layers.py through
bench/main.py) with the tiny preset: its tables, its record, and what it refuses; the layer
benchmark's Unsloth-style composite against a float64 formula, and how the targets are read
from rows set by hand. The numbers are the harness's, not a measurement."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peft_fast_bench import qlora, qlora_layers
from peft_fast_bench.main import _qlora_layer_harness
from peft_fast_bench.main import main as bench_main

pytest.importorskip("bitsandbytes", reason="the qlora suite loads its 4-bit model through bitsandbytes")
pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU harness"),
    pytest.mark.usefixtures("keep_threads"),
]


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
    for r in record["runs"]:  # the whole process's peak covers loading's and the steps' own peak
        assert r["peak_rss_mib"] >= r["load_peak_mib"] > 0 and r["step_peak_mib"] >= 0
        assert r["peak_rss_mib"] >= r["rss_before_steps_mib"] + r["step_peak_mib"] - 1e-6
    t = record["targets"]
    ours, hf = rows[("peft_fast", "4bit")], rows[("hf_peft", "4bit")]
    assert t["step_peak_mib"] == ours["step_peak_mib"] and t["hf_step_peak_mib"] == hf["step_peak_mib"]
    assert t["step_peak_met"] == (ours["step_peak_mib"] <= hf["step_peak_mib"])

    # the GPU layer benchmark's harness ran on CPU (conftest sets TRITON_INTERPRET=1), labelled as such
    layers = record["layers"]
    assert layers["harness_only"] == qlora_layers.HARNESS_ONLY and layers["targets"] == {}
    got = {(r["K"], r["N"], r["M"], r["variant"]): r for r in layers["rows"]}
    cases = qlora_layers.PRESETS["tiny"]["cases"]
    assert sorted(got) == sorted((*c, v) for c in cases for v in qlora_layers.VARIANTS)
    for (k, n, m, _variant), r in got.items():
        hf_row = got[(k, n, m, "hf_bnb")]
        assert r["fwd_speedup"] == pytest.approx(hf_row["fwd_ms"] / r["fwd_ms"])
        assert r["fwd_bwd_speedup"] == pytest.approx(hf_row["fwd_bwd_ms"] / r["fwd_bwd_ms"])
        assert r["base_fwd_ms"] == hf_row["base_fwd_ms"] > 0  # bitsandbytes alone, timed once per case
        # the same layer three ways: HF peft's bnb layer is the oracle of the other two (fp32)
        assert r["rel_err_vs_hf"] < 1e-5 and r["dtype"] == "float32" and r["r"] == qlora_layers.RANK
        assert math.isnan(r["peak_mib"]) and math.isnan(r["extra_mib"])  # CUDA only
    printed = capsys.readouterr().out
    assert "[qlora] tiny preset" in printed and "peft_fast  4bit" in printed and f"wrote {path}" in printed
    assert "4-bit training step peak" in printed and "[qlora] layers, tiny preset" in printed


def test_isolated_case_runs_in_its_own_process(tmp_path):
    """The cpu/full presets run each case in a fresh process; its numbers come back as JSON."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**qlora.LLAMA_TINY)).save_pretrained(tmp_path)
    case = {"impl": "peft_fast", "precision": "4bit", "checkpoint": str(tmp_path), "tokens": 8, "steps": 1,
            "vocab": qlora.LLAMA_TINY["vocab_size"], "threads": 1}  # fmt: skip
    result = qlora._run_isolated(case)
    assert result["impl"] == "peft_fast" and result["precision"] == "4bit" and len(result["step_s"]) == 1
    assert result["peak_rss_mib"] >= result["load_peak_mib"] > 0 and result["trainable"] > 0
    assert result["step_peak_mib"] >= 0 and result["heap_in_use_mib"]["after_steps"] > 0
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


def test_layer_harness_says_why_it_did_not_run_without_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _qlora_layer_harness(torch.device("cpu")) == {
        "skipped": "not run: on CPU the fused kernels need Triton's interpreter (TRITON_INTERPRET=1)"
    }
    assert "qlora layer harness check not run" in capsys.readouterr().out
    with pytest.raises(ValueError, match="runs on CUDA"):
        qlora_layers.run(qlora_layers.PRESETS["quick"], torch.device("cpu"))


@pytest.mark.parametrize("m", [1, 7])
def test_composite_matches_float64_formula(m):
    """The Unsloth-style composite: y = x Wᵀ + s x Aᵀ Bᵀ and its gradients, against autograd of
    the plain formula in float64; the weight is dequantized once per pass."""
    g = torch.Generator().manual_seed(0)
    k, n, r, s = 33, 20, 4, 0.5
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(m, k, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, k, generator=g, requires_grad=True)  # fp32 adapters on a float64 "compute dtype"
    b = torch.randn(n, r, generator=g, requires_grad=True)
    dy = torch.randn(m, n, generator=g, dtype=torch.float64)
    calls = []

    def dequantize():
        calls.append(1)
        return w.clone()

    y = qlora_layers._ComposedLora4bit.apply(x, a, b, dequantize, s)
    y.backward(dy)
    got = (y.detach(), x.grad, a.grad, b.grad)
    assert len(calls) == 2 and a.grad.dtype == b.grad.dtype == torch.float32
    x2, a2, b2 = (t.detach().clone().double().requires_grad_() for t in (x, a, b))
    y2 = x2 @ w.t() + s * (x2 @ a2.t()) @ b2.t()
    y2.backward(dy)
    for mine, ref in zip(got, (y2.detach(), x2.grad, a2.grad, b2.grad)):
        assert ((mine.double() - ref).norm() / ref.norm()).item() < 1e-6


def _row(k, n, m, variant, fwd_speedup=1.0, fwd_bwd_speedup=1.0, extra=0.0):
    return qlora_layers.LayerRow(
        K=k, N=n, M=m, r=16, dtype="bfloat16", variant=variant, fwd_ms=1.0, fwd_bwd_ms=1.0,
        fwd_speedup=fwd_speedup, base_fwd_ms=0.8, fwd_bwd_speedup=fwd_bwd_speedup, peak_mib=1.0, extra_mib=extra,
        extra_vs_bf16_weight=extra, rel_err_vs_hf=0.0,
    )  # fmt: skip


def test_targets_are_read_on_the_fused_rows():
    rows = [
        _row(4096, 4096, 8192, "fused", fwd_bwd_speedup=1.5, extra=0.01),
        _row(4096, 14336, 8192, "fused", fwd_bwd_speedup=1.2, extra=0.02),  # misses 1.3x
        _row(4096, 14336, 1, "fused", fwd_speedup=2.5, extra=0.12),  # over 10 % of the bf16 weight
        _row(4096, 14336, 1, "composite", fwd_speedup=9.0, fwd_bwd_speedup=9.0),  # not read
        _row(4096, 14336, 1, "hf_bnb"),
    ]
    t = qlora_layers.targets(rows)
    assert t["fwd_bwd_at_8192"] == {"speedup_vs_hf_bnb": {"4096x4096": 1.5, "4096x14336": 1.2}, "target": 1.3,
                                    "met": False}  # fmt: skip
    assert t["decode_4096x14336"] == {"speedup_vs_hf_bnb": 2.5, "target": 2.0, "met": True,
                                      "speedup_vs_bnb_base_alone": 0.8}  # fmt: skip
    assert t["extra_memory"]["met"] is False and t["extra_memory"]["vs_bf16_weight"]["4096x14336 M=1"] == 0.12
    rows[2] = _row(4096, 14336, 1, "fused", fwd_speedup=1.9, extra=0.05)
    t = qlora_layers.targets(rows)
    assert t["decode_4096x14336"]["met"] is False and t["extra_memory"]["met"] is True
    assert "target decode_4096x14336: 1.9 (target 2.0): MISSED" in qlora_layers.target_lines(t)
    # no case of a target, no entry; no memory measured (CPU), no memory target
    assert qlora_layers.targets([_row(64, 96, 1, "fused", extra=math.nan)]) == {}


def test_memory_target_reads_the_step_peak():
    def row(impl, peak, step_peak):
        return qlora.QloraRow(impl, "4bit", step_ms=1.0, peak_rss_mib=peak, train_rss_mib=0.0, load_peak_mib=500.0,
                              step_peak_mib=step_peak, base_weight_mib=1.0, trainable_params=1,
                              last_loss=1.0)  # fmt: skip

    t = qlora.memory_targets([row("peft_fast", 1100.0, 250.0), row("hf_peft", 1000.0, 260.0)])
    assert t["step_peak_met"] and t["step_peak_vs_hf"] == pytest.approx(250 / 260)
    assert t["process_peak_vs_hf"] == pytest.approx(1.1)
    t = qlora.memory_targets([row("peft_fast", 900.0, 270.0), row("hf_peft", 1000.0, 260.0)])
    assert not t["step_peak_met"]
    t = qlora.memory_targets([row("peft_fast", 900.0, 0.0), row("hf_peft", 1000.0, 0.0)])  # tiny steps: no growth
    assert t["step_peak_met"] and math.isnan(t["step_peak_vs_hf"])
