"""kernels/dropout.py: the keep bytes against the independent Philox oracle, the mask's
statistics, and the Philox evaluations a LoRA training step costs, counted twice: by the
launchers' own launch plan (`count_philox`) and by wrapping `tl.randint4x` itself under
Triton's interpreter (every evaluation a kernel really makes, padding lanes included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton.language as tl
from philox_oracle import keep_mask

import peft_fast
from peft_fast.ops import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton():
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def _unpack(keep_bytes: torch.Tensor, K: int) -> np.ndarray:
    bits = (keep_bytes.cpu().long()[:, :, None] >> torch.arange(8)) & 1
    return bits.reshape(keep_bytes.shape[0], -1)[:, :K].bool().numpy()


@pytest.mark.parametrize("seed", [0, 77, 2**31 - 2])
@pytest.mark.parametrize("M, K, p", [(1, 1, 0.5), (33, 40, 0.3), (7, 100, 0.1), (40, 257, 0.9)])
def test_keep_bytes_are_the_oracle_mask_packed(seed, M, K, p):
    from peft_fast.kernels.dropout import draw_keep_bytes

    kb = draw_keep_bytes(_seed(seed), M, K, p, DEVICE)
    assert kb.dtype == torch.uint8 and kb.shape == (M, math.ceil(K / 8))
    assert np.array_equal(_unpack(kb, K), keep_mask(seed, M, K, p))


def test_keep_bytes_statistics():
    """p = 0.5: the 8 bits of a byte are independent fair coins, so the 256 byte values are
    equally likely (chi-square, 255 degrees of freedom); p = 0.1: every bit position keeps
    0.9; neighbours along a row (same and next Philox word) and down a column are uncorrelated."""
    from peft_fast.kernels.dropout import draw_keep_bytes

    M, K = 128, 512
    kb = draw_keep_bytes(_seed(2024), M, K, 0.5, DEVICE).cpu().long().flatten()
    counts = torch.bincount(kb, minlength=256).double()
    expected = kb.numel() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 255 + 5 * (2 * 255) ** 0.5, chi2

    keep = _unpack(draw_keep_bytes(_seed(99), M, K, 0.1, DEVICE), K).astype(np.float64)
    n = M * K / 8
    for j in range(8):
        rate = keep[:, j::8].mean()
        assert abs(rate - 0.9) < 5 * (0.09 / n) ** 0.5, (j, rate)
    c = keep - keep.mean()
    for a, b in ((c[:, :-1], c[:, 1:]), (c[:, :-2], c[:, 2:]), (c[:, :-8], c[:, 8:]), (c[:-1], c[1:])):
        corr = (a * b).mean() / (a.std() * b.std())
        assert abs(corr) < 5 / a.size**0.5, corr


def test_keep_bytes_check_names_the_argument():
    from peft_fast.kernels.dropout import check_keep_bytes
    from peft_fast.kernels.lora_expand import lora_expand_add_

    with pytest.raises(ValueError, match="keep must be uint8 keep bytes of shape \\(4, 2\\)"):
        check_keep_bytes(torch.zeros(4, 3, dtype=torch.uint8), 4, 9, torch.device(DEVICE))
    with pytest.raises(ValueError, match="keep must be uint8"):
        check_keep_bytes(torch.zeros(4, 2), 4, 9, torch.device(DEVICE))
    out = torch.zeros(4, 9, device=DEVICE)
    with pytest.raises(ValueError, match="keep"):
        lora_expand_add_(out, torch.zeros(4, 2, device=DEVICE), torch.zeros(9, 2, device=DEVICE), 1.0, out.byte())


@pytest.fixture
def philox_calls(monkeypatch):
    """The number of Philox evaluations the kernels make, counted at `tl.randint4x` (the
    interpreter calls it once per tile with the tile's counters)."""
    if DEVICE != "cpu":
        pytest.skip("counts through Triton's interpreter")
    calls = [0]
    original = tl.randint4x

    def counting(seed, offset, n_rounds=10, **kwargs):
        calls[0] += math.prod(int(s) for s in offset.shape)
        return original(seed, offset, n_rounds)

    monkeypatch.setattr(tl, "randint4x", counting)
    return calls


@pytest.mark.parametrize("backend", ["triton", "triton_composite"])
@pytest.mark.parametrize("r", [4, 40])  # one rank block in the shrink, and several (drawn first)
def test_a_training_step_costs_an_eighth_of_a_philox_evaluation_per_element(backend, r, philox_calls):
    """Forward and backward of a LoRA layer with dropout: the launch plan's count equals the
    evaluations the kernels make, 1/8 per element of x when the tiles fit x (r = 4), and at
    most 1/4 per element whatever the rank (r = 40: the keep bytes drawn in a pass of their
    own, padded to its tiles); backward draws nothing."""
    from peft_fast.kernels.dropout import count_philox

    M, K, N = 64, 96, 32  # multiples of the interpreter's 32-row, 32-column shrink tiles
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).requires_grad_()
    W, b = torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    A = (torch.randn(r, K, generator=g) / K**0.5).requires_grad_()
    B = torch.randn(N, r, generator=g).requires_grad_()
    with peft_fast.use_backend(backend), count_philox() as plan:
        y = peft_fast.ops.lora_linear(x, W, b, A, B, 0.5, 0.1, True)
        forward = philox_calls[0]
        y.backward(torch.randn(M, N, generator=g))
    assert plan and philox_calls[0] == forward == sum(n for _, n in plan)
    assert philox_calls[0] / (M * K) <= 0.25
    if r == 4:
        assert plan == [("lora_shrink", M * K // 8)]
    else:
        assert [k for k, _ in plan] == ["keep_bytes"]
    assert A.grad is not None and x.grad is not None


@pytest.mark.parametrize("path", ["sgmv", "bgmv"])
def test_a_mixed_batch_training_step_draws_the_mask_once(path, philox_calls):
    """Mixed-adapter batches: one keep-bytes pass with each row's adapter's p, then the SGMV/BGMV
    kernels read the bytes; forward and backward together stay within 1/4 evaluation per element."""
    from peft_fast.kernels.dropout import count_philox
    from peft_fast.ops.triton import mixed

    rows, T, K, N = 8, 8, 96, 32  # M = 64 tokens
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, T, K, generator=g).requires_grad_()
    W = torch.randn(N, K, generator=g) / K**0.5
    As = [(torch.randn(r, K, generator=g) / K**0.5).requires_grad_() for r in (4, 8)]
    Bs = [torch.randn(N, r, generator=g).requires_grad_() for r in (4, 8)]
    row_adapter = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1], dtype=torch.int32)
    with peft_fast.use_backend("triton"), count_philox() as plan:
        y = mixed.lora_linear_mixed(x, W, None, As, Bs, [0.5, 2.0], [0.1, 0.3], row_adapter, True, path=path)
        y.backward(torch.randn(rows, T, N, generator=g))
    M = rows * T
    assert [k for k, _ in plan] == ["keep_bytes"]
    assert philox_calls[0] == sum(n for _, n in plan) <= 0.25 * M * K
    assert all(a.grad is not None for a in As)


