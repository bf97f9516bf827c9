"""`peft_fast.ops.lora_linear_mixed` (a batch mixing adapters) on each kernel backend against
the float64 reference (`reference.lora_linear_mixed`): Triton (peft_fast/ops/triton/mixed.py,
kernels/sgmv_*.py, kernels/bgmv_*.py, kernels/segments.py) on both its SGMV and BGMV path, and
CUDA (peft_fast/ops/cuda/mixed.py, csrc/sgmv_*.cu); plus the grouping and the weight-stack
cache both read (peft_fast/ops/mixed_batch.py).

Tests taking `impl` run on every (backend, path): Triton on CPU under Triton's interpreter
(set in tests/conftest.py, so shapes stay tiny), CUDA on a GPU only (skipped cleanly elsewhere).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import (
    DEVICE,
    assert_close_to_oracle,
    dropout_keep_mask,
    gpu_only,
    grads_of,
    kernel_op,
    leaf,
    randn,
    rel_err,
    require_backend,
    require_triton,
)

import peft_fast
from peft_fast.ops import dispatch, reference
from peft_fast.ops.mixed_batch import LoraStackCache, group_rows

# (backend, path): the Triton backend's two paths, and the CUDA backend (one path).
IMPLS = [("triton", "sgmv"), ("triton", "bgmv"), pytest.param(("cuda", None), marks=pytest.mark.gpu)]


@pytest.fixture(params=IMPLS, ids=lambda p: "-".join(filter(None, p)))
def impl(request):
    """`lora_linear_mixed` of one backend, on one path (keyword `path` forced on Triton)."""
    backend, path = request.param
    require_backend(backend)
    fn = _module(backend).lora_linear_mixed

    def run(*args, **kwargs):
        return fn(*args, path=path, **kwargs) if path else fn(*args, **kwargs)

    run.backend = backend
    return run


@pytest.fixture
def triton_backend():
    require_triton()


def _module(backend):
    import importlib

    return importlib.import_module(f"peft_fast.ops.{backend}.mixed")


def _sgmv():
    return _module("triton")


def _case(lead, K, N, ranks, row_adapter, seed=0, bias=True):
    """float64 master inputs of one mixed call (x of shape lead + (K,)), plus dy."""
    t = iter(range(seed * 1000, seed * 1000 + 1000))
    x = randn(*lead, K, seed=next(t))
    W = randn(N, K, seed=next(t)) / K**0.5
    b = randn(N, seed=next(t)) if bias else None
    As = [randn(r, K, seed=next(t)) / K**0.5 for r in ranks]
    Bs = [randn(N, r, seed=next(t)) for r in ranks]  # nonzero, unlike HF's init
    scalings = [0.5 + 0.25 * (k % 5) for k in range(len(ranks))]
    dy = randn(*lead, N, seed=next(t))
    return x, W, b, As, Bs, scalings, torch.tensor(row_adapter, device=DEVICE), dy


def _run(fn, case, dtype, ps=None, training=True, **kw):
    """(y, [dx, dA_0.., dB_0..]) of `fn` with inputs cast to dtype (adapters too);
    None for adapters no row uses."""
    x, W, b, As, Bs, sc, ra, dy = case
    ps = ps or [0.0] * len(As)
    xs = leaf(x, dtype)
    Ast, Bst = [leaf(a, dtype) for a in As], [leaf(q, dtype) for q in Bs]
    y = fn(xs, W.to(dtype), b.to(dtype) if b is not None else None, Ast, Bst, sc, ps, ra, training, **kw)
    grads = torch.autograd.grad(y, [xs] + Ast + Bst, dy.to(dtype), allow_unused=True)
    return y, list(grads)


def _oracle(case, dtype):
    x, W, b, As, Bs, sc, ra, dy = case
    r = lambda t: t.to(dtype).double() if t is not None else None  # noqa: E731
    rounded = (r(x), r(W), r(b), [r(a) for a in As], [r(q) for q in Bs], sc, ra, r(dy))
    return _run(reference.lora_linear_mixed, rounded, torch.float64)


def _check(impl, case, dtype):
    y64, g64 = _oracle(case, dtype)
    y, g = _run(impl, case, dtype)
    y_t, g_t = (None, [None] * len(g))
    if dtype != torch.float32:
        y_t, g_t = _run(reference.lora_linear_mixed, case, dtype)
    assert y.dtype == dtype and y.shape == y64.shape
    names = ["y", "dx"] + [f"dA{k}" for k in range(len(case[3]))] + [f"dB{k}" for k in range(len(case[3]))]
    for name, got, want, base in zip(names, [y] + g, [y64] + g64, [y_t] + g_t):
        if want is None:  # an adapter no row uses gets no gradient, as in the reference
            assert got is None, name
            continue
        assert_close_to_oracle(name, got, want, dtype, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize(
    "lead,K,N,ranks,rows",
    [
        ((5, 3), 33, 40, [1, 4, 8], [2, -1, 0, 2, 1]),  # 3-D, base rows, every rank
        ((7,), 7, 100, [5, 16], [1, 1, 0, -1, 1, 0, 1]),  # decode-shaped
        ((1, 7), 100, 7, [3], [0]),  # one row, odd sizes
        ((4, 2, 3), 16, 33, [2, 2, 9], [2, 0, 0, 2]),  # 4-D: 6 tokens per row; adapter 1 unused
    ],
)
def test_matches_fp64_reference(impl, lead, K, N, ranks, rows, dtype):
    _check(impl, _case(lead, K, N, ranks, rows), dtype)


def test_ranks_1_to_64_in_one_batch(impl):
    ranks = [1, 4, 8, 16, 64]
    rows = [4, 0, 3, -1, 1, 2, 4, 0, 2, 3, 1]
    _check(impl, _case((11, 2), 24, 20, ranks, rows, seed=3), torch.float32)


def test_seventy_adapters_in_one_batch(impl):
    n = 70
    ranks = [1 + (k * 7) % 16 for k in range(n)]
    rows = [(k * 11) % n for k in range(n)] + [-1, 5, 5, 69]
    _check(impl, _case((len(rows),), 16, 16, ranks, rows, seed=4), torch.float32)


def test_all_rows_on_one_adapter(impl):
    _check(impl, _case((6, 5), 20, 18, [4, 8], [1] * 6, seed=5), torch.float32)


def test_all_rows_base_only_is_the_base_layer(impl):
    case = _case((4, 3), 12, 10, [4, 2], [-1] * 4, seed=6)
    y, g = _run(impl, case, torch.float32)
    x, W, b, *_ = case
    torch.testing.assert_close(y, F.linear(x.float(), W.float(), b.float()))
    assert all(t is None for t in g[1:])


def test_per_adapter_grads_equal_training_each_alone(impl):
    """Each adapter's gradient comes from its own rows only: the same as lora_linear on
    those rows alone (dropout off)."""
    x, W, b, As, Bs, sc, ra, dy = case = _case((6, 4), 24, 20, [3, 8, 1], [2, 0, 2, -1, 0, 1], seed=7)
    _, g = _run(impl, case, torch.float32)
    n = len(As)
    for k in range(n):
        rows = (ra == k).nonzero().flatten()
        xs, A, B = leaf(x[rows], torch.float64), leaf(As[k], torch.float64), leaf(Bs[k], torch.float64)
        y = reference.lora_linear(xs, W, b, A, B, sc[k])
        gx, gA, gB = grads_of(y, dy[rows], [xs, A, B])
        assert rel_err(g[1 + k], gA) < 1e-5 and rel_err(g[1 + n + k], gB) < 1e-5, k
        assert rel_err(g[0][rows], gx) < 1e-5, k


def test_strided_input_view(impl):
    x, W, b, As, Bs, sc, ra, dy = _case((5, 3), 40, 12, [2, 6], [1, 0, -1, 1, 0], seed=8)
    wide = randn(5, 3, 2 * 40, seed=99)
    wide[..., ::2] = x
    view = wide[..., ::2]  # last-dim stride 2: reshaped by a copy inside the op
    y = impl(view.float(), W.float(), b.float(), [a.float() for a in As], [q.float() for q in Bs], sc, [0, 0], ra)
    want = reference.lora_linear_mixed(x, W, b, As, Bs, sc, [0, 0], ra)
    assert rel_err(y, want) < 1e-5


# ---- dropout -------------------------------------------------------------------------------


def test_dropout_masks_match_the_philox_mask_forward_and_backward(impl):
    """Per-adapter p; backward applies the forward's mask (its keep bytes, drawn once)."""
    x, W, b, As, Bs, sc, ra, dy = _case((6, 2), 32, 24, [4, 8, 2], [0, 1, -1, 2, 1, 0], seed=9)
    ps = [0.3, 0.0, 0.5]
    torch.manual_seed(123)
    y, g = _run(impl, (x, W, b, As, Bs, sc, ra, dy), torch.float32, ps=ps)
    torch.manual_seed(123)
    seed = torch.randint(0, 2**31 - 1, (1,), device=DEVICE, dtype=torch.int64)  # the op's draw
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    T = M // x.shape[0]
    factor = torch.zeros(M, K, dtype=torch.float64, device=DEVICE)  # keep / (1 - p) of each token's adapter
    for k, p in enumerate(ps):
        keep = dropout_keep_mask(impl.backend, seed, M, K, p).double() / (1 - p)
        for row in (ra == k).nonzero().flatten().tolist():
            factor[row * T : row * T + T] = keep[row * T : row * T + T]
    x64 = leaf(x, torch.float64)
    A64, B64 = [leaf(a, torch.float64) for a in As], [leaf(q, torch.float64) for q in Bs]
    xd64 = (x64.reshape(M, K) * factor).reshape(x.shape)  # dropped x feeds the adapters, plain x the base
    want = F.linear(x64, W, b)
    for k in range(len(ps)):
        rows = (ra == k).nonzero().flatten()
        xr = xd64[rows]
        want = want.index_add(0, rows, F.linear(F.linear(xr, A64[k]), B64[k]) * sc[k])
    gw = grads_of(want, dy, [x64] + A64 + B64)
    for name, got, w in zip(["y", "dx", "dA0", "dA1", "dA2", "dB0", "dB1", "dB2"], [y] + g, [want] + gw):
        assert rel_err(got, w) < 1e-5, name


