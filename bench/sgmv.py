"""Mixed-batch suite (`--suite sgmv`): one linear layer serving many LoRA adapters in one batch.

On a CUDA GPU (bf16 base and adapters, inference forward) it times, in the same run, with
`triton.testing.do_bench` medians:

  linear      bare frozen `F.linear` (no adapters): the floor
  peft        HF peft's lora.Linear mixed-batch forward (`layer(x, adapter_names=...)`)
  loop        a per-adapter loop (peft_fast's torch reference: index rows, two matmuls, index_add)
  gather_bmm  torch baseline: adapters padded to the largest rank, gathered per row, bmm
  triton      peft_fast.ops.lora_linear_mixed on the "triton" backend (SGMV/BGMV kernels),
              with the batch's grouping and the stacked weights prepared once, as layers do

for decode (B requests of one token each) and prefill (requests of 512 tokens), hidden
sizes 4096 → 4096 and 4096 → 14336, ranks 8/16/64 or mixed (8, 16, 32, 64 in turn), and
adapter popularity all-same, all-distinct, uniform over 64 adapters, Zipf(1.1) over 64.
Decode rows also report the triton variant's achieved bandwidth (fewest bytes: x, y, W and
the adapters in use, once) over the GPU's copy bandwidth measured in the same run.

Without a GPU the command times the torch variants on small CPU shapes (the harness only)
and says that GPU numbers are not measured.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .plot import ratio_groups
from .timing import median_times_ms

POPULARITIES = ("same", "distinct", "uniform", "zipf")
RANKS: dict[str, list[int]] = {"8": [8], "16": [16], "64": [64], "mixed": [8, 16, 32, 64]}
PREFILL_TOKENS_PER_REQUEST = 512
N_ADAPTERS = 64
PRESETS = {
    "full": {"shapes": [(4096, 4096), (4096, 14336)], "decode": [1, 16, 64, 256], "prefill": [512, 2048, 16384],
             "ranks": list(RANKS), "pops": list(POPULARITIES)},
    "quick": {"shapes": [(4096, 4096)], "decode": [1, 64, 256], "prefill": [4096], "ranks": ["16", "mixed"],
              "pops": ["distinct", "zipf"]},
    "cpu": {"shapes": [(128, 128)], "decode": [8], "prefill": [1024], "ranks": ["mixed"], "pops": ["uniform"]},
    "tiny": {"shapes": [(32, 32)], "decode": [4], "prefill": [1024], "ranks": ["mixed"], "pops": ["distinct"]},
}  # fmt: skip


@dataclass
class SgmvRow:
    """One variant of one case: median forward time in ms; bandwidth fields for decode."""

    phase: str  # "decode" | "prefill"
    K: int
    N: int
    tokens: int
    requests: int
    ranks: str
    popularity: str
    n_adapters: int
    variant: str
    fwd_ms: float
    ratio_to_linear: float = float("nan")
    min_bytes: float = float("nan")
    achieved_gbps: float = float("nan")
    frac_of_copy_bw: float = float("nan")


def assign(requests: int, popularity: str, n_adapters: int, seed: int = 0) -> list[int]:
    """Adapter index per request for a popularity model (deterministic for a seed)."""
    g = torch.Generator().manual_seed(seed)
    if popularity == "same":
        return [0] * requests
    if popularity == "distinct":
        return list(range(requests))
    if popularity == "uniform":
        return torch.randint(0, n_adapters, (requests,), generator=g).tolist()
    if popularity == "zipf":
        w = torch.tensor([1.0 / (k + 1) ** 1.1 for k in range(n_adapters)])
        return torch.multinomial(w, requests, replacement=True, generator=g).tolist()
    raise ValueError(f"popularity must be one of {POPULARITIES}, got {popularity!r}")


def _hf_layer(W: torch.Tensor, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> nn.Module | None:
    try:
        import peft
    except ImportError:
        return None
    base = nn.Sequential(nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype))
    base[0].weight.data.copy_(W)
    for k, (A, B) in enumerate(zip(As, Bs)):
        cfg = peft.LoraConfig(r=A.shape[0], lora_alpha=2 * A.shape[0], target_modules=["0"])
        with warnings.catch_warnings():  # "already found a peft_config": adding adapters is the point
            warnings.simplefilter("ignore")
            base = peft.inject_adapter_in_model(cfg, base, adapter_name=f"a{k}")
        base[0].lora_A[f"a{k}"].weight.data.copy_(A)
        base[0].lora_B[f"a{k}"].weight.data.copy_(B)
    return base[0].eval()


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (reads + writes) of a 1 GiB buffer, in GB/s."""
    from triton.testing import do_bench

    src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def run_case(
    phase: str,
    K: int,
    N: int,
    tokens: int,
    ranks_name: str,
    popularity: str,
    device: torch.device,
    copy_gbps: float,
    rounds: int = 21,
) -> list[SgmvRow]:
    """Time every variant of one case; ratios over bare `linear`."""
    import peft_fast
    from peft_fast.ops import reference
    from peft_fast.ops.mixed_batch import LoraStackCache, group_rows

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    T = 1 if phase == "decode" else min(PREFILL_TOKENS_PER_REQUEST, tokens)
    requests = tokens // T
    n = requests if popularity == "distinct" else N_ADAPTERS
    row = assign(requests, popularity, n)
    ranks = [RANKS[ranks_name][k % len(RANKS[ranks_name])] for k in range(n)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(requests, T, K, generator=g).to(device, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    As = [(torch.randn(r, K, generator=g) / K**0.5).to(device, dtype) for r in ranks]
    Bs = [(torch.randn(N, r, generator=g) / r**0.5).to(device, dtype) for r in ranks]
    sc, ps = [2.0] * n, [0.0] * n
    ra = torch.tensor(row, device=device)
    names = [f"a{k}" for k in row]
    rmax = max(ranks)
    A_pad = torch.zeros(n, rmax, K, device=device, dtype=dtype)
    B_pad = torch.zeros(n, N, rmax, device=device, dtype=dtype)
    for k, (A, B) in enumerate(zip(As, Bs)):
        A_pad[k, : A.shape[0]] = A
        B_pad[k, :, : B.shape[1]] = B * sc[k]

    def gather_bmm():
        y = F.linear(x, W)
        h = torch.bmm(x, A_pad[ra].transpose(1, 2))
        return y + torch.bmm(h, B_pad[ra].transpose(1, 2))

    variants = {
        "linear": lambda: F.linear(x, W),
        "loop": lambda: reference.lora_linear_mixed(x, W, None, As, Bs, sc, ps, ra, False),
        "gather_bmm": gather_bmm,
    }
    hf = _hf_layer(W, As, Bs)
    if hf is not None:
        variants["peft"] = lambda: hf(x, adapter_names=names)
    if cuda and peft_fast.ops.dispatch.unavailable_reason("triton") is None:
        plan, stack = group_rows(ra, device), LoraStackCache()

        def ours():
            with peft_fast.use_backend("triton"):
                return peft_fast.ops.lora_linear_mixed(x, W, None, As, Bs, sc, ps, ra, False, plan=plan, stack=stack)

        variants["triton"] = ours
    with torch.no_grad():
        times = median_times_ms(variants, cuda=cuda, rounds=rounds)
    rows = [SgmvRow(phase, K, N, tokens, requests, ranks_name, popularity, n, name, ms) for name, ms in times.items()]
    used = set(row)
    bytes_ = 2 * (x.numel() + requests * T * N + W.numel() + sum(ranks[a] * (K + N) for a in used))
    for r in rows:
        r.ratio_to_linear = r.fwd_ms / rows[0].fwd_ms
        if phase == "decode":
            r.min_bytes = float(bytes_)
            r.achieved_gbps = bytes_ / (r.fwd_ms * 1e-3) / 1e9
            r.frac_of_copy_bw = r.achieved_gbps / copy_gbps if cuda else float("nan")
    return rows


def run(preset: dict, device: torch.device, rounds: int) -> tuple[list[SgmvRow], dict]:
    """Every case of `preset` (see PRESETS) on `device`: (rows, facts for the record)."""
    cuda = device.type == "cuda"
    copy_gbps = copy_bandwidth_gbps() if cuda else float("nan")
    rows: list[SgmvRow] = []
    for K, N in preset["shapes"]:
        for phase, sizes in (("decode", preset["decode"]), ("prefill", preset["prefill"])):
            for tokens in sizes:
                for rk in preset["ranks"]:
                    for pop in preset["pops"]:
                        rows.extend(run_case(phase, K, N, tokens, rk, pop, device, copy_gbps, rounds))
                        if cuda:
                            torch.cuda.empty_cache()
    extra = {"copy_bandwidth_gbps": copy_gbps, "prefill_tokens_per_request": PREFILL_TOKENS_PER_REQUEST,
             "n_adapters_when_not_distinct": N_ADAPTERS, "phase_timed": "inference forward (no_grad)",
             "dtype": "bf16 base and adapters" if cuda else "fp32 (CPU)"}  # fmt: skip
    return rows, extra


def table(rows: list[SgmvRow]) -> str:
    """A printable table of `rows`."""
    head = f"{'phase':<8} {'K→N':>11} {'tok':>6} {'req':>4} {'ranks':>5} {'pop':<8} {'variant':<10} {'ms':>8} {'/lin':>6} {'GB/s':>7} {'%copy':>6}"  # noqa: E501
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = "" if math.isnan(r.frac_of_copy_bw) else f"{100 * r.frac_of_copy_bw:.0f}"
        gbps = "" if math.isnan(r.achieved_gbps) else f"{r.achieved_gbps:.0f}"
        lines.append(
            f"{r.phase:<8} {f'{r.K}→{r.N}':>11} {r.tokens:>6} {r.requests:>4} {r.ranks:>5} {r.popularity:<8} {r.variant:<10} "  # noqa: E501
            f"{r.fwd_ms:>8.3f} {r.ratio_to_linear:>6.2f} {gbps:>7} {pct:>6}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per case label, each variant's forward time over bare linear (for plots)."""
    return ratio_groups(
        rows,
        lambda r: f"mixed {r['phase']} {r['K']}→{r['N']} tok={r['tokens']} r={r['ranks']} {r['popularity']}",
        "ratio_to_linear",
    )
