"""bench/gpu_round.sh (its --dry-run on CPU), bench/report.py and bench/ingest.py.

The ingester is tested on a copy of the repository files it touches (README.md,
bench/NOTES.md, peft_fast/ops/backend_table.json) in tmp_path, never on the real ones; its
input is a synthetic GPU round whose numbers are set by hand, so every cell, order and miss
it should produce is known in advance."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peft_fast.ops import dispatch
from peft_fast_bench import ingest as ingest_mod
from peft_fast_bench.main import main as bench_main
from peft_fast_bench.report import load_round, misses

REPO = Path(__file__).resolve().parents[2]
STAGES = ["install", "backends", "gpu-tests", "kernel-tests", "audit", "bench", "e2e", "methods"]


@pytest.fixture
def repo(tmp_path):
    """A copy of the files the ingester touches, laid out as in the repository."""
    root = tmp_path / "repo"
    for rel in ("README.md", "bench/NOTES.md", "peft_fast/ops/backend_table.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    return root


# -- the dry run ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_dry_run_runs_every_stage_and_its_output_files_in(tmp_path, repo):
    out = tmp_path / "round"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_round.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p for p in out.iterdir())
    assert all(p.is_file() for p in files) and len(files) <= 8
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == STAGES
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert all(status[s] == "ok" for s in STAGES)  # the dry run's audit stage checks the command only
    assert not (out / "stages.tsv").exists()  # its content lives in summary.json
    rnd = load_round(out)
    assert set(rnd.records) == {"quick", "e2e"} and not rnd.is_gpu
    assert set(rnd.records["quick"]["parts"]) == {"lora", "ia3", "sgmv"}
    e2e = rnd.records["e2e"]
    assert e2e["errors"] == {} and [r["variant"] for r in e2e["rows"]] == [
        "frozen",
        "peft",
        "peft_fast_auto",
        "peft_patch",
        "peft_fast_fsdp2",
    ]
    first = {r["variant"]: r["first_loss"] for r in e2e["rows"]}
    assert max(first.values()) - min(first.values()) < 1e-4  # B = 0: all five are the frozen model
    assert "gloo" in e2e["fsdp2"]  # the FSDP2 wrapping ran on a 1-process gloo group
    assert "bench/results/<device>-<date>/" in e2e["gpu_numbers"]
    assert len(rnd.tests) == 2  # both test stages ended with pytest's result line
    tail = proc.stdout.strip().splitlines()
    assert "e2e training step" in proc.stdout and tail[-1].startswith("0 stage(s) failed")
    log = (out / "round.log").read_text()
    # the methods stage ran qlora's tiny preset: the CPU model step and the GPU layer benchmark's harness
    assert "[qlora] tiny preset" in log and "[qlora] layers, tiny preset" in log and "suite qlora: exit" not in log

    # the same folder through the ingester (a CPU round needs allow_cpu)
    dest = ingest_mod.ingest(out, repo=repo, allow_cpu=True)
    assert sorted(p.name for p in dest.iterdir()) == [p.name for p in files]
    assert "LoRA 32→48, 16 tokens, r=4, p=0.1" in (repo / "README.md").read_text()


def test_stage_limits_add_up_to_600_seconds():
    """On a GPU the stages' limits add up to the round's 600 s, and the methods stage's suites fit in its own."""
    script = (REPO / "bench" / "gpu_round.sh").read_text()
    limits = {}
    for line in script.splitlines():
        found = re.match(r'\s*(?:\[ "\$DRY" = 1 \] \|\| )?stage (\S+) (\d+) ', line)
        if found and "dry run: not installing" not in line:  # the dry run's install replaces the real one
            limits[found[1]] = int(found[2])
    limits["summary"] = int(re.search(r"limit summary (\d+)", script)[1])
    assert set(limits) == {*STAGES, "nvidia-smi", "summary"} and sum(limits.values()) == 600
    suites = re.search(r'^METHOD_SUITES="([^"]+)"', script, re.M)[1].split()
    assert {s.split(":")[0] for s in suites} == {"variants", "xlora", "qlora"}
    assert sum(int(s.split(":")[1]) for s in suites) <= limits["methods"]


# -- a synthetic GPU round -------------------------------------------------------------------------
DATE = "2026-11-29T09:00:00+00:00"