def test_dropout_fresh_each_call_and_off_in_eval(impl):
    x, W, b, As, Bs, sc, ra, dy = _case((4, 3), 16, 16, [4], [0, 0, -1, 0], seed=10)
    args = (x.float(), W.float(), b.float(), [As[0].float()], [Bs[0].float()], sc, [0.5], ra)
    f = impl
    y1, y2 = f(*args, True), f(*args, True)
    assert not torch.equal(y1, y2)
    torch.manual_seed(1)
    y3 = f(*args, True)
    torch.manual_seed(1)
    assert torch.equal(y3, f(*args, True))
    want = reference.lora_linear_mixed(x, W, b, As, Bs, sc, [0.5], ra, training=False)
    assert rel_err(f(*args, False), want) < 1e-5


# ---- grouping, weight stack, dispatch, errors -----------------------------------------------


def test_grouping_of_rows_by_adapter():
    """group_rows from host lists (what layers pass) and from a tensor give the same grouping."""
    for ids in ([2, -1, 0, 2, 1, 0], torch.tensor([2, -1, 0, 2, 1, 0])):
        groups = group_rows(ids, DEVICE)
        assert groups.present == (0, 1, 2) and groups.seg_rows == (2, 1, 2) and groups.batch_size == 6
        assert groups.row_order.tolist() == [2, 5, 4, 0, 3] and groups.seg_start.tolist() == [0, 2, 3, 5]
        assert groups.seg_starts == [0, 2, 3, 5] and groups.seg_adapter.tolist() == [0, 1, 2]
        assert groups.row_adapter.tolist() == [2, -1, 0, 2, 1, 0]
        assert groups.row_order.dtype == torch.int32 and groups.row_order.device.type == DEVICE
    empty = group_rows(torch.tensor([-1, -1]))
    assert empty.present == () and empty.num_adapted_rows == 0
    with pytest.raises(ValueError, match="row_adapter"):
        group_rows(torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="row_adapter"):
        group_rows([0, -2])
    with pytest.raises(TypeError, match="row_adapter"):
        group_rows(torch.tensor([0.0]))
    with pytest.raises(TypeError, match="row_adapter"):
        group_rows([0, 1.0])


