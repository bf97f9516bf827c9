"""bench/timing.py (installed as peft_fast_bench.timing): CPU medians, device names, records."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch

from peft_fast_bench import timing


def test_cpu_medians_rank_known_durations_and_interleave():
    calls = []

    def sleeper(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return fn

    fns = {"a": sleeper("a", 0.002), "b": sleeper("b", 0.025), "c": sleeper("c", 0.0)}
    times = timing.median_times_ms(fns, cuda=False, rounds=5, warmup_s=0.0)
    assert list(times) == ["a", "b", "c"]
    # sleep() sleeps at least as long as asked; the median of 5 rounds stays below b's 25 ms
    # for a and c unless three of their five calls stall that long (a loaded machine stalls less)
    assert times["a"] >= 2.0 and times["b"] >= 25.0
    assert times["a"] < times["b"] and times["c"] < times["b"]
    timed = calls[-15:]  # the 5 rounds of 3 after warm-up; each round starts one variant later
    assert [timed[3 * k] for k in range(5)] == ["a", "b", "c", "a", "b"]
    assert all(sorted(timed[3 * k : 3 * k + 3]) == ["a", "b", "c"] for k in range(5))


def test_grads_are_reset_before_every_call():
    t = torch.ones(2, requires_grad=True)
    seen = []

    def fn():
        seen.append(t.grad is None)
        (t * 2).sum().backward()

    timing.median_times_ms({"f": fn}, cuda=False, grads={"f": [t]}, rounds=3, warmup_s=0.0)
    assert seen and all(seen)
    assert timing.median_ms(lambda: None, cuda=False, rounds=1) >= 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_medians_rank_known_work():
    """On CUDA the medians come from do_bench (events): 8x the matmul work takes longer."""
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2048, 8 * 2048, device="cuda", dtype=torch.bfloat16)
    times = timing.median_times_ms({"small": lambda: a @ a, "big": lambda: a @ b}, cuda=True)
    assert 0 < times["small"] < times["big"]


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        timing.median_times_ms({"f": lambda: None}, cuda=False, rounds=0)


@pytest.mark.parametrize(
    ("name", "slug"),
    [("NVIDIA H200", "nvidia-h200"), ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"), ("CPU (x86_64)", "cpu")],
)
def test_device_slug(name, slug):
    assert timing.device_slug(name) == slug


@dataclass
class _Row:
    variant: str
    ms: float


def test_record_holds_device_versions_date_command_and_raw_rows(tmp_path):
    rows = [_Row("linear", 1.5), _Row("torch_fp32", 3.25)]
    record = timing.make_record("lora", torch.device("cpu"), rows, argv=["--suite", "lora"], extra={"dtype": "fp32"})
    assert record["suite"] == "lora" and record["device"].startswith("CPU")
    assert record["command"] == "peft-fast bench --suite lora"
    assert record["versions"]["torch"] == torch.__version__ and "peft_fast" in record["versions"]
    assert record["kind"].startswith("cpu") and record["timer"] == timing.CPU_TIMER
    assert record["rows"] == [{"variant": "linear", "ms": 1.5}, {"variant": "torch_fp32", "ms": 3.25}]
    path = timing.write_record(tmp_path / "new", record)
    stamp = record["date"][:10].replace("-", "")
    assert path.parent == tmp_path / "new" and path.name.startswith(f"cpu-lora-{stamp}-")
    assert json.loads(path.read_text()) == record
