"""The DoRA and LoHa kernel launchers on their own, against float64 formulas on fresh random
inputs (the ops-level tests in test_dora.py / test_lycoris_kernels.py reach them through the
backends): dora_dx (with and without dropout, strided dy), dora_epilogue (with and without v,
bias, store_u), and lycoris_tiles.rank_layout's promises."""

from __future__ import annotations

import pytest
import torch

from peft_fast.kernels.dora_dx import dora_dx
from peft_fast.kernels.dora_epilogue import dora_epilogue
from peft_fast.kernels.dropout import draw_keep_bytes, unpack_keep_bytes
from peft_fast.kernels.lycoris_tiles import rank_layout

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_dora_dx_matches_float64(dtype, p):
    g = torch.Generator().manual_seed(11)
    M, N, K, r = 37, 45, 52, 5
    dy = torch.randn(M, 2 * N, generator=g).to(dtype)[:, ::2]  # strided
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    scale = 1.0 + 0.1 * torch.randn(N, generator=g)
    dh = torch.randn(M, r, generator=g)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    keep = draw_keep_bytes(torch.tensor([7], dtype=torch.int64), M, K, p, "cpu") if p > 0 else None
    got = dora_dx(dy, W, scale, dh, A, p, keep)
    dy64, W64, s64 = dy.double(), W.double(), scale.double()
    adapter = dh.to(dtype).double() @ A.double()
    if p > 0:
        mask = unpack_keep_bytes(keep, K).double()
        want = dy64 @ W64 + mask * (((s64 - 1.0) * dy64) @ W64 + adapter) / (1 - p)
    else:
        want = (s64 * dy64) @ W64 + adapter
    assert got.dtype == dtype and got.shape == (M, K)
    assert _rel(got, want) < TOL[dtype]


def test_dora_dx_needs_keep_bytes_with_dropout():
    args = (torch.zeros(4, 8), torch.zeros(8, 16), torch.ones(8), torch.zeros(4, 2), torch.zeros(2, 16))
    with pytest.raises(ValueError, match="keep"):
        dora_dx(*args, 0.1, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout", [False, True])
def test_dora_epilogue_matches_float64(dtype, dropout):
    g = torch.Generator().manual_seed(12)
    M, N, s = 29, 41, 0.75
    base = torch.randn(M, N, generator=g).to(dtype)
    v = torch.randn(M, N, generator=g).to(dtype) if dropout else None
    lora = torch.randn(M, 2 * N, generator=g).to(dtype)[:, 1::2]  # strided
    scale = 1.0 + 0.1 * torch.randn(N, generator=g)
    bias = torch.randn(N, generator=g).to(dtype)
    y, u = dora_epilogue(base, v, lora, scale, bias, s, store_u=True)
    b64, l64, s64 = base.double(), lora.double(), scale.double()
    v64 = v.double() if dropout else b64
    assert _rel(y, b64 + bias.double() + (s64 - 1.0) * v64 + s64 * s * l64) < TOL[dtype]
    assert _rel(u, v64 + s * l64) < TOL[dtype]
    assert dora_epilogue(base, v, lora, scale, None, s, store_u=False)[1] is None


@pytest.mark.parametrize("r", [1, 3, 4, 5, 8, 16, 33])
def test_rank_layout_pads_and_fills_lanes(r):
    rp, block_i = rank_layout(r, torch.device("cpu"))
    assert rp >= max(4, r) and rp & (rp - 1) == 0 and rp < 2 * max(4, r)
    assert 1 <= block_i <= rp and block_i * rp >= 16  # tl.dot's minimum width under the interpreter
