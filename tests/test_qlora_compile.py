"""A model with LoRA on bitsandbytes 4-bit layers, on the fused Triton backend, compiles with
torch.compile in one graph (`torch._dynamo.explain`: 0 graph breaks, the fused 4-bit custom
ops in the graph), and the compiled forward + backward, dropout included, equals a float64
oracle: bitsandbytes' own dequantized weights and the masks the kernels drew (the seeds
replayed, their keep bytes unpacked by kernels/dropout.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft_fast
from peft_fast.ops import dispatch

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (CPU support since 0.46)")
BF = pytest.importorskip("bitsandbytes.functional")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S, R = 2.0, 4  # lora_alpha / r, r


class TwoLayer4bit(nn.Module):
    """up (NF4, double-quantized, with bias) -> relu -> down (FP4, no bias), fp32 compute.
    in_features are multiples of 64: bitsandbytes 0.50.2's CPU dequantizer, the oracle here,
    mis-reads other row lengths (tests/quant/test_formats.py)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = self._layer(64, 128, True, "nf4", True)
        self.down = self._layer(128, 48, False, "fp4", False)

    @staticmethod
    def _layer(n_in: int, n_out: int, bias: bool, quant_type: str, nested: bool) -> nn.Module:
        layer = bnb.nn.Linear4bit(
            n_in, n_out, bias=bias, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=nested
        )
        w = torch.randn(n_out, n_in) / n_in**0.5
        layer.weight = bnb.nn.Params4bit(
            w, requires_grad=False, quant_type=quant_type, compress_statistics=nested, blocksize=64
        )
        if bias:
            layer.bias = nn.Parameter(torch.randn(n_out))
        return layer.to(DEVICE)  # quantizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _dequantized(layer: nn.Module) -> torch.Tensor:
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes compiles its own dequantizer
        return BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()


def _lora(model: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    params = dict(model.named_parameters())
    (a,) = (p for n, p in params.items() if f".{name}.lora_A." in n)
    (b,) = (p for n, p in params.items() if f".{name}.lora_B." in n)
    return a, b


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_4bit_lora_model_compiles_in_one_graph_and_matches_fp64(dropout):
    reason = dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    from peft_fast.kernels.dropout import draw_keep_bytes, unpack_keep_bytes
    from peft_fast.ops.autograd import new_seed

    base = TwoLayer4bit()
    w_up, w_down, b_up = _dequantized(base.up), _dequantized(base.down), base.up.bias.detach().double()
    config = peft_fast.LoraConfig(
        r=R, lora_alpha=S * R, target_modules=["up", "down"], lora_dropout=dropout, init_lora_weights=False
    )
    model = peft_fast.get_peft_model(base, config).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 64, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(3, 7, 48, generator=g).to(DEVICE)

    with peft_fast.use_backend("triton"):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        (graph,) = explained.graphs
        fused = [n for n in graph.graph.nodes if "lora_linear_4bit_triton_fwd" in str(n.target)]
        assert len(fused) == 2  # both layers on the fused op, not the torch path
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.manual_seed(7)
        y = compiled(x)
        y.backward(dy)

    torch.manual_seed(7)  # the two seeds the layers drew, in order
    seeds = [new_seed(x.device), new_seed(x.device)] if dropout else []
    x64 = x.detach().double().reshape(-1, 64).requires_grad_()
    (A1, B1), (A2, B2) = _lora(model, "up"), _lora(model, "down")
    lora64 = [t.detach().double().requires_grad_() for t in (A1, B1, A2, B2)]

    def adapter_input(t: torch.Tensor, seed_index: int) -> torch.Tensor:
        if not dropout:
            return t
        keep = unpack_keep_bytes(draw_keep_bytes(seeds[seed_index], *t.shape, dropout, t.device), t.shape[1])
        return t * keep / (1 - dropout)

    a64 = x64 @ w_up.T + b_up + S * (adapter_input(x64, 0) @ lora64[0].T) @ lora64[1].T
    h64 = torch.relu(a64)
    y64 = h64 @ w_down.T + S * (adapter_input(h64, 1) @ lora64[2].T) @ lora64[3].T
    want = [y64, *torch.autograd.grad(y64, [x64, *lora64], dy.double().reshape(-1, 48))]
    got = [y.reshape(-1, 48), x.grad.reshape(-1, 64), A1.grad, B1.grad, A2.grad, B2.grad]
    for name, gt, w in zip(("y", "dx", "dA_up", "dB_up", "dA_down", "dB_down"), got, want):
        err = ((gt.double() - w).norm() / w.norm()).item()
        assert err < 1e-5, f"{name}: relative error {err:.3g}"
