"""ops.xlora_linear (X-LoRA's stacked experts) on the torch reference and the Triton kernels,
against a float64 oracle that loops over the experts as HF peft's layer does
(`Σ_i ((x ⊙ c_i) A_iᵀ) B_iᵀ`): forward and gradients w.r.t. x, A, B and the per-token
coefficients, odd shapes and unpadded ranks, 3-D and strided inputs, fp32 and fp16
(bf16 only on a GPU: the interpreter's bf16 tl.dot is wrong), all-zero coefficients of
top-k-dropped experts, dropout, and argument errors."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, KERNEL_DTYPES, assert_close_to_oracle, grads_of, leaf, randn, require_backend

import peft_fast
from peft_fast import ops
from peft_fast.ops import dispatch

BACKENDS = ["torch", "triton"]


def _oracle(x, W, b, As, Bs, c):
    """float64, expert by expert, HF peft's order of operations (x scaled before A)."""
    y = x @ W.T + (b if b is not None else 0)
    for i, (A, B) in enumerate(zip(As, Bs)):
        y = y + ((x * c[..., i : i + 1]) @ A.T) @ B.T
    return y


def _case(lead, K, N, ranks, seed=0, zero_experts=()):
    x = randn(*lead, K, seed=seed)
    W, b = randn(N, K, seed=seed + 1) / K**0.5, randn(N, seed=seed + 2)
    As = [randn(r, K, seed=seed + 10 + i) / K**0.5 for i, r in enumerate(ranks)]
    Bs = [randn(N, r, seed=seed + 20 + i) for i, r in enumerate(ranks)]
    c = randn(*lead, len(ranks), seed=seed + 3)
    for i in zero_experts:
        c[..., i] = 0.0
    dy = randn(*lead, N, seed=seed + 4)
    return x, W, b, As, Bs, c, dy


def _run(backend, case, dtype, adapter_dtype=None, x_view=None):
    x, W, b, As, Bs, c, dy = case
    adapter_dtype = adapter_dtype or dtype
    xs = leaf(x, dtype)
    A = leaf(torch.cat(As, 0), adapter_dtype)
    B = leaf(torch.cat(Bs, 1), adapter_dtype)
    cs = leaf(c, dtype)
    ranks = [a.shape[0] for a in As]
    with peft_fast.use_backend(backend):
        xin = x_view(xs) if x_view else xs
        y = ops.xlora_linear(xin, W.to(dtype), b.to(dtype), A, B, ranks, cs, [0.0] * len(ranks), True)
    return y, grads_of(y, dy, [xs, A, B, cs])