def _lora(M, ms, ratios):
    names = ["linear", "peft_fp32", "torch_bf16", "triton_bf16", "cuda_bf16"]
    return [
        {"K": 4096, "N": 4096, "M": M, "r": 16, "dropout": 0.1, "variant": v, "fwd_bwd_ms": ms * q, "fwd_bwd_ratio": q}
        for v, q in zip(names, ratios)
    ]


def _record(suite, **extra):
    return {
        "suite": suite,
        "device": "NVIDIA H200",
        "kind": "gpu",
        "versions": {"torch": "2.11.0"},
        "date": DATE,
        **extra,
    }


def _gpu_round(folder: Path) -> Path:
    folder.mkdir()
    lora = _lora(8192, 2.0, [1.0, 1.5, 1.2, 1.1, 1.3]) + _lora(128, 0.1, [1.0, 2.5, 1.2, 1.6, 1.4])
    ia3 = [
        {
            "K": 4096,
            "N": 14336,
            "M": 8192,
            "feedforward": False,
            "variant": v,
            "fwd_bwd_ms": 3.0 * q,
            "fwd_bwd_ratio": q,
        }
        for v, q in [("linear", 1.0), ("peft", 1.4), ("torch", 1.3), ("triton", 1.05)]
    ]
    sgmv = [
        {"phase": "decode", "K": 4096, "N": 4096, "tokens": 64, "ranks": "16", "popularity": "zipf", "variant": v,
         "fwd_ms": 0.05 * q, "ratio_to_linear": q}
        for v, q in [("linear", 1.0), ("peft", 9.0), ("loop", 6.0), ("gather_bmm", 3.0), ("triton", 2.0)]
    ]  # fmt: skip
    quick = _record(
        "quick",
        parts={
            "lora": {"rows": lora, "backends_left_out": {}},
            "ia3": {"rows": ia3, "backends_left_out": {"cuda": "build failed (synthetic)"}},
            "sgmv": {"rows": sgmv},
        },
    )
    e2e_rows = [
        {"variant": v, "tokens_per_s": t, "step_ratio": q, "peak_mib": m, "first_loss": 10.4}
        for v, t, q, m in [("frozen", 40000, 1.0, 9000), ("peft", 20000, 2.0, 15000),
                           ("peft_fast_auto", 25000, 1.6, 13000), ("peft_patch", 18000, 2.2, 14000)]
    ]  # fmt: skip
    e2e = _record("e2e", rows=e2e_rows, errors={}, model={"hidden": 2048, "layers": 16, "seq": 2048})
    (folder / "nvidia-h200-quick-20261129-090000.json").write_text(json.dumps(quick))
    (folder / "nvidia-h200-quick-20261129-090000.png").write_bytes(b"\x89PNG synthetic")
    (folder / "nvidia-h200-e2e-20261129-090200.json").write_text(json.dumps(e2e))
    (folder / "tests.log").write_text("....\n===== 10 passed, 2 skipped in 3.0s =====\n")
    audit = {"rows": [{}, {}, {}], "findings": ["lora_expand/fwd [k] sm90 bf16: spills (8 stack bytes, 0 local bytes)"]}
    (folder / "audit.json").write_text(json.dumps(audit))
    stages = [{"stage": s, "rc": 0, "seconds": 5} for s in STAGES[:-1]] + [{"stage": "e2e", "rc": 124, "seconds": 90}]
    (folder / "summary.json").write_text(json.dumps({"stages": stages}))
    return folder