def test_path_choice(triton_backend):
    choose = _sgmv().choose_path
    assert choose(group_rows(torch.arange(8)), 1) == "bgmv"  # decode, all distinct
    assert choose(group_rows(torch.zeros(64, dtype=torch.long)), 1) == "sgmv"  # decode, one adapter
    assert choose(group_rows(torch.arange(8)), 128) == "sgmv"  # prefill


def test_stack_cache_reused_and_refreshed():
    As = [randn(2, 8, dtype=torch.float32), randn(3, 8, dtype=torch.float32)]
    Bs = [randn(5, 2, dtype=torch.float32), randn(5, 3, dtype=torch.float32)]
    cache = LoraStackCache()
    s1 = cache.get(As, Bs, [1.0, 2.0], [0.0, 0.1])
    assert cache.get(As, Bs, [1.0, 2.0], [0.0, 0.1]) is s1
    assert s1.A.shape == (5, 8) and s1.B.shape == (5, 5) and s1.offset.tolist() == [0, 2]
    with torch.no_grad():
        As[1].mul_(2.0)  # in-place update (an optimizer step, load_state_dict)
    s2 = cache.get(As, Bs, [1.0, 2.0], [0.0, 0.1])
    assert s2 is not s1 and torch.equal(s2.A[2:], As[1])
    assert cache.get(As, Bs, [1.0, 3.0], [0.0, 0.1]).scaling.tolist() == [1.0, 3.0]
    s3 = cache.get(As[:1], Bs[:1], [1.0], [0.0])  # an adapter deleted
    assert s3.A.shape == (2, 8)
    leafA = As[0].clone().requires_grad_()
    s4 = cache.get([leafA, As[1]], Bs, [1.0, 2.0], [0.0, 0.1], include=[0])  # training: present only, in autograd
    assert s4.A.requires_grad and s4.A.shape == (2, 8) and s4.ranks == (2, 0)


