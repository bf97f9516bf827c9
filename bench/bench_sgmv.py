"""pytest-benchmark suite for mixed-adapter LoRA (many adapters in one batch), one benchmark
per (phase, popularity, variant):

    pytest bench/bench_sgmv.py --benchmark-only        # GPU: bf16, 4096 → 4096, 64 adapters
    pytest bench/bench_sgmv.py --benchmark-only        # CPU: tiny shapes, harness check only

Variants as in `peft-fast bench --suite sgmv` (bench/sgmv.py, the full sweep with
CUDA-event medians and bandwidth): bare linear, HF peft's mixed batch, a per-adapter loop,
gather+bmm, and the "triton" backend (GPU only: on CPU it would time Triton's interpreter).
"""

from __future__ import annotations

import pytest
import torch

from peft_fast_bench.sgmv import run_case

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (phase, K, N, tokens, ranks)
CASES = (
    [("decode", 4096, 4096, 64, "mixed"), ("prefill", 4096, 4096, 4096, "mixed")]
    if CUDA
    else [("decode", 64, 64, 8, "mixed"), ("prefill", 64, 64, 1024, "mixed")]
)


@pytest.mark.parametrize("popularity", ["distinct", "zipf"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-K{}-N{}-tok{}-r{}".format(*c))
def test_mixed_adapter_layer(benchmark, case, popularity):
    phase, K, N, tokens, ranks = case
    benchmark.group = f"{phase} {K}→{N} tok{tokens} {popularity}"
    rows = benchmark.pedantic(
        run_case, args=(phase, K, N, tokens, ranks, popularity, DEVICE, float("nan")), rounds=1, iterations=1
    )
    benchmark.extra_info.update({r.variant: r.fwd_ms for r in rows})
    assert rows[0].variant == "linear"