def _check(backend, case, dtype, x_view=None):
    require_backend(backend) if backend != "torch" else None
    x, W, b, As, Bs, c, dy = case
    xo, Ao, Bo, co = (leaf(t, torch.float64) for t in (x, torch.cat(As, 0), torch.cat(Bs, 1), c))
    ranks = [a.shape[0] for a in As]
    splits_A, splits_B = torch.split(Ao, ranks, 0), torch.split(Bo, ranks, 1)
    want = _oracle(xo, W, b, splits_A, splits_B, co)
    want_grads = grads_of(want, dy, [xo, Ao, Bo, co])
    got, got_grads = _run(backend, case, dtype, x_view=x_view)
    torch_path = torch_grads = None
    if dtype != torch.float32:
        torch_path, torch_grads = _run("torch", case, dtype, x_view=x_view)
    assert got.dtype == dtype
    assert_close_to_oracle("y", got, want, dtype, torch_path)
    for i, name in enumerate(["dx", "dA", "dB", "dcoeff"]):
        assert_close_to_oracle(name, got_grads[i], want_grads[i], dtype, torch_grads[i] if torch_grads else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "lead,K,N,ranks",
    [((7,), 33, 17, (1, 3)), ((2, 5), 40, 24, (2, 7, 16, 5)), ((1,), 16, 16, (8,)), ((3, 11), 21, 19, (3, 2, 4))],
)
def test_matches_fp64_oracle(backend, dtype, lead, K, N, ranks):
    _check(backend, _case(lead, K, N, ranks), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_zero_coefficients(backend):
    """x a strided (non-contiguous) view; experts 0 and 2 all-zero (top-k dropped): their
    rank tiles are skipped by the kernel, the result and every gradient stay exact."""
    case = _case((4, 6), 30, 20, (3, 5, 4), seed=5, zero_experts=(0, 2))
    x = case[0]
    wide = torch.cat([x, x * 3], dim=-1)  # (4, 6, 60): x is the strided view wide[..., :30]
    case = (wide[..., :30],) + case[1:]
    _check(backend, case, torch.float32)
    _check(backend, case, torch.float32, x_view=lambda t: t.transpose(0, 1).contiguous().transpose(0, 1))


def test_triton_forward_without_grad_skips_zero_tiles(monkeypatch):
    """Under no_grad the forward runs with skip_zero (no unscaled product kept), same result."""
    require_backend("triton")
    from peft_fast.kernels import xlora_shrink as module

    seen = []
    real = module._xlora_shrink_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((kwargs["SKIP_ZERO"], kwargs["STORE_RAW"]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, "_xlora_shrink_kernel", Spy())
    x, W, b, As, Bs, c, _ = _case((9,), 20, 12, (2, 3), zero_experts=(1,))
    want = _oracle(x, W, b, As, Bs, c)
    with torch.no_grad(), peft_fast.use_backend("triton"):
        got = ops.xlora_linear(
            x.float(), W.float(), b.float(), torch.cat(As).float(), torch.cat(Bs, 1).float(), [2, 3], c.float(), [0, 0]
        )
    assert seen == [(True, False)]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_dropout_one_mask_per_expert_and_none_in_eval():
    """Training with dropout: the torch path (the Triton backend declines it) draws each
    expert's mask separately, as HF peft does; eval applies none. Decoded exactly: with
    A_i = B_i = I, W = 0 and coefficients 1 and 1000, y = x (2 m_0 + 2000 m_1) for keep-masks m_i."""
    K = 64
    x = randn(32, K, dtype=torch.float32, seed=9).abs() + 0.5
    eye = torch.eye(K)
    args = (x, torch.zeros(K, K), None, torch.cat([eye, eye]), torch.cat([eye, eye], 1), [K, K])
    coeff = torch.tensor([1.0, 1000.0]).expand(32, 2)
    with peft_fast.use_backend("torch"):
        torch.testing.assert_close(ops.xlora_linear(*args, coeff, [0.5, 0.5], training=False), 1001 * x)
        ratio = (ops.xlora_linear(*args, coeff, [0.5, 0.5], training=True) / x).round()
    m1 = ratio >= 1000
    m0 = (ratio - 2000 * m1) == 2
    assert torch.all((ratio - 2000 * m1 - 2 * m0) == 0)  # every element decodes
    assert 0.4 < m0.float().mean() < 0.6 and 0.4 < m1.float().mean() < 0.6
    assert 0.15 < (m0 != m1).float().mean() < 0.85  # independent masks (one shared mask: never differ)
    why = dispatch._IMPLS["xlora_linear"]["triton"].supports(*args, coeff, [0.5, 0.5], training=True)
    assert why is not None and "dropout" in why


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_argument(backend):
    if backend != "torch":
        require_backend(backend)
    x, W, b, As, Bs, c, _ = _case((5,), 12, 6, (2, 3))
    A, B = torch.cat(As).float(), torch.cat(Bs, 1).float()
    good = [x.float(), W.float(), b.float(), A, B, [2, 3], c.float(), [0.0, 0.0]]
    bad = {
        5: ([2, 2], "lora_A must be"),
        6: (c.float()[:, :1], "token_scalings must be"),
        7: ([0.0], "dropout_ps must have one entry"),
        3: (A[:, :5], "lora_A must be"),
        4: (B.double(), "lora_A and lora_B must share a dtype"),
    }
    with peft_fast.use_backend(backend):
        for i, (value, msg) in bad.items():
            args = list(good)
            args[i] = value
            with pytest.raises((ValueError, TypeError), match=msg):
                ops.xlora_linear(*args)
        with pytest.raises(ValueError, match="ranks must be"):
            ops.xlora_linear(*good[:5], [5, 0], *good[6:])


def test_triton_custom_ops_have_fakes():
    require_backend("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, W = torch.empty(6, 8, device=DEVICE), torch.empty(4, 8, device=DEVICE)
        A, B, e, c = torch.empty(5, 8), torch.empty(4, 5), torch.empty(5, dtype=torch.int32), torch.empty(6, 2)
        y, hs, h = torch.ops.peft_fast.xlora_linear_triton_fwd(x, W, None, A, B, e, c, True)
    assert (y.shape, hs.shape, h.shape) == ((6, 4), (6, 5), (6, 5))
