"""QLoRA suite (`--suite qlora`): training steps of a Llama-shaped causal LM with its base in
4 bits (bitsandbytes NF4, double quantization, fp32 compute) vs full precision (fp32),
peft_fast vs HF peft + bitsandbytes, in the same run.

Per case: the model is loaded from a checkpoint written once for the run (4-bit:
`from_pretrained(quantization_config=...)`), prepared with `prepare_model_for_kbit_training`
(4-bit only: gradient checkpointing on, as the QLoRA recipe does), wrapped with LoRA r=16 on
all linear layers, then trained for one warm-up and `steps` timed AdamW steps.

Each case runs in its own fresh process (`python -m peft_fast_bench.qlora --worker`), so its
peak resident memory is its own, and the cases are interleaved over `reps` rounds; a row is
the median over every round's steps, and the record keeps every raw number and the load
average around the run (a shared CPU machine swings 2-4x: compare ratios within one run).
The "tiny" preset runs its cases in this process instead (a harness check: its memory
columns are not per case, and the record says so).

Presets: "full" (the ~105M-parameter model, 128 tokens per step, 3 rounds of 4 steps), "cpu"
(the same model, 64 tokens, 2 rounds of 2 steps) and "tiny" (one small layer; `peft-fast bench`
then also runs the GPU layer benchmark's harness, bench/qlora_layers.py, on CPU). On CUDA the
suite is the per-layer benchmark instead (fused 4-bit matmul vs bitsandbytes vs an
Unsloth-style composite: bench/qlora_layers.py); it has not run on a GPU yet.

Memory: the whole process's peak RSS is mostly set by loading (transformers materializes and
quantizes the weights; the same code for both libraries) and by glibc keeping freed heap
(fragmentation, which swings tens of MiB between runs of one case); the training step's own
peak is recorded apart (see MEMORY), and the issue's CPU memory target is read on it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

# ~105M parameters: 8 layers of 768 wide (56M) + 32000 x 768 embeddings and head (49M).
LLAMA_100M = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
              "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 512}  # fmt: skip
LLAMA_TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
PRESETS = {
    "full": {"model": LLAMA_100M, "tokens": 128, "reps": 3, "steps": 4, "isolate": True},
    "cpu": {"model": LLAMA_100M, "tokens": 64, "reps": 2, "steps": 2, "isolate": True},
    "tiny": {"model": LLAMA_TINY, "tokens": 16, "reps": 1, "steps": 1, "isolate": False},
}
CASES = (("peft_fast", "fp32"), ("hf_peft", "fp32"), ("peft_fast", "4bit"), ("hf_peft", "4bit"))
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
YLABEL = "training step time / HF peft's at the same precision (lower is better)"
MEMORY = (
    "peak_rss_mib: the case's process peak RSS (VmHWM), imports and loading included; load_peak_mib: the "
    "peak up to the end of from_pretrained (transformers + bitsandbytes, the same code for both libraries); "
    "step_peak_mib: the peak RSS during the training steps (warm-up included) minus the RSS just before the "
    "first step (VmHWM reset with /proc/self/clear_refs), the issue's 'peak memory of the training step'; "
    "train_rss_mib: RSS growth over training; heap_in_use_mib: bytes malloc hands out (live memory, no "
    "fragmentation), before and after the steps"
)
SHARED_PROCESS = "cases share one process (tiny preset): the memory columns are not per case"
GPU_NUMBERS = "not measured: the per-layer GPU benchmark (--suite qlora on CUDA, qlora_layers.py) has not run on a GPU"


@dataclass
class QloraRow:
    """One (implementation, precision) case: medians over its rounds."""

    impl: str
    precision: str
    step_ms: float
    peak_rss_mib: float
    train_rss_mib: float
    load_peak_mib: float
    step_peak_mib: float
    base_weight_mib: float
    trainable_params: int
    last_loss: float
    step_ratio: float = math.nan  # over HF peft's step at the same precision


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: peak RSS, VmRSS, RssAnon, RssFile) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Make the peak RSS (VmHWM, and getrusage's ru_maxrss with it) start again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _heap_in_use_mib() -> float:
    """Bytes glibc's malloc hands out now (all arenas and mmapped chunks), in MiB: the memory
    live tensors hold, without what malloc keeps from earlier frees (fragmentation). NaN where
    the C library is not glibc."""
    import ctypes

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip  # noqa: E501

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return math.nan
    fn.restype = _Mallinfo2
    info = fn()
    return (info.uordblks + info.hblkhd) / 2**20


def _base_weight_bytes(model: torch.nn.Module) -> int:
    """The base model's weights as held: 4-bit layers count their packed codes and statistics."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * 4
            if qs.state2 is not None:
                total += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4 + 4
    return total


