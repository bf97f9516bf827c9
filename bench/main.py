"""`peft-fast bench`: run a benchmark suite, print its table, and keep its record under --out.

Suites (each in its own module of this package):
  lora    one LoRA adapter on one linear layer (lora.py)
  ia3     IA³ on one linear layer (ia3.py)
  sgmv    one linear layer serving many LoRA adapters in one batch (sgmv.py)
  quick   lora, ia3 and sgmv in one process, one record and one figure (the GPU round's preset)
  e2e     a training step of a Llama-shaped model: frozen, HF peft, peft_fast, HF peft + patch_peft (e2e.py)
  variants  LoRA's variants (LoHa, LoKr, ...: variants.METHODS) vs HF peft: model step and one layer (variants.py)
  qlora   CPU: a training step of a Llama-shaped model in 4 bits vs fp32, peft_fast vs HF peft + bitsandbytes,
          with each case's peak memory (qlora.py; presets cpu, tiny and full; tiny also runs the layer
          harness below under TRITON_INTERPRET=1); CUDA: one 4-bit LoRA layer, fused vs HF peft +
          bitsandbytes vs an Unsloth-style composite (qlora_layers.py; presets full and quick)
  xlora   X-LoRA forward and training step at 2-16 experts vs HF peft's X-LoRA and plain LoRA (xlora.py)

Presets: "full" and "quick" are GPU sizes (default on CUDA: full; --quick: quick); "cpu" is
the CPU default (small shapes, the harness only: GPU numbers are not measured); "tiny" is
the smallest, for dry runs. Every variant of a case is timed in the same run, so its numbers
read as ratios over the bare frozen linear (timing.py says how times are taken).

Nothing is written unless asked: `--out DIR` keeps the JSON record (device, versions, date,
command, raw numbers) and a PNG of the ratios when matplotlib is installed; `--write-table
PATH` (GPU) writes the backend table measured by this run, which "auto" follows once
$PEFT_FAST_BACKEND_TABLE names it (this process follows it at once). `--ingest DIR` files a
GPU round's results into the repository instead (ingest.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import e2e, ia3, lora, qlora, qlora_layers, sgmv, variants, xlora
from .plot import plot_ratios
from .timing import CPU_ROUNDS, device_name, make_record, write_record

SUITES = {"lora": lora, "ia3": ia3, "sgmv": sgmv, "xlora": xlora}
QUICK_SUITES = ("lora", "ia3", "sgmv")
PRESETS = ("full", "quick", "cpu", "tiny")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `peft-fast bench`."""
    parser = argparse.ArgumentParser(
        prog="peft-fast bench",
        description="Benchmarks: peft_fast's ops against bare frozen linear layers and HF peft, in one run.",
        epilog="Suites: lora, ia3, sgmv (many adapters per batch), quick (lora + ia3 + sgmv, one record), "
        "e2e (training step of a Llama-shaped model), variants (LoHa, LoKr, ... vs HF peft), "
        "qlora (4-bit vs fp32 training step, ours vs HF peft), xlora (X-LoRA vs HF peft's, 2-16 experts).",
    )
    parser.add_argument(
        "--suite", choices=(*SUITES, "quick", "e2e", "variants", "qlora"), default="lora", help="default: %(default)s"
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        help="sizes: full/quick (GPU), cpu (default without a GPU), tiny (dry runs); default: full on CUDA",
    )
    parser.add_argument("--quick", action="store_true", help="same as --preset quick on a GPU (the CPU preset on CPU)")
    parser.add_argument("--out", type=Path, help="directory for the JSON record and PNG (default: write nothing)")
    parser.add_argument("--no-plot", action="store_true", help="with --out: skip the PNG")
    parser.add_argument(
        "--rounds", type=int, default=CPU_ROUNDS, help="CPU only: interleaved timing rounds (default %(default)s)"
    )
    parser.add_argument(
        "--write-table",
        type=Path,
        metavar="PATH",
        help="GPU, suites lora/quick: write the backend table measured by this run to PATH",
    )
    parser.add_argument("--methods", help="suite variants: comma-separated methods (default: all of variants.METHODS)")
    parser.add_argument("--ingest", type=Path, metavar="DIR", help="file a GPU round's output folder (see ingest.py)")
    parser.add_argument(
        "--repo", type=Path, help="with --ingest: the repository checkout to update (default: the one holding bench/)"
    )
    parser.add_argument(
        "--allow-cpu", action="store_true", help="with --ingest: accept a CPU (dry-run) round, for testing the ingester"
    )
    return parser


