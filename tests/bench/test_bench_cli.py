"""`peft-fast bench` (bench/main.py through peft_fast/cli.py) on CPU with the tiny preset:
what it writes, where, and what it refuses. The numbers are the harness's, not a measurement."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peft_fast.cli import main as cli_main
from peft_fast.ops import dispatch
from peft_fast_bench import lora
from peft_fast_bench.main import main as bench_main

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU harness and its refusals"),
    pytest.mark.usefixtures("keep_threads"),
]


def test_lora_suite_writes_one_record_under_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    out = tmp_path / "results"
    assert cli_main(["bench", "--suite", "lora", "--preset", "tiny", "--rounds", "2", "--out", str(out)]) == 0
    files = sorted(out.iterdir())
    assert [f.suffix for f in files if f.suffix == ".json"] == [".json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    record = json.loads(files[0].read_text())
    assert record["suite"] == "lora" and record["preset"] == "tiny"
    assert record["command"] == f"peft-fast bench --suite lora --preset tiny --rounds 2 --out {out}"
    rows = record["rows"]
    assert [r["variant"] for r in rows] == ["linear", "peft_fp32", "torch_fp32"]
    base = rows[0]
    for r in rows:  # ratios are the raw medians over bare linear's, phase by phase
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and math.isnan(r["peak_mib"])
        assert r["fwd_bwd_ratio"] == pytest.approx(r["fwd_bwd_ms"] / base["fwd_bwd_ms"])
        assert r["bwd_ratio"] == pytest.approx(r["bwd_ms"] / base["bwd_ms"])
    assert "wrote" in capsys.readouterr().out


def test_without_out_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench_main(["--suite", "ia3", "--preset", "tiny", "--rounds", "1"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "no --out given: nothing written" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--write-table", "t.json"], "--write-table: needs a CUDA GPU"),
        (["--ingest", "x", "--suite", "lora"], "--ingest: cannot be combined with --suite"),
        (["--repo", "."], "--repo and --allow-cpu go with --ingest only"),
        (["--rounds", "0"], "--rounds: must be >= 1"),
        (["--suite", "e2e", "--rounds", "3"], "--rounds: the e2e suite times whole training steps"),
        (["--quick", "--preset", "tiny"], "--quick: give either --quick or --preset tiny"),
        (["--no-plot"], "--no-plot: goes with --out"),
    ],
)
def test_refusals_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_backend_table_orders_backends_by_measured_time(tmp_path, monkeypatch):
    """A GPU run's rows (synthetic here) become a table that dispatch loads and "auto" follows."""

    def row(M, variant, ms):
        return lora.Row(64, 64, M, 8, 0.0, variant, ms, ms, ms, 0.0)

    rows = [row(128, "linear", 1.0), row(128, "triton_bf16", 3.0), row(128, "cuda_bf16", 2.0),
            row(128, "cuda_fp32", 0.5), row(128, "peft_bf16", 0.1), row(8192, "triton_bf16", 1.0),
            row(8192, "cuda_bf16", 4.0), row(8192, "torch_bf16", 2.0)]  # fmt: skip
    table = lora.backend_table_from_rows(rows, "bench/results/x.json", "GPU")
    assert table["entries"]["lora_linear"] == {
        "tokens<=256": ["cuda", "triton"],
        "tokens>4096": ["triton", "torch", "cuda"],
    }
    assert table["source"] == "bench/results/x.json"
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(dispatch, "_table_cache", None)
    dispatch.load_backend_table(path)
    # measured first, then "auto"'s composite-only default without them
    small = torch.empty(100, 8, device="meta")
    assert dispatch.auto_order("lora_linear", small) == ("cuda", "triton", "triton_composite", "torch")