def test_ingest_files_a_gpu_round(tmp_path, repo, monkeypatch):
    rnd_dir = _gpu_round(tmp_path / "round")
    readme_before = (repo / "README.md").read_text()
    notes_before = (repo / "bench/NOTES.md").read_text()
    dest = ingest_mod.ingest(rnd_dir, repo=repo)

    assert dest == repo / "bench/results/nvidia-h200-20261129"
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in rnd_dir.iterdir())

    readme = (repo / "README.md").read_text()
    head, rest = readme_before.split(ingest_mod.START)
    assert readme.startswith(head + ingest_mod.START) and readme.endswith(
        ingest_mod.END + rest.split(ingest_mod.END)[1]
    )
    section = readme.split(ingest_mod.START)[1].split(ingest_mod.END)[0]
    assert "NVIDIA H200, 2026-11-29 (torch 2.11.0)" in section
    assert "| LoRA 4096→4096, 8192 tokens, r=16, p=0.1 | 2.000 | 1.50 | 1.20 | 1.10 | 1.30 |" in section
    assert "| LoRA 4096→4096, 128 tokens, r=16, p=0.1 | 0.100 | 2.50 | 1.20 | 1.60 | 1.40 |" in section
    assert "| IA³ 4096→14336, 8192 tokens, attention | 3.000 | 1.40 | 1.30 | 1.05 | – |" in section
    assert "| mixed decode 4096→4096, 64 tokens, r=16, zipf | 0.050 | 9.00 | 6.00 | 3.00 | 2.00 |" in section
    assert "| peft_fast_auto | 25000 | 1.60 | 13000 |" in section
    assert "[quick](bench/results/nvidia-h200-20261129/nvidia-h200-quick-20261129-090000.png)" in section

    # the default table "auto" reads: per shape class, backends by fwd+bwd time (bf16 rows)
    monkeypatch.setattr(dispatch, "_table_cache", None)
    table = dispatch.load_backend_table(repo / "peft_fast/ops/backend_table.json")
    assert table["entries"] == {"lora_linear": {"tokens<=256": ["torch", "cuda", "triton"],
                                                "tokens>4096": ["triton", "torch", "cuda"]}}  # fmt: skip
    assert table["source"] == "bench/results/nvidia-h200-20261129/nvidia-h200-quick-20261129-090000.json"

    notes = (repo / "bench/NOTES.md").read_text()
    assert notes.startswith(notes_before)
    added = notes[len(notes_before) :]
    expected = [
        "- e2e: timed out after 90 s (90 s)",
        "- tests: 10 passed, 2 skipped in 3.0s",
        "- stage e2e timed out after 90 s",
        "- LoRA 4096→4096, 128 tokens, r=16, p=0.1: triton 1.60× linear, slower than the torch composition (1.20×)",
        "- LoRA 4096→4096, 128 tokens, r=16, p=0.1: cuda 1.40× linear, slower than the torch composition (1.20×)",
        "- LoRA 4096→4096, 8192 tokens, r=16, p=0.1: cuda 1.30× linear, slower than the torch composition (1.20×)",
        "- ia3: backend cuda did not run (build failed (synthetic))",
        "- e2e: peft_patch 18000 tokens/s, slower than HF peft (20000)",
        "- audit: lora_expand/fwd [k] sm90 bf16: spills (8 stack bytes, 0 local bytes)",
    ]
    for line in expected:
        assert line in added.splitlines(), line
    assert len(misses(load_round(rnd_dir))) == 7  # the seven "- " lines above that are misses, no others

    again = ingest_mod.ingest(rnd_dir, repo=repo)  # a second round of the same day
    assert again.name == "nvidia-h200-20261129-2"
    assert (repo / "README.md").read_text().count(ingest_mod.START) == 1


def test_ingest_refuses_and_writes_nothing(tmp_path, repo, capsys):
    rnd_dir = _gpu_round(tmp_path / "round")
    cpu = json.loads((rnd_dir / "nvidia-h200-e2e-20261129-090200.json").read_text())
    cpu_dir = tmp_path / "cpu"
    cpu_dir.mkdir()
    (cpu_dir / "cpu-e2e.json").write_text(json.dumps({**cpu, "device": "CPU (x86_64)", "kind": "cpu (harness)"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    snapshot = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    with pytest.raises(ValueError, match=r"CPU \(dry-run\) round"):
        ingest_mod.ingest(cpu_dir, repo=repo)
    with pytest.raises(ValueError, match="holds no benchmark record"):
        ingest_mod.ingest(empty, repo=repo)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest_mod.ingest(tmp_path / "missing", repo=repo)
    assert bench_main(["--ingest", str(cpu_dir), "--repo", str(repo)]) == 1
    assert "peft-fast bench --ingest: error" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == snapshot

    (repo / "README.md").write_text("# no markers\n")
    with pytest.raises(ValueError, match="must hold one <!-- bench:headline:start -->"):
        ingest_mod.ingest(rnd_dir, repo=repo)
    with pytest.raises(ValueError, match="not a peft_fast source checkout: README.md is missing"):
        ingest_mod.ingest(rnd_dir, repo=tmp_path / "round")