def run_case(case: dict) -> dict:
    """One case in this process (keys: impl, precision, checkpoint, tokens, steps, vocab,
    threads): load, prepare, wrap, train; returns its raw numbers."""
    if (case["impl"], case["precision"]) not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {(case['impl'], case['precision'])}")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    if case["impl"] == "peft_fast":
        import peft_fast as lib
    else:
        import peft as lib
    kw = {}
    if case["precision"] == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(case["checkpoint"], device_map="cpu", **kw)
    load_s = time.perf_counter() - t0
    load_peak = _status_mib("VmHWM")  # the process's peak so far: imports and loading (shared code)
    base_bytes = _base_weight_bytes(model)
    if case["precision"] == "4bit":
        for m in model.modules():  # training: no inference-only repacking by bitsandbytes
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        model = lib.prepare_model_for_kbit_training(model)
    model = lib.get_peft_model(model, lib.LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, case["vocab"], (1, case["tokens"]), generator=g)
    heap_before = _heap_in_use_mib()
    # VmHWM is kept lazily by the kernel (a read can come out a few pages under an earlier one):
    # every peak below is the largest of the reads that cover it.
    peak_before = max(load_peak, _status_mib("VmHWM"))
    _reset_peak_rss()  # from here VmHWM is the peak of the training steps alone
    rss_loaded = _status_mib("VmHWM")  # the RSS at the reset, as the kernel counts it for VmHWM
    times, loss = [], None
    for step in range(case["steps"] + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - t)
    step_peak = max(rss_loaded, _status_mib("VmHWM"))
    return {
        "impl": case["impl"],
        "precision": case["precision"],
        "load_s": load_s,
        "step_s": times,
        "peak_rss_mib": max(peak_before, step_peak),
        "train_rss_mib": _rss_mib() - rss_loaded,
        "load_peak_mib": load_peak,
        "rss_before_steps_mib": rss_loaded,
        "step_peak_mib": step_peak - rss_loaded,
        "heap_in_use_mib": {"before_steps": heap_before, "after_steps": _heap_in_use_mib()},
        "rss_file_mib": _status_mib("RssFile"),
        "base_weight_mib": base_bytes / 2**20,
        "trainable": sum(p.numel() for p in params),
        "loss": loss.item(),
    }