def _preset(args: argparse.Namespace, cuda: bool) -> str:
    if args.preset:
        return args.preset
    if not cuda:
        return "cpu"
    return "quick" if args.quick else "full"


def main(argv: list[str] | None = None) -> int:
    """Run `peft-fast bench` with `argv` (None: the process's arguments); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ingest is not None:
        given = [f for f in ("--suite", "--preset", "--quick", "--out", "--write-table") if _given(argv, f)]
        if given:
            parser.error(f"argument --ingest: cannot be combined with {given[0]}")
        from .ingest import ingest

        try:
            ingest(args.ingest, repo=args.repo, allow_cpu=args.allow_cpu)
        except (ValueError, FileNotFoundError) as e:
            print(f"peft-fast bench --ingest: error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.repo is not None or args.allow_cpu:
        parser.error("arguments --repo and --allow-cpu go with --ingest only")
    if args.rounds < 1:
        parser.error(f"argument --rounds: must be >= 1, got {args.rounds}")
    if args.suite in ("e2e", "qlora") and _given(argv, "--rounds"):
        parser.error(
            f"argument --rounds: the {args.suite} suite times whole training steps (its preset sets the steps)"
        )
    if args.methods is not None and args.suite != "variants":
        parser.error("argument --methods: goes with --suite variants")
    if args.quick and args.preset is not None:
        parser.error(f"argument --quick: give either --quick or --preset {args.preset}, not both")
    if args.no_plot and args.out is None:
        parser.error("argument --no-plot: goes with --out (nothing is written without it)")
    cuda = torch.cuda.is_available()
    if args.write_table is not None:
        if not cuda:
            parser.error("argument --write-table: needs a CUDA GPU (the table orders GPU backends by measured time)")
        if args.suite not in ("lora", "quick"):
            parser.error(f"argument --write-table: the table comes from the lora suite, not --suite {args.suite}")
    device = torch.device("cuda" if cuda else "cpu")
    preset = _preset(args, cuda)
    if not cuda:
        print(f"No CUDA GPU: {preset!r} sizes on CPU, the harness only. GPU numbers are not measured here.")
        torch.set_num_threads(1)  # one thread: stabler medians on shared CPU machines
    if args.suite == "e2e":
        rows, extra = e2e.run(e2e.PRESETS[preset], device)
        print(f"\n[e2e] {preset} preset on {device_name(device)}")
        print(e2e.table(rows))
        if not cuda:
            print(f"(CPU: a harness check. GPU numbers: {e2e.GPU_NUMBERS})")
        record = make_record("e2e", device, rows, argv=argv, extra={"preset": preset, **extra})
        figure, ylabel = e2e.ratios(record["rows"]), e2e.YLABEL
    elif args.suite == "variants":
        methods = args.methods.split(",") if args.methods is not None else None
        if methods is not None and (not methods or any(m not in variants.METHODS for m in methods)):
            parser.error(f"argument --methods: choose from {sorted(variants.METHODS)}, got {args.methods!r}")
        rounds = args.rounds if _given(argv, "--rounds") else None
        rows, extra = variants.run(variants.PRESETS[preset], device, rounds, methods)
        print(f"\n[variants] {preset} preset on {device_name(device)}")
        print(variants.table(rows))
        record = make_record("variants", device, variants.as_dicts(rows), argv=argv, extra={"preset": preset, **extra})
        for method, t in extra["targets"].items():
            print(
                f"target {method}: {t['speedup_vs_hf']:.2f}x HF's step (>= {t['speedup_target']}: "
                f"{'met' if t['speedup_met'] else 'MISSED'}), peak {t['peak_vs_hf']:.2f} of HF's "
                f"(<= 1: {'met' if t['peak_met'] else 'MISSED'})"
            )
        figure, ylabel = variants.ratios(record["rows"]), variants.YLABEL
    elif args.suite == "qlora" and cuda:
        if preset not in qlora_layers.PRESETS:
            parser.error(f"argument --preset: the qlora layer suite (CUDA) has presets {list(qlora_layers.PRESETS)}")
        rows, extra = qlora_layers.run(qlora_layers.PRESETS[preset], device)
        print(f"\n[qlora] layers, {preset} preset on {device_name(device)}")
        print(qlora_layers.table(rows))
        print("\n".join(qlora_layers.target_lines(extra["targets"])))
        extra["model_benchmark"] = "not run: the model training step benchmark is CPU-only"
        record = make_record("qlora", device, rows, argv=argv, extra={"preset": preset, "benchmark": "layers", **extra})
        print("qlora layer rows (JSON): " + json.dumps(record["rows"]))  # raw numbers in the log without --out
        figure, ylabel = qlora_layers.ratios(record["rows"]), qlora_layers.YLABEL
    elif args.suite == "qlora":
        if preset not in qlora.PRESETS:
            parser.error(f"argument --preset: the qlora suite has presets {list(qlora.PRESETS)}, not {preset!r}")
        rows, extra = qlora.run(qlora.PRESETS[preset], device)
        print(f"\n[qlora] {preset} preset on {device_name(device)}")
        print(qlora.table(rows))
        if preset == "tiny":  # the GPU layer benchmark's harness, on CPU
            extra["layers"] = _qlora_layer_harness(device)
        record = make_record("qlora", device, rows, argv=argv, extra={"preset": preset, "benchmark": "model", **extra})
        figure, ylabel = qlora.ratios(record["rows"]), qlora.YLABEL
    else:
        record, figure = _run_op_suites(args.suite, preset, device, args.rounds, argv)
        ylabel = "time / bare frozen linear (lower is better)"
    source = "(record not kept: no --out)"
    if args.out is None:
        print("\nno --out given: nothing written")
    else:
        path = write_record(args.out, record)
        source = str(path)
        print(f"\nwrote {path}")
        png = path.with_suffix(".png")
        if not args.no_plot and plot_ratios(figure, png, ylabel):
            print(f"wrote {png}")
    if args.write_table is not None:
        _write_table(args.write_table, record, source)
    return 0


def _run_op_suites(
    suite: str, preset: str, device: torch.device, rounds: int, argv: list[str] | None
) -> tuple[dict, dict[str, dict[str, float]]]:
    """Run one op suite, or all of them for "quick", printing each table: (record, figure ratios)."""
    names = list(QUICK_SUITES) if suite == "quick" else [suite]
    parts: dict[str, dict] = {}
    figure: dict[str, dict[str, float]] = {}
    for name in names:
        mod = SUITES[name]
        rows, extra = mod.run(mod.PRESETS[preset], device, rounds)
        print(f"\n[{name}] {preset} preset on {device_name(device)}")
        print(mod.table(rows))
        raw = [dataclasses.asdict(r) for r in rows]
        parts[name] = {"preset": preset, **extra, "rows": raw}
        figure.update(mod.ratios(raw))
    if suite != "quick":
        part = parts[suite]
        return make_record(suite, device, part.pop("rows"), argv=argv, extra=part), figure
    return make_record(suite, device, [], argv=argv, extra={"preset": preset, "parts": parts}), figure


def _qlora_layer_harness(device: torch.device) -> dict:
    """The qlora layer benchmark's tiny preset on CPU (a harness check, no numbers claimed)."""
    from peft_fast.ops.dispatch import interpreter_enabled

    if not interpreter_enabled():
        why = "not run: on CPU the fused kernels need Triton's interpreter (TRITON_INTERPRET=1)"
        print(f"qlora layer harness check {why}")
        return {"skipped": why}
    rows, extra = qlora_layers.run(qlora_layers.PRESETS["tiny"], device)
    print(f"\n[qlora] layers, tiny preset on {device_name(device)}: {qlora_layers.HARNESS_ONLY}")
    print(qlora_layers.table(rows))
    return {**extra, "rows": [dataclasses.asdict(r) for r in rows]}


def _given(argv: list[str] | None, flag: str) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _write_table(path: Path, record: dict, source: str) -> None:
    from peft_fast.ops import dispatch

    rows = record["parts"]["lora"]["rows"] if "parts" in record else record["rows"]
    table = lora.backend_table_from_rows(rows, source, record["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    dispatch.load_backend_table(path)
    print(f"wrote {path}; this process follows it. Elsewhere: export {dispatch.BACKEND_TABLE_ENV}={path}")


if __name__ == "__main__":
    raise SystemExit(main())
