"""The kernels' dropout masks against an independent Philox4x32-10 (tests/philox_oracle.py).

The oracle is checked first against Random123's published known-answer vectors; then the
masks the kernels actually apply are recovered from their outputs and gradients (not from
`kernels.dropout.dropout_mask`, the helper the kernels share) and compared with it:
- the Triton LoRA kernels (forward shrink, the keep bytes it stores, backward dx and dA), fused
  and as the cuBLAS composite, under the interpreter on CPU;
- the Triton SGMV/BGMV kernels (mixed-adapter batches), forward and backward;
- the CUDA C++ kernels (csrc/philox.h), on a GPU (gpu-marked).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from philox_oracle import keep_mask, philox4x32, philox_first_words

import peft_fast
from peft_fast.ops import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Random123 kat_vectors, "philox4x32 10": counter (4 words), key (2 words), expected output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
# Seeds: small, the largest the ops draw (2**31 - 2), and one using the key's high word.
SEEDS = [0, 99, 2**31 - 2, 0x1234_5678_9ABC]


def _require(backend: str) -> None:
    reason = dispatch.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().double().cpu()
    return ((got.detach().double().cpu() - want).norm() / want.norm()).item()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _oracle_keep(seed: int, M: int, K: int, p: float) -> torch.Tensor:
    return torch.from_numpy(keep_mask(seed, M, K, p))


# ---- the oracle itself --------------------------------------------------------------------------


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_oracle_reproduces_random123_known_answers(counter, key, expected):
    assert philox4x32(counter, key) == expected


def test_vectorized_first_word_equals_the_scalar_philox():
    counters = np.array([0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1], dtype=np.uint64)
    for seed in SEEDS + [2**64 - 1]:
        words = philox_first_words(seed, counters)
        want = [philox4x32((int(c), 0, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))[0] for c in counters]
        assert words.tolist() == want


def test_keep_rule_uses_16_bit_halves_of_the_four_words():
    """Hand-built from the words: element k of row m uses word (k % 8) // 2 of counter
    m * ceil(K/8) + k // 8, low half for even k; p = 0.5 keeps halves >= 32768."""
    seed, M, K = 1234, 3, 19
    keep = keep_mask(seed, M, K, 0.5)
    for m in range(M):
        for k in range(K):
            words = philox4x32((m * 3 + k // 8, 0, 0, 0), (seed, 0))
            half = (words[(k % 8) // 2] >> (16 * (k % 2))) & 0xFFFF
            assert keep[m, k] == (half >= 32768), (m, k)
    assert keep_mask(seed, M, K, 0.0).all()


def test_oracle_refuses_words_that_are_not_32_bit():
    with pytest.raises(ValueError, match="32-bit"):
        philox4x32((2**32, 0, 0, 0), (0, 0))
    with pytest.raises(ValueError, match="seed"):
        philox_first_words(-1, np.zeros(1, dtype=np.uint64))


def test_oracle_keep_rate_is_one_minus_p():
    M, K = 64, 100
    for p in (0.1, 0.5, 0.9):
        rate = keep_mask(7, M, K, p).mean()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / (M * K)) ** 0.5, (p, rate)


# ---- Triton LoRA kernels -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("M, K, p", [(33, 40, 0.4), (7, 100, 0.1), (1, 17, 0.5)])
def test_triton_debug_mask_equals_oracle(seed, M, K, p):
    _require("triton")
    from peft_fast.kernels.dropout import dropout_mask

    got = dropout_mask(torch.tensor([seed], dtype=torch.int64, device=DEVICE), M, K, p, DEVICE).cpu()
    assert torch.equal(got, _oracle_keep(seed, M, K, p))


def _unpack(keep_bytes: torch.Tensor, K: int) -> torch.Tensor:
    """(M, K) bools from (M, ceil(K/8)) keep bytes: bit j of byte g is element 8g + j."""
    bits = (keep_bytes.long()[:, :, None] >> torch.arange(8)) & 1
    return bits.reshape(keep_bytes.shape[0], -1)[:, :K].bool()


def _lora_expected(x, W, b, A, B, s, keep, p, dy):
    """float64 y and (dx, dA, dB) of `y = x Wᵀ + b + s · (x ⊙ keep / (1-p)) Aᵀ Bᵀ`."""
    x, A, B = (t.detach().double().cpu().requires_grad_() for t in (x, A, B))
    y = F.linear(x, W.double().cpu(), b.double().cpu()) + s * F.linear(F.linear(x * keep / (1 - p), A), B)
    return y, torch.autograd.grad(y, (x, A, B), dy.double().cpu())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("M, p", [(33, 0.3), (70, 0.6)])
def test_triton_lora_kernels_apply_the_oracle_mask_forward_and_backward(seed, M, p):
    """With A = I the fused forward's h is x's dropped copy, so its zeros are the mask; the keep
    bytes it stores for backward unpack to the oracle's mask, and dx (the backward expand's
    epilogue) and dA (the adapter-grad kernel) apply it. A = I has rank K = 32, above the
    interpreter's rank block (16): the bytes are drawn in their own pass, then read."""
    _require("triton")
    K, N, s = 32, 24, 0.75
    x = _randn(M, K, seed=1).float().to(DEVICE).requires_grad_()
    W, b = (_randn(N, K, seed=2) / K**0.5).float().to(DEVICE), _randn(N, seed=3).float().to(DEVICE)
    A = torch.eye(K, dtype=torch.float32, device=DEVICE).requires_grad_()
    B = _randn(N, K, seed=4).float().to(DEVICE).requires_grad_()
    dy = _randn(M, N, seed=5).float().to(DEVICE)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    y, h, keep_bytes = torch.ops.peft_fast.lora_linear_triton_fwd(x, W, b, A, B, s, p, seed_t)
    keep = _oracle_keep(seed, M, K, p)
    assert torch.equal(h.detach().cpu() != 0, keep)
    assert torch.equal(_unpack(keep_bytes.cpu(), K), keep)
    got = [y, *torch.autograd.grad(y, (x, A, B), dy)]
    want_y, want_g = _lora_expected(x, W, b, A, B, s, keep.double(), p, dy)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, [want_y, *want_g]):
        assert _rel_err(g, w) < 1e-5, name


@pytest.mark.parametrize("backend", ["triton", "triton_composite"])
def test_triton_lora_linear_draws_its_seed_from_torch_and_applies_the_oracle_mask(backend):
    """The public op (dispatch -> the fused Triton path, or the cuBLAS composite): the seed is
    torch's next draw; the mask forward and backward is the oracle's."""
    _require(backend)
    M, K, N, r, s, p = 3 * 5, 48, 20, 16, 0.5, 0.25
    x = _randn(3, 5, K, seed=11).float().to(DEVICE).requires_grad_()
    W, b = (_randn(N, K, seed=12) / K**0.5).float().to(DEVICE), _randn(N, seed=13).float().to(DEVICE)
    A = (_randn(r, K, seed=14) / K**0.5).float().to(DEVICE).requires_grad_()
    B = _randn(N, r, seed=15).float().to(DEVICE).requires_grad_()
    dy = _randn(3, 5, N, seed=16).float().to(DEVICE)
    torch.manual_seed(2024)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=DEVICE, dtype=torch.int64))
    torch.manual_seed(2024)
    with peft_fast.use_backend(backend):
        y = peft_fast.ops.lora_linear(x, W, b, A, B, s, p, True)
    got = [y, *torch.autograd.grad(y, (x, A, B), dy)]
    keep = _oracle_keep(seed, M, K, p).double().reshape(3, 5, K)
    want_y, want_g = _lora_expected(x, W, b, A, B, s, keep, p, dy)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, [want_y, *want_g]):
        assert _rel_err(g, w) < 1e-5, name


