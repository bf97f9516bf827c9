"""X-LoRA suite (`--suite xlora`): a Llama-shaped causal LM with 2, 4, 8 and 16 LoRA experts.

For each expert count, in the same run, interleaved (CPU) or with CUDA events (GPU):

  lora       peft_fast, one plain LoRA adapter of the experts' rank on the same modules
  hf_lora    HF peft, the same plain LoRA adapter
  hf_xlora   HF peft's X-LoRA over the experts (named "0", "1", ...: HF peft 0.21.2 needs it)
  xlora      peft_fast's X-LoRA over the same expert folders

Two phases: `fwd` (eval, no_grad: scaling pass + classifier + real pass for X-LoRA) and
`step` (train mode: forward with labels, backward, AdamW step on the trainable parameters,
the classifier for X-LoRA). Ratios: hf_xlora / xlora (speed-up over HF peft) and xlora / lora
(cost over a plain LoRA model). The record keeps the load average before and after: CPU
timings on a shared machine swing, the ratios within one run much less.

Experts are random LoRA adapters (init_lora_weights=False, B ~ N(0, 0.02)) saved to a
temporary folder; the model is built from a config, nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from . import e2e
from .plot import ratio_groups
from .timing import median_times_ms

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = [2, 4, 8, 16]
PRESETS = {
    "full": {"hidden": 2048, "layers": 8, "intermediate": 5632, "heads": 16, "vocab": 32000, "seq": 1024,
             "batch": 8, "rank": 16, "experts": EXPERTS},
    "quick": {"hidden": 2048, "layers": 8, "intermediate": 5632, "heads": 16, "vocab": 32000, "seq": 1024,
              "batch": 8, "rank": 16, "experts": [8]},
    "cpu": {"hidden": 128, "layers": 4, "intermediate": 344, "heads": 4, "vocab": 512, "seq": 32, "batch": 2,
            "rank": 4, "experts": EXPERTS},
    "tiny": {"hidden": 32, "layers": 1, "intermediate": 64, "heads": 2, "vocab": 128, "seq": 8, "batch": 1,
             "rank": 4, "experts": [2]},
}  # fmt: skip
VARIANTS = ("lora", "hf_lora", "hf_xlora", "xlora")
TARGET_EXPERTS = 8


@dataclass
class XLoraRow:
    """One variant at one expert count: median milliseconds of the forward and the training step."""

    experts: int
    variant: str
    fwd_ms: float
    step_ms: float
    trainable_params: int
    fwd_vs_lora: float = float("nan")
    step_vs_lora: float = float("nan")


def _base(shape: dict, device: torch.device) -> torch.nn.Module:
    """The e2e suite's Llama-shaped model (bf16 on a GPU, fp32 on CPU), without a KV cache (X-LoRA needs none)."""
    model = e2e.build_model(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.config.use_cache = False
    return model


def _lora_config(lib, rank: int):
    return lib.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")


def make_experts(shape: dict, n: int, root: str) -> list[str]:
    """`n` random LoRA expert folders under `root` (seeded, non-zero)."""
    import peft_fast

    folders = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        config = _lora_config(peft_fast, shape["rank"])
        config.init_lora_weights = False
        model = peft_fast.get_peft_model(_base(shape, torch.device("cpu")), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        folder = os.path.join(root, f"expert{i}")
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def build_variant(name: str, shape: dict, folders: list[str], device: torch.device) -> torch.nn.Module:
    """The model of one variant (see the module docstring)."""
    import peft

    import peft_fast

    base = _base(shape, device)
    if name in ("lora", "hf_lora"):
        lib = peft_fast if name == "lora" else peft
        torch.manual_seed(1)
        config = _lora_config(lib, shape["rank"])
        config.init_lora_weights = False
        return lib.get_peft_model(base, config)
    lib = peft_fast if name == "xlora" else peft
    adapters = {str(i): f for i, f in enumerate(folders)}
    config = lib.XLoraConfig(task_type="CAUSAL_LM", hidden_size=shape["hidden"], adapters=adapters)
    torch.manual_seed(2)
    return lib.get_peft_model(base, config).to(device)


def run(preset: dict, device: torch.device, rounds: int) -> tuple[list[XLoraRow], dict]:
    """Time every variant at every expert count of `preset`; (rows, extra record fields)."""
    cuda = device.type == "cuda"
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq"]), generator=g).to(device)
    rows: list[XLoraRow] = []
    with tempfile.TemporaryDirectory() as root:
        all_folders = make_experts(preset, max(preset["experts"]), root)
        for n in preset["experts"]:
            models = {v: build_variant(v, preset, all_folders[:n], device) for v in VARIANTS}
            fwd, stp = measure(models, ids, cuda, rounds)
            for v in VARIANTS:
                trainable = sum(p.numel() for p in models[v].parameters() if p.requires_grad)
                row = XLoraRow(n, v, fwd[v], stp[v], trainable)
                row.fwd_vs_lora, row.step_vs_lora = fwd[v] / fwd["lora"], stp[v] / stp["lora"]
                rows.append(row)
    extra = {
        "shape": {k: v for k, v in preset.items() if k != "experts"},
        "targets": targets(rows),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    return rows, extra


def measure(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, cuda: bool, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median forward (eval, no_grad) and training-step milliseconds of each model, interleaved."""
    opts = {v: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for v, m in models.items()}

    def forward(name: str) -> torch.Tensor:
        model = models[name].eval()
        with torch.no_grad():
            return model(input_ids=ids).logits

    def step(name: str) -> None:
        model, opt = models[name].train(), opts[name]
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    fwd = median_times_ms({v: (lambda v=v: forward(v)) for v in models}, cuda=cuda, rounds=rounds)
    stp = median_times_ms({v: (lambda v=v: step(v)) for v in models}, cuda=cuda, rounds=rounds)
    return fwd, stp


def targets(rows: list[XLoraRow]) -> dict:
    """The issue's CPU targets at 8 experts (when measured): X-LoRA forward >= 3x faster than HF
    peft's, and <= 2.5x a plain LoRA forward (peft_fast's LoRA; HF peft's LoRA also given)."""
    by = {(r.experts, r.variant): r for r in rows}
    out = {}
    for n in sorted({r.experts for r in rows}):
        x, hx, lo, hlo = (by[(n, v)] for v in ("xlora", "hf_xlora", "lora", "hf_lora"))
        out[str(n)] = {
            "fwd_speedup_vs_hf_xlora": hx.fwd_ms / x.fwd_ms,
            "step_speedup_vs_hf_xlora": hx.step_ms / x.step_ms,
            "fwd_vs_lora": x.fwd_ms / lo.fwd_ms,
            "fwd_vs_hf_lora": x.fwd_ms / hlo.fwd_ms,
            "step_vs_lora": x.step_ms / lo.step_ms,
        }
    eight = out.get(str(TARGET_EXPERTS))
    if eight is not None:
        out["met_at_8_experts"] = {
            "fwd_speedup_vs_hf_xlora>=3": eight["fwd_speedup_vs_hf_xlora"] >= 3.0,
            "fwd_vs_lora<=2.5": eight["fwd_vs_lora"] <= 2.5,
        }
    return out


def table(rows: list[XLoraRow]) -> str:
    """A printable table of `rows`, with the speed-up over HF peft's X-LoRA per expert count."""
    head = (
        f"{'experts':>7} {'variant':<9} {'fwd ms':>9} {'step ms':>9} {'fwd/lora':>8} {'step/lora':>9} {'trainable':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.experts:>7} {r.variant:<9} {r.fwd_ms:>9.2f} {r.step_ms:>9.2f} {r.fwd_vs_lora:>8.2f} "
            f"{r.step_vs_lora:>9.2f} {r.trainable_params:>10}"
        )
    for n, t in targets(rows).items():
        if n.isdigit():
            lines.append(
                f"{n:>7} experts: X-LoRA forward {t['fwd_speedup_vs_hf_xlora']:.2f}x faster than HF peft's, "
                f"step {t['step_speedup_vs_hf_xlora']:.2f}x; forward {t['fwd_vs_lora']:.2f}x a plain LoRA forward"
            )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per expert count, each variant's forward time over the plain LoRA model's (for plots)."""
    return ratio_groups(rows, lambda r: f"x-lora fwd, {r['experts']} experts", "fwd_vs_lora")