def test_dispatch_selects_the_backend_and_falls_back(impl):
    x, W, b, As, Bs, sc, ra, dy = _case((3, 2), 16, 8, [2], [0, -1, 0], seed=11)
    args = (x.float(), W.float(), b.float(), [As[0].float()], [Bs[0].float()], sc, [0.0], ra)
    with peft_fast.use_backend(impl.backend):
        assert dispatch.select("lora_linear_mixed", *args) is _module(impl.backend).lora_linear_mixed
        mixed = (
            x.float(),
            W.float(),
            b.float(),
            [As[0].float(), As[0].double()],
            [Bs[0].float(), Bs[0].double()],
            sc * 2,
            [0.0, 0.0],
            ra,
        )
        assert dispatch.select("lora_linear_mixed", *mixed) is reference.lora_linear_mixed
        y = peft_fast.ops.lora_linear_mixed(*args)
    assert rel_err(y, reference.lora_linear_mixed(x, W, b, As, Bs, sc, [0.0], ra)) < 1e-5


def test_errors_name_the_argument(impl):
    x, W, b, As, Bs, sc, ra, dy = _case((3, 2), 16, 8, [2, 4], [0, -1, 1], seed=12)
    f = impl
    xf, Wf, bf = x.float(), W.float(), b.float()
    Af, Bf = [a.float() for a in As], [q.float() for q in Bs]
    with pytest.raises(ValueError, match="lora_Bs"):
        f(xf, Wf, bf, Af, Bf[:1], sc, [0.0, 0.0], ra)
    with pytest.raises(ValueError, match=r"lora_As\[1\]"):
        f(xf, Wf, bf, [Af[0], Af[1][:, :3]], Bf, sc, [0.0, 0.0], ra)
    with pytest.raises(ValueError, match=r"dropout_ps\[0\]"):
        f(xf, Wf, bf, Af, Bf, sc, [1.0, 0.0], ra)
    with pytest.raises(TypeError, match=r"scalings\[1\]"):
        f(xf, Wf, bf, Af, Bf, [1.0, "2"], [0.0, 0.0], ra)
    with pytest.raises(ValueError, match="row_adapter"):
        f(xf, Wf, bf, Af, Bf, sc, [0.0, 0.0], ra[:2])
    with pytest.raises(ValueError, match="adapter 2"):
        f(xf, Wf, bf, Af, Bf, sc, [0.0, 0.0], torch.tensor([0, 2, 1], device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        f(xf, Wf, bf, [Af[0], Af[1].half()], [Bf[0], Bf[1].half()], sc, [0.0, 0.0], ra)
    with pytest.raises(ValueError, match="plan groups 2 rows"):
        f(xf, Wf, bf, Af, Bf, sc, [0.0, 0.0], ra, plan=group_rows([0, 1], DEVICE))
    if impl.backend == "triton":
        with pytest.raises(ValueError, match="path"):
            _sgmv().lora_linear_mixed(xf, Wf, bf, Af, Bf, sc, [0.0, 0.0], ra, path="gemm")


def test_launcher_errors_name_the_argument(triton_backend):
    from peft_fast.kernels.segments import StackedRanks
    from peft_fast.kernels.sgmv_expand import sgmv_expand
    from peft_fast.kernels.sgmv_shrink import sgmv_shrink

    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    segs = group_rows([0, 0], DEVICE)
    ranks = StackedRanks(i32([2]), i32([0]), 2)
    x, A = randn(2, 8, dtype=torch.float32), randn(2, 8, dtype=torch.float32)
    one = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="a_stacked"):
        sgmv_shrink(x, A[:, :4], segs, ranks, one)
    with pytest.raises(TypeError, match="seg_start"):
        sgmv_shrink(x, A, segs._replace(seg_start=segs.seg_start.long()), ranks, one)
    with pytest.raises(ValueError, match="scales"):
        sgmv_shrink(x, A, segs, ranks, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="keep must be uint8 keep bytes of shape \\(2, 1\\)"):
        sgmv_shrink(x, A, segs, ranks, one, keep=torch.ones(2, 8, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(ValueError, match="h must be"):
        sgmv_expand(torch.zeros(2, 4, device=DEVICE), torch.zeros(2, 1, device=DEVICE), A[:, :4].t(), segs, ranks, one)
    with pytest.raises(ValueError, match="divide"):
        sgmv_shrink(randn(3, 8, dtype=torch.float32), A, segs, ranks, one)


# ---- GPU only --------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize(
    "lead,K,N,ranks,rows",
    [
        ((64, 33), 1024, 1536, [8, 16, 64, 1], [k % 5 - 1 for k in range(64)]),
        ((256,), 4096, 1024, [16] * 40 + [64] * 24, [(k * 7) % 64 for k in range(256)]),
        ((3, 500), 512, 768, [4, 32], [1, 0, 1]),
    ],
)
def test_gpu_bf16(impl, lead, K, N, ranks, rows):
    _check(impl, _case(lead, K, N, ranks, rows), torch.bfloat16)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ranks", [[4], [1, 8, 16], [3, 33, 64, 2]])
@pytest.mark.parametrize("M,K,N", [(7, 33, 20), (100, 64, 72), (300, 136, 40)])
def test_gpu_random_groupings(impl, M, K, N, ranks, dtype):
    """Random row_adapter (some adapters may get no row: those get no gradient), odd sizes."""
    g = torch.Generator().manual_seed(M + K)
    rows = torch.randint(-1, len(ranks), (M,), generator=g).tolist()
    _check(impl, _case((M,), K, N, ranks, rows, seed=M), dtype)


@gpu_only
def test_gpu_more_adapters_than_one_cuda_launch_holds(impl):
    """More segments than one CUDA kernel argument table (48): the launchers split them."""
    n = 60
    rows = [k % (n + 1) - 1 for k in range(400)]
    _check(impl, _case((400,), 32, 24, [2 + (i % 5) for i in range(n)], rows, seed=13), torch.float32)


@gpu_only
def test_gpu_bf16_dropout_runs_and_is_reproducible(impl):
    case = _case((16, 64), 1024, 1024, [8, 16, 32], [k % 4 - 1 for k in range(16)])
    torch.manual_seed(0)
    y1, g1 = _run(impl, case, torch.bfloat16, ps=[0.1, 0.0, 0.2])
    torch.manual_seed(0)
    y2, g2 = _run(impl, case, torch.bfloat16, ps=[0.1, 0.0, 0.2])
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2) if a is not None)