# ---- Triton SGMV / BGMV kernels (mixed-adapter batches) ------------------------------------------


@pytest.mark.parametrize("path", ["sgmv", "bgmv"])
def test_triton_mixed_batch_kernels_apply_the_oracle_mask_forward_and_backward(path):
    """Each row uses its adapter's p; the mask numbers x's elements over the whole (batch·T, K) input."""
    _require("triton")
    from peft_fast.ops.triton import mixed as sgmv_triton

    rows, T, K, N, ranks = 5, 3, 32, 24, [16, 8]
    ps, scalings, row_adapter = [0.3, 0.6], [0.5, 1.25], [0, 1, -1, 1, 0]
    x = _randn(rows, T, K, seed=21).float().to(DEVICE).requires_grad_()
    W, b = (_randn(N, K, seed=22) / K**0.5).float().to(DEVICE), _randn(N, seed=23).float().to(DEVICE)
    As = [(_randn(r, K, seed=24 + i) / K**0.5).float().to(DEVICE).requires_grad_() for i, r in enumerate(ranks)]
    Bs = [_randn(N, r, seed=26 + i).float().to(DEVICE).requires_grad_() for i, r in enumerate(ranks)]
    dy = _randn(rows, T, N, seed=28).float().to(DEVICE)
    ra = torch.tensor(row_adapter, device=DEVICE)
    torch.manual_seed(77)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device=DEVICE, dtype=torch.int64))
    torch.manual_seed(77)
    y = sgmv_triton.lora_linear_mixed(x, W, b, As, Bs, scalings, ps, ra, True, path=path)
    got = [y, *torch.autograd.grad(y, [x, *As, *Bs], dy)]

    x64 = x.detach().double().cpu().requires_grad_()
    A64 = [a.detach().double().cpu().requires_grad_() for a in As]
    B64 = [q.detach().double().cpu().requires_grad_() for q in Bs]
    want = F.linear(x64, W.double().cpu(), b.double().cpu())
    for row, k in enumerate(row_adapter):
        if k < 0:
            continue
        keep = _oracle_keep(seed, rows * T, K, ps[k]).double().reshape(rows, T, K)[row]
        delta = scalings[k] * F.linear(F.linear(x64[row] * keep / (1 - ps[k]), A64[k]), B64[k])
        want = want.index_add(0, torch.tensor([row]), delta[None])
    wants = [want, *torch.autograd.grad(want, [x64, *A64, *B64], dy.double().cpu())]
    names = ["y", "dx", "dA0", "dA1", "dB0", "dB1"]
    for name, g, w in zip(names, got, wants):
        assert _rel_err(g, w) < 1e-5, name


