"""LoRA on an nn.Embedding that uses every lookup option (padding_idx, max_norm, norm_type,
scale_grad_by_freq, sparse): output, gradients and the in-place max_norm renormalisation as
HF peft's lora.Embedding, and the reference op against plain `F.embedding` lookups."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_fast
from peft_fast.ops import reference


class _Tiny(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.emb = nn.Embedding(11, 6, **options)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


OPTIONS = {
    "padding": {"padding_idx": 0},
    "max_norm": {"max_norm": 0.5},
    "max_norm_l1": {"max_norm": 1.0, "norm_type": 1.0},
    "freq": {"scale_grad_by_freq": True, "padding_idx": 2},
    "sparse": {"sparse": True},
}


def _twins(options):
    torch.manual_seed(0)
    cfg = dict(r=3, lora_alpha=6, target_modules=["emb"], init_lora_weights=False)
    theirs = peft.get_peft_model(_Tiny(**options), peft.LoraConfig(**cfg))
    ours = peft_fast.get_peft_model(_Tiny(**options), peft_fast.LoraConfig(**cfg))
    ours.load_state_dict(theirs.state_dict())
    for model in (theirs, ours):  # the base embedding trains too: its gradient shows padding and frequency
        emb = model.base_model.model.emb
        emb.base_layer.weight.requires_grad_(True)
        if options.get("sparse"):
            # HF peft cannot backpropagate a sparse gradient through lora_embedding_A's transpose
            # ("permute(sparse_coo)"), and neither can we: A stays frozen, the base gradient is sparse
            emb.lora_embedding_A["default"].requires_grad_(False)
    return theirs, ours


@pytest.mark.parametrize("name", list(OPTIONS))
def test_embedding_lora_with_lookup_options_as_hf_peft(name):
    theirs, ours = _twins(OPTIONS[name])
    ids = torch.tensor([[0, 2, 5, 5, 7], [2, 2, 9, 0, 10]])
    results = []
    for model in (theirs, ours):
        out = model(input_ids=ids)
        out.pow(2).sum().backward()
        emb = model.base_model.model.emb
        grads = [emb.base_layer.weight.grad, emb.lora_embedding_A["default"].grad, emb.lora_embedding_B["default"].grad]
        grads = [g if g is not None else torch.zeros(()) for g in grads]
        results.append((out.detach(), [g.to_dense() if g.is_sparse else g for g in grads], grads[0].is_sparse,
                        emb.base_layer.weight.detach().clone()))  # fmt: skip
    (out_t, g_t, sparse_t, w_t), (out_o, g_o, sparse_o, w_o) = results
    torch.testing.assert_close(out_o, out_t)
    assert sparse_o == sparse_t
    for got, want in zip(g_o, g_t):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(w_o, w_t)  # max_norm renormalises the looked-up rows in place, as HF peft


def test_reference_lookup_defaults_are_f_embedding_defaults():
    """Called with max_norm and no norm_type, the reference renormalises with the 2-norm."""
    g = torch.Generator().manual_seed(3)
    weight, A, B = torch.randn(9, 4, generator=g), torch.randn(2, 9, generator=g), torch.randn(4, 2, generator=g)
    ids = torch.tensor([[1, 3, 8]])
    got_w = weight.clone()
    got = reference.lora_embedding(ids, got_w, A.clone(), B, 0.5, max_norm=1.0)
    want_w, A_w = weight.clone(), A.clone()
    want = F.embedding(ids, want_w, max_norm=1.0) + 0.5 * F.embedding(ids, A_w.T, max_norm=1.0) @ B.T
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_w, want_w)


def test_sparse_embedding_with_trainable_lora_A_fails_as_in_hf_peft():
    """HF peft's lookup of lora_embedding_A with sparse=True cannot backpropagate into A; ours
    uses the same lookup (so that gradients agree with HF peft's wherever HF peft's exist)."""
    torch.manual_seed(0)
    cfg = dict(r=3, lora_alpha=6, target_modules=["emb"], init_lora_weights=False)
    for lib in (peft, peft_fast):
        model = lib.get_peft_model(_Tiny(sparse=True), lib.LoraConfig(**cfg))
        with pytest.raises(RuntimeError, match="sparse"):
            model(input_ids=torch.tensor([[1, 2]])).sum().backward()
