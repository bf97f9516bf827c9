"""One training step of LoHa and LoKr: peft_fast vs HF peft, same run, interleaved.

    python bench/variants.py                       # Llama-shaped ~100M model, CPU, writes bench/results/
    python bench/variants.py --layers 2 --rounds 2 # a quick check of the harness
    python bench/variants.py --layer-only          # one adapted Linear, many interleaved repeats

`--layer-only` times forward + backward of one adapted nn.Linear (--hidden -> --intermediate,
batch x seq rows) per variant, --layer-repeats interleaved repeats: short calls whose median
stays readable on a busy machine, where whole-model steps are noisy.

The model is a randomly initialised LlamaForCausalLM (hidden 768, 12 layers, intermediate 2048,
vocab 8192: ~98M parameters) built from its config, so nothing is downloaded. Each variant
(method x library) wraps its own copy of the same base weights with HF peft's default config
(r=8, alpha=8) on all linear layers. A step is forward + backward + AdamW step on a fixed batch.
Rounds run the variants one after another (interleaved), so load changes on the machine hit
all of them alike; the numbers are medians over rounds.

Memory, two ways per variant:
- `saved_for_backward_bytes`: the bytes of distinct tensors autograd holds for backward at the
  end of the forward (parameters excluded), measured in this process with saved-tensor hooks;
  this is where HF peft's per-layer ΔW shows up.
- `peak_rss_bytes`: the peak resident memory of a fresh child process that builds the model and
  runs two steps, minus its resident memory just before the first step.
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
import time
from pathlib import Path

import torch

VARIANTS = ("hf-loha", "peft_fast-loha", "hf-lokr", "peft_fast-lokr")
RESULTS = Path(__file__).resolve().parent / "results"


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(512, args.seq),
    )
    return LlamaForCausalLM(config)


def wrap(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    """The model with the variant's adapter: HF peft's default LoHa/LoKr config on all linear layers."""
    library, method = variant.split("-")
    if library == "hf":
        import peft as lib
    else:
        import peft_fast as lib
    cls = lib.LoHaConfig if method == "loha" else lib.LoKrConfig
    torch.manual_seed(1)
    return lib.get_peft_model(model, cls(target_modules="all-linear", task_type="CAUSAL_LM"))


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return {"input_ids": ids, "labels": ids}


class Step:
    """One training step of a wrapped model (forward, backward, AdamW)."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.model = model.train()
        self.batch = batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)

    def __call__(self) -> float:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def saved_for_backward_bytes(self) -> int:
        """Bytes of distinct non-parameter tensors that autograd keeps for the backward of one forward."""
        param_ptrs = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in param_ptrs:
                storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return sum(storages.values())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: print the variant's peak RSS over two steps, above the RSS before them."""
    step = Step(wrap(args.memory_child, build_model(args)), make_batch(args))
    before = _rss_bytes()
    reset = _reset_peak_rss()
    step()
    step()
    peak = _peak_rss_bytes()
    print(json.dumps({"peak_rss_bytes": peak - before, "rss_before_bytes": before, "peak_mark_reset": reset}))


