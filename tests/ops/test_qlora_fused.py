"""The fused 4-bit matmul (kernels/qlora_matmul.py) behind the Triton backend of
`ops.lora_linear_4bit` (peft_fast/ops/triton/qlora.py), under the interpreter on CPU.

Oracle: the weight bitsandbytes' own pure-torch dequantizer reads from bitsandbytes' own
quantized bytes (its C kernel mis-reads some row lengths, see tests/quant/test_formats.py),
then float64 products. fp32 within 1e-5 of it; fp16 within twice the error of the same-dtype
torch path (kernel_testing.assert_close_to_oracle)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kernel_testing import DEVICE, assert_close_to_oracle, leaf, randn, rel_err, require_triton

import peft_fast
from peft_fast import ops
from peft_fast.ops import dispatch, reference
from peft_fast.quant.bnb import state_of
from peft_fast.quant.formats import code_4bit

BF = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle of the 4-bit format")
from test_dropout import philox_calls  # noqa: E402, F401  (the fixture counting Philox evaluations)


@pytest.fixture(autouse=True)
def _eager():
    """bitsandbytes torch.compiles its pure-torch dequantizer per shape: run it eagerly."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _quantized(N, K, quant_type, nested, blocksize=64, storage=torch.uint8, dtype=torch.float32, seed=0):
    """(our QuantState4bit read through the bitsandbytes bridge, the float64 weight bitsandbytes' own
    torch dequantizer gives for the same bytes)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = (randn(N, K, seed=seed) / K**0.5).to("cpu", torch.float32)
    packed, qs = BF.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, quant_storage=storage
    )
    qs.dtype = dtype
    absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if nested else qs.absmax
    code = BF.get_4bit_type(quant_type, device="cpu")
    w64 = _dequantize_4bit_compute(
        packed.view(torch.uint8).reshape(-1), absmax, code, blocksize, qs.shape, torch.float32
    )
    layer = SimpleNamespace(weight=SimpleNamespace(data=packed, quant_state=qs))
    state = state_of(layer)
    for name in ("packed", "absmax", "offset", "absmax2", "code2"):
        t = getattr(state, name)
        if t is not None:
            setattr(state, name, t.to(DEVICE))
    return state, w64.double().to(DEVICE)


# -- the in-K-loop dequantization, exactly -----------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((33, 100), 64), ((7, 37), 64), ((20, 130), 128)])
def test_kernel_decodes_the_bitsandbytes_weight_exactly(quant_type, nested, shape, blocksize):
    """a = I makes the product the decoded weight itself (one exact fp32 term per output):
    bit-identical to bitsandbytes' dequantization, transposed or not, small-M split-K or not."""
    require_triton()
    from peft_fast.kernels.qlora_matmul import qlora_matmul

    N, K = shape
    state, w64 = _quantized(N, K, quant_type, nested, blocksize)
    args = (state.packed_bytes(), code_4bit(quant_type, DEVICE), state.absmax, state.shape, blocksize)
    stats = {"absmax2": state.absmax2, "code2": state.code2, "offset": state.offset}
    wt = qlora_matmul(torch.eye(K, device=DEVICE), *args, transpose=True, **stats)  # (K, N) = Wᵀ
    assert torch.equal(wt, w64.float().t())
    w = qlora_matmul(torch.eye(N, device=DEVICE), *args, transpose=False, **stats)  # (N, K) = W
    assert torch.equal(w, w64.float())
    rows = qlora_matmul(torch.eye(K, device=DEVICE)[:3], *args, transpose=True, **stats)  # M = 3: split-K
    assert torch.equal(rows, w64.float().t()[:3])


# -- lora_linear_4bit on the Triton backend vs the float64 oracle -----------------------------