@pytest.mark.parametrize("path", ["fused", "composite"])
def test_a_dora_training_step_draws_the_mask_once(path, philox_calls):
    """DoRA with dropout: the forward shrink draws the keep bytes once (1/8 evaluation per element
    of x); the fused forward's second accumulator (or the composite's dropped copy), dA and dx
    read them, so no other launch evaluates Philox."""
    from peft_fast.kernels.dropout import count_philox
    from peft_fast.ops.triton.dora import use_dora_path

    M, K, N, r = 64, 96, 32, 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g).requires_grad_()
    W, b = torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    A = (torch.randn(r, K, generator=g) / K**0.5).requires_grad_()
    B = torch.randn(N, r, generator=g).requires_grad_()
    mag = (W.norm(dim=1) * 1.1).requires_grad_()
    with peft_fast.use_backend("triton"), use_dora_path(path), count_philox() as plan:
        y = peft_fast.ops.dora_linear(x, W, b, A, B, mag, 0.5, 0.1, True)
        forward = philox_calls[0]
        y.backward(torch.randn(M, N, generator=g))
    assert plan == [("lora_shrink", M * K // 8)]
    assert philox_calls[0] == forward == M * K // 8
    assert all(t.grad is not None for t in (x, A, B, mag))


# ---- CUDA C++ backend (csrc/keep_bytes.cu draws, the other kernels read) -------------------------


@pytest.mark.parametrize(
    "seg_starts, ps, K",
    [([0, 64], [0.1], 96), ([0, 64], [0.1], 4), ([0, 64], [0.1], 100), ([0, 3, 10, 40], [0.2, 0.0, 0.5], 33)],
)
def test_cuda_launch_plan_draws_at_most_a_quarter_evaluation_per_element(seg_starts, ps, K):
    """The CUDA backend's plan (ops/cuda/dropout.py, reported to count_philox by each forward):
    one evaluation per keep byte of a segment with p > 0 (ceil(K/8) per row), none in the
    shrink, dx and dA kernels, none for p = 0 rows: <= 1/4 per element of x for K >= 4,
    1/8 when 8 divides K."""
    from peft_fast.kernels.dropout import count_philox
    from peft_fast.ops.cuda.dropout import keep_bytes_evaluations, report_keep_draws

    rows_drawn = sum(e - s for s, e, p in zip(seg_starts, seg_starts[1:], ps) if p > 0.0)
    M = seg_starts[-1]
    with count_philox() as plan:
        report_keep_draws(seg_starts, ps, K)
    assert plan == [("keep_bytes_cuda", rows_drawn * math.ceil(K / 8))]
    assert keep_bytes_evaluations(seg_starts, ps, K) / (M * K) <= 0.25
    if K % 8 == 0:
        assert keep_bytes_evaluations(seg_starts, ps, K) == rows_drawn * K // 8
    assert keep_bytes_evaluations(seg_starts, [0.0] * len(ps), K) == 0
    with pytest.raises(ValueError, match="seg_starts"):
        keep_bytes_evaluations(seg_starts[:-1], ps, K)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_training_step_draws_the_mask_once():
    """Forward and backward of a LoRA layer and of a mixed batch on the CUDA backend: one
    keep_bytes_cuda launch per step, counted by the hook, within 1/4 evaluation per element."""
    from peft_fast.kernels.dropout import count_philox

    reason = dispatch.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")
    from peft_fast.ops.cuda import mixed

    M, K, N, r = 64, 100, 32, 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).cuda().requires_grad_()
    W = (torch.randn(N, K, generator=g) / K**0.5).cuda()
    A = (torch.randn(r, K, generator=g) / K**0.5).cuda().requires_grad_()
    B = torch.randn(N, r, generator=g).cuda().requires_grad_()
    with peft_fast.use_backend("cuda"), count_philox() as plan:
        y = peft_fast.ops.lora_linear(x, W, None, A, B, 0.5, 0.1, True)
        y.backward(torch.randn(M, N, generator=g).cuda())
    assert plan == [("keep_bytes_cuda", M * math.ceil(K / 8))] and plan[0][1] <= 0.25 * M * K
    xs = torch.randn(8, 8, K, generator=g).cuda().requires_grad_()
    row_adapter = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1], dtype=torch.int32, device="cuda")
    with count_philox() as plan:
        y = mixed.lora_linear_mixed(xs, W, None, [A, A], [B, B], [0.5, 2.0], [0.1, 0.0], row_adapter, True)
        y.backward(torch.randn(8, 8, N, generator=g).cuda())
    assert plan == [("keep_bytes_cuda", 3 * 8 * math.ceil(K / 8))]  # adapter 0's rows only (p > 0)