# ---- torch.library ------------------------------------------------------------------------


def _op_args(backend, x, W, b, As, Bs, sc, ps, ids, seed):
    """The forward custom op's arguments for 2-D x grouped by `ids` (what the public function builds)."""
    groups = group_rows(ids, DEVICE)
    st = LoraStackCache().get(As, Bs, sc, ps, groups.present)
    max_rank = max(st.ranks[a] for a in groups.present)
    if backend == "triton":
        present, seg_rows = list(groups.present), list(groups.seg_rows)
        return (x, W, b, st.A, st.B, *groups[:4], present, seg_rows, st.ints, st.numbers, max_rank, seed, "sgmv")
    segs = [[st.offsets[a] for a in groups.present], [st.ranks[a] for a in groups.present]]
    return (x, W, b, st.A, st.B, groups.row_order, groups.seg_starts, *segs, [sc[a] for a in groups.present],
            [ps[a] for a in groups.present], seed, max_rank)  # fmt: skip


def test_opcheck_custom_ops(impl):
    x, W, b, As, Bs, sc, ra, dy = _case((6,), 16, 12, [2, 3, 5], [2, 0, -1, 2, 0, 2], seed=14)
    x, W, b = x.float(), W.float(), b.float()
    As, Bs = [leaf(a, torch.float32) for a in As], [leaf(q, torch.float32) for q in Bs]
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    for ps, sd in (([0.0] * 3, None), ([0.2, 0.0, 0.1], seed)):
        args = _op_args(impl.backend, x, W, b, As, Bs, sc, ps, ra.tolist(), sd)
        torch.library.opcheck(kernel_op("lora_linear_mixed", impl.backend).default, args)


