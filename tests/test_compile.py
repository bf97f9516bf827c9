"""Models compile with no graph break (`torch._dynamo.explain`): plain LoRA, IA³, and a batch
that mixes adapters (`adapter_names`), whose grouping is built from the host-side names (HF
peft 0.21 counts 0 breaks on the same model). The compiled mixed-batch model's output is
checked against HF peft's."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_inputs, make_model

import peft_fast
from peft_fast.ops import dispatch

NAMES = ["default", "b", "__base__", "default"]


def _explain(model, inputs, **kw):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**inputs, **kw)


def _two_adapters(lib):
    torch.manual_seed(0)
    m = lib.get_peft_model(make_model("llama"), lib.LoraConfig(r=4, init_lora_weights=False))
    m.add_adapter("b", lib.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    return m.eval()


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_single_adapter_models_have_no_graph_break(method):
    torch.manual_seed(0)
    config = peft_fast.LoraConfig(r=4, init_lora_weights=False) if method == "lora" else peft_fast.IA3Config()
    model = peft_fast.get_peft_model(make_model("llama"), config).eval()
    inputs = make_inputs("llama", batch=2, seq=3)
    with peft_fast.use_backend("torch"):
        explained = _explain(model, inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert len(explained.graphs) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_adapter_batch_has_no_graph_break(backend, monkeypatch):
    if backend == "triton" and dispatch.unavailable_reason("triton") is not None:
        pytest.skip(f"triton backend unavailable: {dispatch.unavailable_reason('triton')}")
    inputs = make_inputs("llama", batch=len(NAMES), seq=3)
    with torch.no_grad():
        expected = _two_adapters(peft)(**inputs, adapter_names=NAMES).logits
    ours = _two_adapters(peft_fast)
    calls = []
    if backend == "triton":  # show the Triton op ran (no fallback to torch)
        from peft_fast.ops.triton import mixed

        real = mixed.lora_linear_mixed
        monkeypatch.setitem(
            dispatch._IMPLS["lora_linear_mixed"],
            "triton",
            dispatch.Impl(lambda *a, **k: calls.append(1) or real(*a, **k), mixed.supports),
        )
    with peft_fast.use_backend(backend):
        explained = _explain(ours, inputs, adapter_names=NAMES)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(ours, fullgraph=True, backend="eager")(**inputs, adapter_names=NAMES).logits
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)
    assert backend == "torch" or calls