CASES = [  # quant type, nested, compute dtype, (lead, M, K, N), blocksize
    ("nf4", True, torch.float32, ((), 1, 64, 33), 64),
    ("nf4", True, torch.float16, ((2,), 3, 100, 70), 64),
    ("nf4", False, torch.float32, ((), 37, 130, 96), 64),
    ("nf4", False, torch.float16, ((), 2, 33, 40), 64),
    ("fp4", True, torch.float32, ((2,), 10, 100, 70), 128),
    ("fp4", False, torch.float16, ((), 1, 130, 33), 64),
    ("fp4", True, torch.float16, ((), 40, 64, 100), 64),
    ("fp4", False, torch.float32, ((), 16, 96, 64), 64),
]


def _run(backend, x, state, b, A, B, scaling, compute_dtype, dy):
    with peft_fast.use_backend(backend):
        y = ops.lora_linear_4bit(x, state, b, A, B, scaling, 0.0, True, compute_dtype)
    return [y, *torch.autograd.grad(y, [x, A, B, b], dy.to(y.dtype))]


@pytest.mark.parametrize("quant_type,nested,dtype,dims,blocksize", CASES)
def test_lora_linear_4bit_forward_backward_matches_fp64(quant_type, nested, dtype, dims, blocksize):
    require_triton()
    lead, M, K, N = dims
    r, s = 8, 0.75
    state, w64 = _quantized(N, K, quant_type, nested, blocksize, dtype=dtype, seed=M)
    x, b, dy = randn(*lead, M, K, seed=1), randn(N, seed=2), randn(*lead, M, N, seed=3)
    A, B = randn(r, K, seed=4) / K**0.5, randn(N, r, seed=5)

    x64, b64, A64, B64 = (leaf(t, torch.float64) for t in (x, b, A, B))
    y64 = x64 @ w64.T + b64 + s * (x64 @ A64.T) @ B64.T
    oracle = [y64, *torch.autograd.grad(y64, [x64, A64, B64, b64], dy)]

    got, torch_path = (
        _run(backend, leaf(x, dtype), state, leaf(b, dtype), leaf(A, dtype), leaf(B, dtype), s, dtype, dy)
        for backend in ("triton", "torch")
    )
    assert got[0].dtype == dtype and got[0].shape == (*lead, M, N)
    for name, g, o, t in zip(("y", "dx", "dA", "dB", "db"), got, oracle, torch_path):
        assert g.shape == o.shape, name
        assert_close_to_oracle(name, g, o, dtype, t)


# -- dropout on the fused path: the forward shrink's keep bytes, read again by dA and dx -------

DROPOUT_CASES = [  # quant type, nested, dtype, (lead, M, K, N), strided x, p
    ("nf4", True, torch.float32, ((2,), 5, 100, 70), False, 0.3),  # 3-D, K not a multiple of 8
    ("nf4", False, torch.float16, ((), 37, 130, 33), True, 0.1),  # strided, M above the decode split
    ("fp4", True, torch.float16, ((3,), 4, 64, 100), True, 0.5),  # 3-D and strided
    ("fp4", False, torch.float32, ((), 1, 33, 40), False, 0.2),  # one row: split-K decode
]


def _replayed_mask(seed_value: int, M: int, K: int, p: float) -> torch.Tensor:
    """The keep mask a fused call made after `torch.manual_seed(seed_value)`: the same seed drawn
    again, its keep bytes drawn by kernels/dropout.py and unpacked in torch."""
    from peft_fast.kernels.dropout import draw_keep_bytes, unpack_keep_bytes
    from peft_fast.ops.autograd import new_seed

    torch.manual_seed(seed_value)
    return unpack_keep_bytes(draw_keep_bytes(new_seed(torch.device(DEVICE)), M, K, p, DEVICE), K)


