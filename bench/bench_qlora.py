"""QLoRA on CPU: peak memory and training-step time of a ~100M-parameter Llama-shaped model,
4-bit (bitsandbytes NF4, double quantization, fp32 compute) vs full precision (fp32),
peft_fast vs HF peft + bitsandbytes, in the same run.

    python bench/bench_qlora.py [--reps 3] [--steps 4] [--tokens 128] [--out bench/results/...json]

Each (implementation, precision) case runs in its own fresh process, so its peak RSS is its
own; the cases are interleaved over `--reps` rounds and the JSON keeps every raw number with
the medians. Per case: the model is loaded (4-bit: `from_pretrained(quantization_config=...)`),
prepared with `prepare_model_for_kbit_training` (4-bit only, gradient checkpointing on, as the
QLoRA recipe does), LoRA r=16 on all linear layers, then one warm-up step and `--steps` timed
AdamW steps. "peak_rss_mib" is the process's peak resident memory (ru_maxrss); "train_rss_mib"
is how much it grew from after loading to the end of training; "base_weight_mib" is the base
model's weights as held (4-bit: packed codes plus statistics). Self-contained: needs torch,
transformers, peft, bitsandbytes and peft_fast; writes its checkpoint to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ~105M parameters: 8 layers of 768 wide (56M) + 32000 x 768 embeddings and head (49M).
LLAMA = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=512,
)
CASES = [("peft_fast", "fp32"), ("hf_peft", "fp32"), ("peft_fast", "4bit"), ("hf_peft", "4bit")]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> dict:
    """One case in this process: load, wrap, train; returns its numbers."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    impl, precision = args.impl, args.precision
    if impl == "peft_fast":
        import peft_fast as lib
    else:
        import peft as lib
    kw = {}
    if precision == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, device_map="cpu", **kw)
    load_s = time.perf_counter() - t0
    base_bytes = 0
    for p in model.parameters():
        base_bytes += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            base_bytes += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * 4
            if qs.state2 is not None:
                base_bytes += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4 + 4
    if precision == "4bit":
        for m in model.modules():  # training: no inference-only repacking by bitsandbytes
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        model = lib.prepare_model_for_kbit_training(model)
    config = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = lib.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, LLAMA["vocab_size"], (1, args.tokens), generator=g)
    rss_loaded = _rss_mib()
    times = []
    for step in range(args.steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - t)
    return {
        "impl": impl,
        "precision": precision,
        "load_s": load_s,
        "step_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rss_mib": _rss_mib() - rss_loaded,
        "base_weight_mib": base_bytes / 2**20,
        "trainable": sum(p.numel() for p in params),
        "loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds over the cases")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per case (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per step (batch 1)")
    parser.add_argument("--note", default="", help="free text saved with the results (e.g. machine load)")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/cpu-qlora-<date>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import bitsandbytes
    import peft
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_fast

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        runs = []
        for rep in range(args.reps):
            for impl, precision in CASES:
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--precision", precision]
                cmd += ["--checkpoint", tmp, "--steps", str(args.steps), "--tokens", str(args.tokens)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                result["rep"] = rep
                runs.append(result)
                print(
                    f"rep {rep} {impl:9s} {precision:4s} step {statistics.median(result['step_s']):.2f} s  "
                    f"peak {result['peak_rss_mib']:.0f} MiB  base {result['base_weight_mib']:.0f} MiB",
                    flush=True,
                )

    summary = {}
    for impl, precision in CASES:
        mine = [r for r in runs if r["impl"] == impl and r["precision"] == precision]
        summary[f"{impl}/{precision}"] = {
            "step_s_median": statistics.median(s for r in mine for s in r["step_s"]),
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in mine),
            "train_rss_mib_median": statistics.median(r["train_rss_mib"] for r in mine),
            "base_weight_mib": mine[0]["base_weight_mib"],
            "trainable": mine[0]["trainable"],
        }
    date = time.strftime("%Y%m%d-%H%M%S")
    record = {
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        "kind": "qlora-cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "peft_fast": peft_fast.__version__,
        },
        "date": date,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timer": "time.perf_counter per training step (forward, backward, AdamW); medians over reps x steps",
        "model": {"params": n_params, **LLAMA},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "tokens_per_step": args.tokens,
        "note": args.note,
        "summary": summary,
        "runs": runs,
    }
    out = args.out or Path(__file__).parent / "results" / f"cpu-qlora-{date}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