def test_torch_compile_fullgraph(impl):
    """No graph break through dispatch and the custom op when the grouping is given (as layers
    give it); the compiled output and gradients match the float64 reference, then eager."""
    case = _case((5, 3), 16, 12, [2, 4], [1, 0, -1, 1, 1], seed=15)
    y64, g64 = _oracle(case, torch.float32)
    x, W, b, As, Bs, sc, ra, dy = case
    groups = group_rows(ra.tolist(), DEVICE)
    xs, Al, Bl = leaf(x, torch.float32), [leaf(a, torch.float32) for a in As], [leaf(q, torch.float32) for q in Bs]

    def f(x, A0, A1, B0, B1):
        return impl(x, W.float(), b.float(), [A0, A1], [B0, B1], sc, [0.0, 0.0], groups.row_adapter, plan=groups)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(xs, *Al, *Bl)
    got = [compiled] + grads_of(compiled, dy, [xs, *Al, *Bl])
    for name, g, w in zip(["y", "dx", "dA0", "dA1", "dB0", "dB1"], got, [y64] + g64):
        assert rel_err(g, w) < 1e-5, name
    eager = f(xs, *Al, *Bl)
    for g, e in zip(got, [eager] + grads_of(eager, dy, [xs, *Al, *Bl])):
        torch.testing.assert_close(g, e)