@pytest.mark.parametrize("quant_type,nested,dtype,dims,strided,p", DROPOUT_CASES)
def test_dropout_matches_fp64_with_the_recovered_mask(quant_type, nested, dtype, dims, strided, p):
    """y, dx, dA, dB, db of the fused op with dropout against float64 with the very mask the
    kernels drew (base on x, adapter on dropout(x)); fp16 within twice the error of the
    same-dtype torch composition given the same mask."""
    require_triton()
    lead, M, K, N = dims
    r, s = 8, 0.75
    state, w64 = _quantized(N, K, quant_type, nested, dtype=dtype, seed=K)
    xfull = randn(*lead, M, 2 * K, seed=11)
    x = xfull[..., ::2] if strided else xfull[..., :K]
    b, dy = randn(N, seed=12), randn(*lead, M, N, seed=13)
    A, B = randn(r, K, seed=14) / K**0.5, randn(N, r, seed=15)
    mask = _replayed_mask(100 + M, x.numel() // K, K, p).reshape(x.shape)
    assert 0 < mask.sum() < mask.numel()

    x64, b64, A64, B64 = (leaf(t, torch.float64) for t in (x, b, A, B))
    y64 = x64 @ w64.T + b64 + s * ((x64 * mask / (1 - p)) @ A64.T) @ B64.T
    oracle = [y64, *torch.autograd.grad(y64, [x64, A64, B64, b64], dy)]

    xs, bs, As, Bs = (leaf(t, dtype) for t in (x, b, A, B))
    if strided:  # the fused path gets the strided view itself
        xs = leaf(xfull, dtype)[..., ::2]
    torch.manual_seed(100 + M)
    with peft_fast.use_backend("triton"):
        y = ops.lora_linear_4bit(xs, state, bs, As, Bs, s, p, True, dtype)
    got = [y, *torch.autograd.grad(y, [xs, As, Bs, bs], dy.to(dtype))]

    xt, bt, At, Bt = (leaf(t, dtype) for t in (x, b, A, B))
    yt = reference.lora_add(reference.linear_4bit(xt, state, bt, dtype), xt * mask / (1 - p), At, Bt, s)
    torch_path = [yt, *torch.autograd.grad(yt, [xt, At, Bt, bt], dy.to(dtype))]
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    for name, g, o, t in zip(("y", "dx", "dA", "dB", "db"), got, oracle, torch_path):
        assert g.shape == o.shape, name
        assert_close_to_oracle(name, g, o, dtype, t)


def test_dropout_op_returns_the_keep_bytes_its_seed_draws():
    """The forward op's third output is the keep bytes of its seed (the mask dA and dx read), a
    fresh mask each call, the same after `torch.manual_seed`; eval mode applies none."""
    require_triton()
    from peft_fast.kernels.dropout import draw_keep_bytes
    from peft_fast.ops.triton.qlora import _state_args

    M, K, N, r, p = 9, 100, 40, 4, 0.25
    state, w64 = _quantized(N, K, "nf4", True)
    x, A, B = randn(M, K, seed=21).float(), randn(r, K, seed=22).float(), randn(N, r, seed=23).float()
    seed = torch.tensor([987], dtype=torch.int64, device=DEVICE)
    op = torch.ops.peft_fast.lora_linear_4bit_triton_fwd
    y, h, keep = op(x, None, A, B, *_state_args(state), 1.0, p, seed, torch.float32)
    assert torch.equal(keep, draw_keep_bytes(seed, M, K, p, DEVICE))
    with peft_fast.use_backend("triton"):
        torch.manual_seed(5)
        y1 = ops.lora_linear_4bit(x, state, None, A, B, 1.0, p, True, torch.float32)
        y2 = ops.lora_linear_4bit(x, state, None, A, B, 1.0, p, True, torch.float32)
        torch.manual_seed(5)
        y3 = ops.lora_linear_4bit(x, state, None, A, B, 1.0, p, True, torch.float32)
        y_eval = ops.lora_linear_4bit(x, state, None, A, B, 1.0, p, False, torch.float32)
    assert not torch.equal(y1, y2) and torch.equal(y1, y3)
    x64 = x.double()
    assert rel_err(y_eval, x64 @ w64.T + (x64 @ A.double().T) @ B.double().T) < 1e-5


@pytest.mark.parametrize("r", [4, 40])  # one rank block in the shrink, and several (bytes drawn first)
def test_a_4bit_training_step_draws_philox_as_the_plain_lora_path(r, philox_calls):  # noqa: F811 (the fixture)
    """Forward and backward of a 4-bit LoRA layer with dropout evaluate Philox exactly as many
    times as the plain LoRA layer of the same shapes (counted by the launch plan and at
    `tl.randint4x` under the interpreter, tests/test_dropout.py's `philox_calls`): one draw of the
    keep bytes in the forward shrink (1/8 evaluation per element of x when the tiles fit x), none
    in backward."""
    require_triton()
    from peft_fast.kernels.dropout import count_philox

    M, K, N = 64, 96, 32  # multiples of the interpreter's 32-row, 32-column shrink tiles
    state, w64 = _quantized(N, K, "nf4", True)
    counts = {}
    for path in ("plain", "4bit"):
        x, A, B = (leaf(randn(*shape, seed=31 + i), torch.float32) for i, shape in enumerate(((M, K), (r, K), (N, r))))
        philox_calls[0] = 0
        with peft_fast.use_backend("triton"), count_philox() as plan:
            if path == "plain":
                y = ops.lora_linear(x, w64.float(), None, A, B, 0.5, 0.1, True)
            else:
                y = ops.lora_linear_4bit(x, state, None, A, B, 0.5, 0.1, True, torch.float32)
            forward = philox_calls[0]
            y.backward(randn(M, N, seed=34).float())
        assert philox_calls[0] == forward == sum(n for _, n in plan), path
        assert x.grad is not None and A.grad is not None and B.grad is not None
        counts[path] = (list(plan), philox_calls[0])
    assert counts["4bit"] == counts["plain"]
    assert counts["4bit"][0] == ([("lora_shrink", M * K // 8)] if r == 4 else [("keep_bytes", counts["4bit"][1])])


@pytest.mark.parametrize("nested,p", [(True, 0.2), (False, 0.0)])
def test_opcheck_custom_ops(nested, p):
    """torch.library.opcheck of the forward and backward ops (schema, fake kernels, autograd
    registration, AOT dispatch), with the quant state as the ops take it."""
    require_triton()
    from peft_fast.ops.triton.qlora import _state_args

    M, K, N, r = 5, 64, 40, 4
    state, _ = _quantized(N, K, "nf4", nested)
    x, b = leaf(randn(M, K, seed=41), torch.float32), leaf(randn(N, seed=42), torch.float32)
    A, B = leaf(randn(r, K, seed=43), torch.float32), leaf(randn(N, r, seed=44), torch.float32)
    seed = torch.tensor([11], dtype=torch.int64, device=DEVICE) if p else None
    fwd_args = (x, b, A, B, *_state_args(state), 0.5, p, seed, torch.float32)
    torch.library.opcheck(torch.ops.peft_fast.lora_linear_4bit_triton_fwd.default, fwd_args)
    _, h, keep = torch.ops.peft_fast.lora_linear_4bit_triton_fwd(*fwd_args)
    dy = randn(M, N, seed=45).float()
    bwd_args = (dy, *(t.detach() for t in (x, A, B, h, keep)), *_state_args(state), 0.5, p, torch.float32, True)
    torch.library.opcheck(torch.ops.peft_fast.lora_linear_4bit_triton_bwd.default, bwd_args)


def test_strided_input_and_quant_storage():
    """x a strided view (every other column); the packed codes stored as bf16 and fp32."""
    require_triton()
    M, K, N, r = 5, 64, 48, 4
    xs = randn(M, 2 * K, seed=6).float()[:, ::2]
    A, B, dy = randn(r, K, seed=7).float(), randn(N, r, seed=8).float(), randn(M, N, seed=9)
    for storage in (torch.bfloat16, torch.float32):
        state, w64 = _quantized(N, K, "nf4", True, storage=storage)
        assert state.packed.dtype == storage
        x, A_, B_ = leaf(xs, torch.float32), leaf(A, torch.float32), leaf(B, torch.float32)
        with peft_fast.use_backend("triton"):
            y = ops.lora_linear_4bit(x, state, None, A_, B_, 2.0, 0.0, True, torch.float32)
        gx, gA, gB = torch.autograd.grad(y, [x, A_, B_], dy.float())
        x64, A64, B64 = leaf(xs, torch.float64), leaf(A, torch.float64), leaf(B, torch.float64)
        y64 = x64 @ w64.T + 2.0 * (x64 @ A64.T) @ B64.T
        for got, want in zip((y, gx, gA, gB), (y64, *torch.autograd.grad(y64, [x64, A64, B64], dy))):
            assert rel_err(got, want) < 1e-5


def test_backward_keeps_no_dequantized_weight():
    """Between forward and backward the fused path saves x, h, A and B: no (out, in) float copy."""
    require_triton()
    state, _ = _quantized(96, 128, "nf4", True)
    x, A, B = leaf(randn(4, 128), torch.float32), leaf(randn(8, 128), torch.float32), leaf(randn(96, 8), torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with peft_fast.use_backend("triton"):
            y = ops.lora_linear_4bit(x, state, None, A, B, 1.0, 0.0, True, torch.float32)
    assert saved and not any(t.shape == (96, 128) and t.is_floating_point() for t in saved)
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None


def test_what_stays_on_the_torch_path():
    """bf16 under the interpreter falls back (dispatch says why); dropout in training now stays on
    the fused path; "auto" on CPU tensors always takes the torch path."""
    require_triton()
    state, _ = _quantized(16, 64, "nf4", False)
    x, A, B = randn(3, 64).float(), randn(4, 64).float(), randn(16, 4).float()
    from peft_fast.ops.triton.qlora import _supports_lora, lora_linear_4bit

    with peft_fast.use_backend("triton"):
        assert _supports_lora(x, state, None, A, B, 1.0, 0.0, True, torch.float32) is None
        assert _supports_lora(x, state, None, A, B, 1.0, 0.1, True, torch.float32) is None
        assert "bf16" in _supports_lora(x, state, None, A, B, 1.0, 0.0, True, torch.bfloat16)
        args = (x, state, None, A, B, 1.0, 0.1, True, torch.float32)
        assert dispatch.select("lora_linear_4bit", *args) is lora_linear_4bit
    with peft_fast.use_backend("auto"):
        assert dispatch.select("lora_linear_4bit", x, state, None, A, B, 1.0, 0.0, True, torch.float32) is (
            reference.lora_linear_4bit
        )


def test_launcher_refuses_bad_operands():
    require_triton()
    from peft_fast.kernels.qlora_matmul import qlora_matmul

    state, _ = _quantized(16, 64, "nf4", False)
    args = (state.packed_bytes(), code_4bit("nf4", DEVICE), state.absmax, state.shape, 64)
    with pytest.raises(ValueError, match="a must have 64 columns"):
        qlora_matmul(torch.zeros(2, 16, device=DEVICE), *args)
    with pytest.raises(TypeError, match="a must be a 2-D float16/bfloat16/float32"):
        qlora_matmul(torch.zeros(2, 64, dtype=torch.int32, device=DEVICE), *args)
    with pytest.raises(ValueError, match="packed must hold 512 bytes"):
        qlora_matmul(torch.zeros(2, 64, device=DEVICE), args[0][:-1], *args[1:])
    with pytest.raises(ValueError, match="h and lora_B must both be given"):
        qlora_matmul(torch.zeros(2, 64, device=DEVICE), *args, h=torch.zeros(2, 4, device=DEVICE))
    keep = torch.zeros(2, 8, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="keep .* gates the LoRA term"):
        qlora_matmul(torch.zeros(2, 64, device=DEVICE), *args, keep=keep)
    lora = {"h": torch.zeros(2, 4, device=DEVICE), "lora_B": torch.zeros(64, 4, device=DEVICE)}
    with pytest.raises(ValueError, match="keep must be uint8 keep bytes of shape \\(2, 8\\)"):
        qlora_matmul(torch.zeros(2, 16, device=DEVICE), *args, transpose=False, keep=keep[:, :7], **lora)