def layer_times(args: argparse.Namespace) -> dict[str, list[float]]:
    """Forward + backward seconds of one adapted Linear per variant, interleaved repeats."""
    x = torch.randn(args.batch * args.seq, args.hidden, generator=torch.Generator().manual_seed(3))
    layers = {}
    for v in VARIANTS:
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(args.hidden, args.intermediate, bias=False))
        library, method = v.split("-")
        lib = __import__("peft" if library == "hf" else "peft_fast")
        cls = lib.LoHaConfig if method == "loha" else lib.LoKrConfig
        # init_weights=False: both factors random, so no gradient is trivially zero.
        layers[v] = lib.get_peft_model(base, cls(target_modules=["0"], init_weights=False)).train()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.layer_repeats + 1):
        for v, m in layers.items():
            t0 = time.perf_counter()
            m(x).sum().backward()
            if rep > 0:
                times[v].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--layer-only", action="store_true", help="time one adapted Linear instead of the model")
    p.add_argument("--layer-repeats", type=int, default=30)
    p.add_argument("--no-memory-children", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/cpu-variants-<date>.json)")
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    load_start = os.getloadavg()
    if args.layer_only:
        write_layer_result(args, layer_times(args), load_start)
        return
    batch = make_batch(args)
    steps = {}
    for v in VARIANTS:
        steps[v] = Step(wrap(v, build_model(args)), batch)
    n_params = sum(p.numel() for p in steps[VARIANTS[0]].model.parameters())
    trainable = {v: sum(p.numel() for p in s.params) for v, s in steps.items()}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds + 1):
        took = {}
        for v in VARIANTS:
            t0 = time.perf_counter()
            loss = steps[v]()
            took[v] = time.perf_counter() - t0
            if round_ > 0:  # round 0 warms up
                times[v].append(took[v])
                losses[v].append(loss)
        print(f"round {round_}: " + ", ".join(f"{v} {t:.3f}s" for v, t in took.items()), flush=True)
    saved = {v: s.saved_for_backward_bytes() for v, s in steps.items()}
    del steps

    peak_rss: dict[str, dict | None] = {v: None for v in VARIANTS}
    if not args.no_memory_children:
        shape = ("layers", "hidden", "intermediate", "heads", "vocab", "batch", "seq", "threads")
        forwarded = [f"--{name}={getattr(args, name)}" for name in shape]
        for v in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, *forwarded, "--memory-child", v],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            peak_rss[v] = json.loads(out.strip().splitlines()[-1])

    medians = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "suite": "variants",
        "what": "one training step (forward + backward + AdamW) of a Llama-shaped model, LoHa/LoKr at HF "
        "peft's default r=8, alpha=8 on all linear layers; peft_fast vs HF peft, interleaved rounds, medians",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "bench/variants.py", *sys.argv[1:]]),
        **environment(load_start),
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "vocab": args.vocab,
            "parameters": n_params,
            "batch": args.batch,
            "seq": args.seq,
        },
        "trainable_parameters": trainable,
        "step_seconds": times,
        "median_step_seconds": medians,
        "losses": losses,
        "speedup_vs_hf": {m: medians[f"hf-{m}"] / medians[f"peft_fast-{m}"] for m in ("loha", "lokr")},
        "saved_for_backward_bytes": saved,
        "peak_rss": peak_rss,
    }
    out = args.out or RESULTS / f"cpu-variants-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_seconds", "speedup_vs_hf", "saved_for_backward_bytes")}))
    print(f"wrote {out}")


def environment(load_start: tuple[float, float, float]) -> dict:
    """Device and versions, for a results file."""
    import peft
    import transformers

    import peft_fast

    return {
        "device": {
            "kind": "cpu",
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg(),
            "note": "shared machine: other jobs were running (see load averages); ratios within one run "
            "are the meaningful numbers, absolute times are inflated",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "peft_fast": peft_fast.__version__,
        },
    }


def write_layer_result(args: argparse.Namespace, times: dict[str, list[float]], load_start) -> None:
    medians = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "suite": "variants-layer",
        "what": f"forward + backward of one nn.Linear {args.hidden}->{args.intermediate} with LoHa/LoKr "
        f"(r=8, alpha=8, init_weights=False), {args.batch * args.seq} rows; peft_fast vs HF peft, "
        "interleaved repeats, medians",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "bench/variants.py", *sys.argv[1:]]),
        **environment(load_start),
        "seconds": times,
        "median_seconds": medians,
        "speedup_vs_hf": {m: medians[f"hf-{m}"] / medians[f"peft_fast-{m}"] for m in ("loha", "lokr")},
    }
    out = args.out or RESULTS / f"cpu-variants-layer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "speedup_vs_hf")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
