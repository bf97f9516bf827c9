"""End-to-end suite (`--suite e2e`): training steps of a Llama-shaped causal LM built from a
config (random weights, nothing downloaded), LoRA r=16 (alpha 32, dropout 0.05) on every
linear layer but the head, AdamW on the adapter.

Variants, each on a freshly built model with the same seed:

  frozen          the model with no adapter: forward + backward of the input gradients only
                  (what every adapter step pays at least; no optimizer)
  peft            HF peft's get_peft_model
  peft_fast_auto  peft_fast's get_peft_model, backend "auto"
  peft_patch      HF peft with `peft_fast.patch_peft` (HF's modules, our ops)
  peft_fast_fsdp2 peft_fast_auto sharded by FSDP2 (`fully_shard` per decoder layer, then the
                  root) on a process group of this one process (nccl on CUDA, gloo on CPU):
                  the parameters are DTensors, all-gathered for each layer's forward and
                  backward, gradients reduce-scattered; `peft-fast train --distributed fsdp2`'s
                  wrapping, on one device

Each reports the median step time, tokens/s, the peak CUDA memory of its steps, and the
first step's loss: LoRA starts with B = 0, so every variant's first loss equals the frozen
model's (a check that all five train the same model).

Presets: "full" and "quick" are the GPU size (hidden 2048, 16 layers, intermediate 5632,
16 heads, vocabulary 32000, sequence 2048, bf16: about 0.95 B parameters); "cpu" and "tiny"
are small fp32 models that check the harness. GPU numbers come from a GPU round
(bench/gpu_round.sh) and are filed under bench/results/<device>-<date>/ by the ingester.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch

GPU_SHAPE = {"hidden": 2048, "layers": 16, "intermediate": 5632, "heads": 16, "vocab": 32000, "seq": 2048}
PRESETS = {
    "full": {**GPU_SHAPE, "batch": 1, "warmup": 3, "steps": 10},
    "quick": {**GPU_SHAPE, "batch": 1, "warmup": 2, "steps": 6},
    "cpu": {"hidden": 64, "layers": 2, "intermediate": 172, "heads": 4, "vocab": 256, "seq": 64, "batch": 2,
            "warmup": 1, "steps": 3},
    "tiny": {"hidden": 32, "layers": 1, "intermediate": 64, "heads": 2, "vocab": 128, "seq": 16, "batch": 1,
             "warmup": 1, "steps": 2},
}  # fmt: skip
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
VARIANTS = ("frozen", "peft", "peft_fast_auto", "peft_patch", "peft_fast_fsdp2")
YLABEL = "training step time / frozen model's forward+backward"
GPU_NUMBERS = "bench/results/<device>-<date>/ (from bench/gpu_round.sh on a GPU, filed by `peft-fast bench --ingest`)"


@dataclass
class E2eRow:
    """One variant: median step time, throughput, peak memory, parameters and the first loss."""

    variant: str
    step_ms: float
    tokens_per_s: float
    peak_mib: float
    trainable_params: int
    total_params: int
    adapter_dtype: str
    first_loss: float
    last_loss: float
    step_ratio: float = float("nan")


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A Llama-shaped causal LM with random weights (seeded), built directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=shape["seq"],
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def wrap(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    """`model` as the variant trains it (see the module's docstring)."""
    if variant == "frozen":
        model.enable_input_require_grads()  # backward runs through every layer, as under an adapter
        return model
    if variant in ("peft_fast_auto", "peft_fast_fsdp2"):
        import peft_fast
        from peft_fast.distributed import shard_fsdp2

        peft_fast.set_backend("auto")
        wrapped = peft_fast.get_peft_model(model, peft_fast.LoraConfig(task_type="CAUSAL_LM", **LORA))
        if variant == "peft_fast_fsdp2":  # needs a process group: run_variant opens one
            from torch.distributed.tensor import DTensor

            shard_fsdp2(wrapped, next(wrapped.parameters()).device)
            plain = [n for n, p in wrapped.named_parameters() if not isinstance(p, DTensor)]
            if plain:
                raise RuntimeError(f"FSDP2 left {len(plain)} parameters unsharded, e.g. {plain[0]}")
        return wrapped
    import peft

    wrapped = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    if variant == "peft_patch":
        import peft_fast

        peft_fast.patch_peft(wrapped)
    elif variant != "peft":
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return wrapped


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(variant: str, preset: dict, device: torch.device) -> E2eRow:
    """Build, wrap and train one variant for preset["warmup"] + preset["steps"] steps
    (peft_fast_fsdp2 inside a process group of world size 1)."""
    if variant == "peft_fast_fsdp2":
        from peft_fast.distributed import single_process_group

        with single_process_group(device):
            return _run_variant(variant, preset, device)
    return _run_variant(variant, preset, device)


def _run_variant(variant: str, preset: dict, device: torch.device) -> E2eRow:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = wrap(variant, build_model(preset, device, dtype))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq"]), generator=g).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for step in range(preset["warmup"] + preset["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= preset["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
    step_s = statistics.median(times)
    row = E2eRow(
        variant=variant,
        step_ms=step_s * 1e3,
        tokens_per_s=preset["batch"] * preset["seq"] / step_s,
        peak_mib=peak,
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
        adapter_dtype=str(trainable[0].dtype).removeprefix("torch.") if opt is not None else "-",
        first_loss=losses[0],
        last_loss=losses[-1],
    )
    return row


def run(preset: dict, device: torch.device) -> tuple[list[E2eRow], dict]:
    """Every variant on `device`: (rows, facts for the record). A variant that fails is
    reported (its error in the record) and the others still run."""
    rows, errors = [], {}
    for variant in VARIANTS:
        try:
            rows.append(run_variant(variant, preset, device))
        except Exception as e:  # keep the other variants' numbers; the record names the failure
            errors[variant] = f"{type(e).__name__}: {e}"
            print(f"e2e: variant {variant} failed: {errors[variant]}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    frozen = next((r for r in rows if r.variant == "frozen"), None)
    for r in rows:
        r.step_ratio = r.step_ms / frozen.step_ms if frozen else math.nan
    cuda = device.type == "cuda"
    extra = {
        "model": {k: preset[k] for k in ("hidden", "layers", "intermediate", "heads", "vocab", "seq", "batch")},
        "dtype": "bf16" if cuda else "fp32",
        "lora": LORA,
        "optimizer": "AdamW lr 1e-4 on the trainable parameters (none for frozen)",
        "steps": {"warmup": preset["warmup"], "timed": preset["steps"], "statistic": "median step time"},
        "errors": errors,
        "fsdp2": "peft_fast_fsdp2: fully_shard per LlamaDecoderLayer and the root, world size 1 "
        f"({'nccl' if cuda else 'gloo'}), parameters DTensors",
    }
    if not cuda:
        extra["gpu_numbers"] = GPU_NUMBERS
    return rows, extra


def table(rows: list[E2eRow]) -> str:
    """A printable table of `rows`."""
    head = f"{'variant':<15} {'step ms':>9} {'tokens/s':>10} {'/frozen':>7} {'peak MiB':>9} {'trainable':>10} {'adapter':>8} {'loss 1st':>8}"  # noqa: E501
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.variant:<15} {r.step_ms:>9.2f} {r.tokens_per_s:>10.0f} {r.step_ratio:>7.2f} {r.peak_mib:>9.0f} "
            f"{r.trainable_params:>10,} {r.adapter_dtype:>8} {r.first_loss:>8.4f}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Each adapter variant's step time over the frozen model's (for the plot)."""
    return {"e2e step": {r["variant"]: r["step_ratio"] for r in rows if r["variant"] != "frozen"}}
