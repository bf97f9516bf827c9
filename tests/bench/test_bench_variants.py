"""`peft-fast bench --suite variants` on CPU with the tiny preset: the rows, the peak-memory
children, the targets and the record; and the method table other methods join through.
The numbers are the harness's, not a measurement."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from peft_fast_bench import variants
from peft_fast_bench.main import main as bench_main

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU harness"),
    pytest.mark.usefixtures("keep_threads"),
]


def test_variants_suite_writes_its_record(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    argv = ["--suite", "variants", "--preset", "tiny", "--methods", "lokr", "--rounds", "2", "--out", str(out)]
    assert bench_main([*argv, "--no-plot"]) == 0
    [path] = out.iterdir()
    record = json.loads(path.read_text())
    assert path.name.startswith("cpu-variants-") and record["suite"] == "variants" and record["preset"] == "tiny"
    assert record["rounds"]["model"] == 2 and len(record["load_average_at_start"]) == 3
    rows = {(r["case"], r["library"]): r for r in record["rows"]}
    assert sorted(rows) == [("layer", "hf"), ("layer", "peft_fast"), ("model", "hf"), ("model", "peft_fast")]
    assert {r["method"] for r in record["rows"]} == {"lokr"}
    for r in record["rows"]:
        assert len(r["times_ms"]) == (2 if r["case"] == "model" else 6)
        assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"])) and r["median_ms"] > 0
        hf = rows[(r["case"], "hf")]
        assert r["speedup_vs_hf"] == pytest.approx(hf["median_ms"] / r["median_ms"])
    model = rows[("model", "peft_fast")]
    # Peak RSS from a fresh child process per variant: a positive size, compared with HF's.
    assert model["peak_how"].startswith("peak RSS of a fresh process")
    assert model["peak_mib"] > 0 and rows[("model", "hf")]["peak_mib"] > 0
    assert model["peak_vs_hf"] == pytest.approx(model["peak_mib"] / rows[("model", "hf")]["peak_mib"])
    assert model["trainable_params"] == rows[("model", "hf")]["trainable_params"] > 0
    assert model["first_loss"] == pytest.approx(rows[("model", "hf")]["first_loss"], rel=1e-5)  # same model
    assert math.isnan(rows[("layer", "hf")]["peak_mib"])  # not measured on CPU, and says so
    target = record["targets"]["lokr"]
    assert target["speedup_met"] == (target["speedup_vs_hf"] >= variants.TARGET_SPEEDUP)
    assert target["peak_met"] == (target["peak_vs_hf"] <= 1.0)
    printed = capsys.readouterr().out
    assert "target lokr:" in printed and "model  lokr     peft_fast" in printed


def test_a_method_joins_through_the_table(monkeypatch):
    """Another method is one register_method call: the suite builds it for both libraries."""
    monkeypatch.setattr(variants, "METHODS", dict(variants.METHODS))
    variants.register_method("lora", lambda lib, targets: lib.LoraConfig(r=4, target_modules=targets))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    import peft

    import peft_fast

    assert isinstance(variants.wrap("lora", "hf", model, ["0"]), peft.PeftModel)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert isinstance(variants.wrap("lora", "peft_fast", model, ["0"]), peft_fast.PeftModel)
    with pytest.raises(ValueError, match="without '-'"):
        variants.register_method("lo-ra", lambda lib, targets: None)
    with pytest.raises(ValueError, match="methods must be a non-empty list"):
        variants.run(variants.PRESETS["tiny"], torch.device("cpu"), methods=["nosuch"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--suite", "lora", "--methods", "loha"], "--methods: goes with --suite variants"),
        (
            ["--suite", "variants", "--methods", "oft"],
            "--methods: choose from ['adalora', 'dora', 'loha', 'lokr', 'vera']",
        ),
    ],
)
def test_variants_refusals(argv, message, capsys):
    # (peft_fast's methods in the suite: LoHa, LoKr, AdaLoRA, VeRA; OFT is not one)
    with pytest.raises(SystemExit) as e:
        bench_main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_adalora_step_runs_its_rank_allocation():
    """The suite's AdaLoRA model step calls update_and_allocate, as AdaLoRA training must."""
    preset = variants.PRESETS["tiny"]
    model = variants.wrap(
        "adalora", "peft_fast", variants.build_model(preset, torch.device("cpu"), torch.float32), "all-linear"
    )
    step = variants.Step(model, variants.make_batch(preset, torch.device("cpu")))
    for _ in range(11):  # deltaT = 10: the first mask at step 10
        step()
    assert step.global_step == 11 and model.peft_config["default"].rank_pattern is not None
    hf = variants.wrap("vera", "hf", variants.build_model(preset, torch.device("cpu"), torch.float32), "all-linear")
    assert variants.Step(hf, variants.make_batch(preset, torch.device("cpu"))).allocate is None