def _run_isolated(case: dict) -> dict:
    cmd = [sys.executable, "-m", "peft_fast_bench.qlora", "--worker", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case['impl']}/{case['precision']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(preset: dict, device: torch.device) -> tuple[list[QloraRow], dict]:
    """Every case, interleaved over preset["reps"] rounds: (rows, facts for the record)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if device.type != "cpu":
        raise ValueError(f"the qlora suite measures the CPU training step; got device {device} ({GPU_NUMBERS})")
    load_before = os.getloadavg()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**preset["model"]))
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        for rep in range(preset["reps"]):
            for impl, precision in CASES:
                case = {"impl": impl, "precision": precision, "checkpoint": tmp, "tokens": preset["tokens"],
                        "steps": preset["steps"], "vocab": preset["model"]["vocab_size"],
                        "threads": torch.get_num_threads()}  # fmt: skip
                result = _run_isolated(case) if preset["isolate"] else run_case(case)
                result["rep"] = rep
                runs.append(result)
                print(
                    f"round {rep} {impl:9s} {precision:4s} step {statistics.median(result['step_s']):.3f} s  "
                    f"peak {result['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    rows = []
    for impl, precision in CASES:
        mine = [r for r in runs if r["impl"] == impl and r["precision"] == precision]
        rows.append(
            QloraRow(
                impl=impl,
                precision=precision,
                step_ms=1e3 * statistics.median(s for r in mine for s in r["step_s"]),
                peak_rss_mib=statistics.median(r["peak_rss_mib"] for r in mine),
                train_rss_mib=statistics.median(r["train_rss_mib"] for r in mine),
                load_peak_mib=statistics.median(r["load_peak_mib"] for r in mine),
                step_peak_mib=statistics.median(r["step_peak_mib"] for r in mine),
                base_weight_mib=mine[0]["base_weight_mib"],
                trainable_params=mine[0]["trainable"],
                last_loss=mine[-1]["loss"],
            )
        )
    for r in rows:
        hf = next(h for h in rows if h.impl == "hf_peft" and h.precision == r.precision)
        r.step_ratio = r.step_ms / hf.step_ms
    import bitsandbytes

    extra = {
        "model": {"params": n_params, **preset["model"]},
        "lora": LORA,
        "quantization": "bitsandbytes NF4, double quantization, compute dtype fp32",
        "tokens_per_step": preset["tokens"],
        "steps": {"warmup": 1, "timed": preset["steps"], "rounds": preset["reps"], "statistic": "median step time"},
        "threads": torch.get_num_threads(),
        "isolated_processes": preset["isolate"],
        "memory": MEMORY if preset["isolate"] else SHARED_PROCESS,
        "targets": memory_targets(rows),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "bitsandbytes": bitsandbytes.__version__,
        "gpu_numbers": GPU_NUMBERS,
        "runs": runs,
    }
    return rows, extra


def memory_targets(rows: list[QloraRow]) -> dict[str, float | bool]:
    """The issue's memory target, "CPU peak memory of the 4-bit training step <= HF peft +
    bitsandbytes", read on the step's own peak (step_peak_mib), with the whole process's peak
    (loading included) beside it."""
    ours = next(r for r in rows if r.impl == "peft_fast" and r.precision == "4bit")
    hf = next(r for r in rows if r.impl == "hf_peft" and r.precision == "4bit")
    return {
        "step_peak_mib": ours.step_peak_mib,
        "hf_step_peak_mib": hf.step_peak_mib,
        "step_peak_vs_hf": ours.step_peak_mib / hf.step_peak_mib if hf.step_peak_mib > 0 else math.nan,
        "step_peak_met": ours.step_peak_mib <= hf.step_peak_mib,
        "process_peak_vs_hf": ours.peak_rss_mib / hf.peak_rss_mib,
    }


def table(rows: list[QloraRow]) -> str:
    """A printable table of `rows`."""
    head = f"{'impl':<10} {'prec':<5} {'step ms':>9} {'/hf':>6} {'peak MiB':>9} {'load pk':>8} {'step pk':>8} {'train MiB':>9} {'base MiB':>9} {'trainable':>10}"  # noqa: E501
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.impl:<10} {r.precision:<5} {r.step_ms:>9.1f} {r.step_ratio:>6.2f} {r.peak_rss_mib:>9.0f} "
            f"{r.load_peak_mib:>8.0f} {r.step_peak_mib:>8.0f} {r.train_rss_mib:>9.0f} {r.base_weight_mib:>9.1f} "
            f"{r.trainable_params:>10,}"
        )
    t = memory_targets(rows)
    lines.append(
        f"4-bit training step peak (RSS during the steps minus RSS before them): {t['step_peak_mib']:.0f} MiB vs "
        f"HF peft + bitsandbytes {t['hf_step_peak_mib']:.0f} MiB ({t['step_peak_vs_hf']:.2f}x; target <= 1: "
        f"{'met' if t['step_peak_met'] else 'MISSED'}); whole-process peak {t['process_peak_vs_hf']:.2f}x HF's"
    )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """peft_fast's step time over HF peft's, per precision (for the plot)."""
    return {"qlora step": {r["precision"]: r["step_ratio"] for r in rows if r["impl"] == "peft_fast"}}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit("usage: python -m peft_fast_bench.qlora --worker CASE_JSON (run by `peft-fast bench`)")
    print(json.dumps(run_case(json.loads(sys.argv[2]))))