# ---- CUDA C++ kernels (csrc/philox.h) --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M, p", [(33, 0.3), (257, 0.6)])
def test_cuda_lora_kernels_apply_the_oracle_mask_forward_and_backward(M, p):
    _require("cuda")
    K, N, r, s = 64, 48, 16, 0.75
    x = _randn(M, K, seed=31).float().cuda().requires_grad_()
    W, b = (_randn(N, K, seed=32) / K**0.5).float().cuda(), _randn(N, seed=33).float().cuda()
    A = (_randn(r, K, seed=34) / K**0.5).float().cuda().requires_grad_()
    B = _randn(N, r, seed=35).float().cuda().requires_grad_()
    dy = _randn(M, N, seed=36).float().cuda()
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,), device="cuda", dtype=torch.int64))
    torch.manual_seed(5)
    with peft_fast.use_backend("cuda"):
        y = peft_fast.ops.lora_linear(x, W, b, A, B, s, p, True)
    got = [y, *torch.autograd.grad(y, (x, A, B), dy)]
    want_y, want_g = _lora_expected(x, W, b, A, B, s, _oracle_keep(seed, M, K, p).double(), p, dy)
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, [want_y, *want_g]):
        assert _rel_err(g, w) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_keep_bytes_equal_the_oracle_and_triton(seed):
    """keep_bytes_cuda (csrc/keep_bytes.cu) draws the oracle's mask packed 8 to a byte, byte for
    byte the Triton launcher's; in a segmented call each segment uses its own p through `rows`,
    and rows of no segment keep everything (0xff, Triton's p = 0)."""
    _require("cuda")
    import peft_fast.ops.cuda.library  # noqa: F401  (loads the ops)

    M, K, p = 37, 45, 0.3
    seed_t = torch.tensor([seed], dtype=torch.int64, device="cuda")
    got = torch.ops.peft_fast.keep_bytes_cuda(seed_t, M, K, None, [0, M], [p]).cpu()
    assert torch.equal(_unpack(got, K), _oracle_keep(seed, M, K, p))
    if dispatch.unavailable_reason("triton") is None:
        from peft_fast.kernels.dropout import draw_keep_bytes

        assert torch.equal(got, draw_keep_bytes(seed_t, M, K, p, "cuda").cpu())
    rows = torch.tensor([5, 0, 9, 2, 7, 30], dtype=torch.int32, device="cuda")  # segments [0, 2), [2, 5)
    mixed = torch.ops.peft_fast.keep_bytes_cuda(seed_t, M, K, rows, [0, 2, 5], [0.6, 0.1]).cpu()
    want = torch.ones(M, K, dtype=torch.bool)
    for rs, q in (([5, 0], 0.6), ([9, 2, 7], 0.1)):
        want[rs] = _oracle_keep(seed, M, K, q)[rs]
    assert torch.equal(_unpack(mixed, K), want)
    assert (mixed[30] == 0xFF).all()
