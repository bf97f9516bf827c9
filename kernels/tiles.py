"""What every kernel in this folder shares: tile loads/stores and program ordering
(`@triton.jit` device functions), and the host-side check of matmul operands."""

import torch
import triton
import triton.language as tl


def check_matmul_operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int]:
    """(M, K, N) for x (M, K) and weight (N, K) of one dtype; ValueError/TypeError otherwise."""
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x (M, K) and weight (N, K) do not fit: {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on {x.device}, got {weight.device}")
    return x.shape[0], x.shape[1], weight.shape[0]


@triton.jit
def load_tile(ptr, offs_r, offs_c, stride_r, stride_c, rows, cols):
    """The (offs_r × offs_c) tile of a rows × cols strided matrix, zeros outside it."""
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) for program `pid`, walking GROUP_M tile-rows at a time for L2 reuse
    (Triton's matmul tutorial)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def store_tile(ptr, value, offs_r, offs_c, stride_r, stride_c, rows, cols):
    """Store `value` (cast to ptr's element type) into the in-bounds part of the
    (offs_r × offs_c) tile of a rows × cols strided matrix."""
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    tl.store(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, value.to(ptr.dtype.element_ty), mask=mask)
