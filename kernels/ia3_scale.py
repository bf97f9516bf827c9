"""ia3_scale: a matmul with IA³ scaling fused in, and the gradient of the scale vector as a
fused reduction,

    z   = (x ⊙ in_scale) · Wᵀ + bias        (in_scale along K: the prologue)
    out = z ⊙ out_scale                      (out_scale along N: the epilogue)

x: M × K, W: N × K (any strides), in_scale: K, out_scale: N, all optional.

IA³ maps onto it as:
  attention-style layer (l: out)    forward  out = (x Wᵀ + b) ⊙ l, z saved when l needs grad
                                    backward dx = (dy ⊙ l) · W     (in_scale = l, W → Wᵀ view)
                                             dl = Σ_m dy ⊙ z       (prologue reduction)
  feed-forward layer (l: in)        forward  out = (x ⊙ l) Wᵀ + b
                                    backward g = dy · W, dx = g ⊙ l (out_scale = l)
                                             dl = Σ_m g ⊙ x        (epilogue reduction)

Reductions: the prologue one sums `x ⊙ R` over each program's BLOCK_M rows while x's tiles
stream through (only the programs of the first column of tiles do it, so each element is
counted once); the epilogue one sums `acc ⊙ R` over the tile's rows. Both write fp32
partials (num_m_tiles × width) that the launcher sums with torch: deterministic, no atomics.
The scaled x tile is rounded to x's dtype before the product, as the reference does;
accumulation is fp32; programs are grouped for L2 reuse; ragged edges are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import dot_precision, matmul_config, tl_dtype
from .tiles import check_matmul_operands, grouped_tile, load_tile, store_tile


@triton.jit
def _ia3_scale_kernel(
    x_ptr, w_ptr, bias_ptr, in_scale_ptr, out_scale_ptr, out_ptr, z_ptr,
    pro_r_ptr, pro_part_ptr, epi_r_ptr, epi_part_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_zm, stride_zn,
    stride_prm, stride_prk, stride_erm, stride_ern,
    HAS_BIAS: tl.constexpr, IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, STORE_Z: tl.constexpr,
    PRO_REDUCE: tl.constexpr, EPI_REDUCE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, M, K)
        if PRO_REDUCE:
            if pid_n == 0:
                r = load_tile(pro_r_ptr, offs_m, offs_k, stride_prm, stride_prk, M, K)
                part = tl.sum(x.to(tl.float32) * r.to(tl.float32), axis=0)
                tl.store(pro_part_ptr + pid_m * K + offs_k, part, mask=mask_k)
        if IN_SCALE:
            s_in = tl.load(in_scale_ptr + offs_k, mask=mask_k, other=0.0)
            x = x.to(tl.float32) * s_in.to(tl.float32)[None, :]
        w = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, K, N)
        # Round the scaled x to the operand dtype like the reference, then the product.
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if STORE_Z:
        store_tile(z_ptr, acc, offs_m, offs_n, stride_zm, stride_zn, M, N)
    if EPI_REDUCE:
        r = load_tile(epi_r_ptr, offs_m, offs_n, stride_erm, stride_ern, M, N)
        part = tl.sum(acc * r.to(tl.float32), axis=0)
        tl.store(epi_part_ptr + pid_m * N + offs_n, part, mask=mask_n)
    if OUT_SCALE:
        s_out = tl.load(out_scale_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * s_out.to(tl.float32)[None, :]
    store_tile(out_ptr, acc, offs_m, offs_n, stride_om, stride_on, M, N)


def ia3_scaled_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    store_z: bool = False,
    prologue_reduce: torch.Tensor | None = None,
    epilogue_reduce: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(out, z, pro, epi)` for `z = (x ⊙ in_scale) weightᵀ + bias`, `out = z ⊙ out_scale`.

    x: (M, K); weight: (N, K) of x's dtype; bias: (N,); in_scale: (K,); out_scale: (N,);
    out and z are new (M, N) tensors in x's dtype (z only when `store_z`, else None).
    `prologue_reduce` R (M, K) gives `pro = Σ_m x ⊙ R` (fp32, (K,)), computed on the
    unscaled x; `epilogue_reduce` R (M, N) gives `epi = Σ_m z ⊙ R` (fp32, (N,)), computed on
    the unscaled, unrounded z. Either is None when not asked for.
    """
    M, K, N = check_matmul_operands(x, weight)
    expected = {
        "bias": (bias, (N,)), "in_scale": (in_scale, (K,)), "out_scale": (out_scale, (N,)),
        "prologue_reduce": (prologue_reduce, (M, K)), "epilogue_reduce": (epilogue_reduce, (M, N)),
    }  # fmt: skip
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")
    cfg = matmul_config(x.device, x.dtype)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = torch.empty((M, N), dtype=x.dtype, device=x.device) if store_z else None
    tiles_m = triton.cdiv(M, cfg.block_m)
    pro = torch.zeros((tiles_m, K), dtype=torch.float32, device=x.device) if prologue_reduce is not None else None
    epi = torch.zeros((tiles_m, N), dtype=torch.float32, device=x.device) if epilogue_reduce is not None else None
    if M and N:
        dummy = out
        pr = prologue_reduce if prologue_reduce is not None else dummy
        er = epilogue_reduce if epilogue_reduce is not None else dummy
        grid = (tiles_m * triton.cdiv(N, cfg.block_n),)
        _ia3_scale_kernel[grid](
            x, weight, bias if bias is not None else dummy,
            in_scale if in_scale is not None else dummy, out_scale if out_scale is not None else dummy,
            out, z if z is not None else dummy, pr, pro if pro is not None else dummy,
            er, epi if epi is not None else dummy,
            M, N, K,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            pr.stride(0), pr.stride(1), er.stride(0), er.stride(1),
            HAS_BIAS=bias is not None, IN_SCALE=in_scale is not None, OUT_SCALE=out_scale is not None,
            STORE_Z=store_z, PRO_REDUCE=prologue_reduce is not None, EPI_REDUCE=epilogue_reduce is not None,
            DOT_DTYPE=tl_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return out, z, (pro.sum(0) if pro is not None else None), (epi.sum(0) if epi is not None else None)
