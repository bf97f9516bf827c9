"""LoRA layers: `y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ` on Linear, Conv1D and Embedding layers,
and DoRA (`use_dora=True`) on the same three, as HF peft 0.21 (see peft_fast/ops/dora_reference.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ... import ops
from ...ops.mixed_batch import LoraStackCache
from ..base import AdapterLayer, MixedBatch, linear_features


class DoraMagnitude(nn.Module):
    """One adapter's DoRA magnitude, `lora_magnitude_vector[adapter].weight` (one value per output
    feature): the parameter where HF peft's DoraLinearLayer keeps it, so state-dict keys match."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def __repr__(self) -> str:
        return f"lora.dora.DoraMagnitude({tuple(self.weight.shape)})"


def initial_magnitude(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """HF peft's DoRA initialisation: ‖W + s·B·A‖ per row of the (out, in) `weight`, computed as HF
    computes it (fp16 adapters go through fp32 for B·A; the norm in the promoted dtype)."""
    with torch.no_grad():
        fp16 = lora_A.dtype == torch.float16
        A, B = (lora_A.float(), lora_B.float()) if fp16 else (lora_A, lora_B)
        lora_weight = B @ A
        if fp16:
            lora_weight = lora_weight.half()
        w = weight.to(lora_A.device) + scaling * lora_weight
        return torch.linalg.norm(w, dim=1).to(w.dtype)


class LoraLayer(AdapterLayer):
    """Per-adapter numbers shared by the LoRA layer kinds."""

    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora", "use_dora")
    # The dimension of the stored base weight DoRA's norm runs over (1: rows of an (out, in)
    # weight; 0: Conv1D's (in, out) and Embedding's (num, dim) weights), see `_dora_norm_dim`.

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.use_dora: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA: adapter -> DoraMagnitude
        self._dora_norms = ops.DoraNormCache()  # eval-mode weight norms
        self._dora_merge_norms: dict[str, torch.Tensor] = {}  # norms of merged DoRA adapters, for unmerge
        self._replay_base: torch.Tensor | None = None  # see `_base_without_merged`

    def _set_numbers(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = self._initial_scaling(adapter_name)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()

    def dropout_p(self, adapter_name: str) -> float:
        d = self.lora_dropout[adapter_name]
        return d.p if isinstance(d, nn.Dropout) else 0.0

    def _initial_scaling(self, adapter: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.r[adapter]
        return self.lora_alpha[adapter] / (math.sqrt(r) if self.use_rslora[adapter] else r)

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the adapter's scaling to `scale` times its initial one (alpha / r, or alpha / sqrt(r)
        with rsLoRA); an adapter this layer does not have is ignored (HF peft's API)."""
        if adapter not in self.scaling:
            return
        self.scaling[adapter] = scale * self._initial_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the active adapters' current scaling by `scale` (HF peft's API; like HF peft it
        looks the adapters up in `lora_A`, so it leaves Embedding LoRA unchanged)."""
        for name in self.active_adapters:
            if name in self.lora_A:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scaling by `scale`, or reset it to the initial one when
        `scale` is None (HF peft's API; Embedding LoRA unchanged, as in HF peft)."""
        for name in self.active_adapters:
            if name in self.lora_A:
                self.scaling[name] = self._initial_scaling(name) if scale is None else self.scaling[name] / scale

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's A (r, in) and B (out, r)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _scaled_product(self, adapter_name: str) -> torch.Tensor:
        """`scaling · B A` in B's dtype, as HF peft's get_delta_weight computes it: fp16/bf16
        factors on CPU are multiplied (and scaled) in fp32 and the result cast back once."""
        A, B = self.lora_weights(adapter_name)
        dtype = B.dtype
        if B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            return ((B.float() @ A.float()) * self.scaling[adapter_name]).to(dtype)
        return (B @ A) * self.scaling[adapter_name]

    def active_lora(self) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
        """(A, B, scaling, dropout p) of the active adapters, or None if none is active here.

        Several active adapters are concatenated along the rank, each B pre-scaled; they
        must share one dropout probability."""
        names = [a for a in self.active_adapters if a in self.r]
        if not names:
            return None
        if len(names) == 1:
            A, B = self.lora_weights(names[0])
            return A, B, self.scaling[names[0]], self.dropout_p(names[0])
        ps = {self.dropout_p(a) for a in names}
        if len(ps) > 1:
            raise ValueError(f"active adapters {names} have different lora_dropout values; activate one at a time")
        pairs = [self.lora_weights(a) for a in names]
        A = torch.cat([a for a, _ in pairs], 0)
        B = torch.cat([b * self.scaling[n] for (_, b), n in zip(pairs, names)], 1)
        return A, B, 1.0, ps.pop()

    # -- DoRA ---------------------------------------------------------------------------------
    def _dora_norm_dim(self) -> int:
        """The dimension of the stored base weight that DoRA's norm reduces over (1 for nn.Linear's
        (out, in); 0 for Conv1D's (in, out) and Embedding's (num, dim))."""
        return 0 if getattr(self, "fan_in_fan_out", False) or isinstance(self, LoraEmbedding) else 1

    def _dora_weight(self) -> torch.Tensor:
        """The base weight DoRA's norm is taken of, as (out, in) for Linear / Conv1D and as stored
        (num, dim) for Embedding (quantized layers: dequantized)."""
        return self.base_weight()

    def _init_dora(self, adapter_name: str, use_dora: bool) -> None:
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
        self.use_dora[adapter_name] = use_dora
        if not use_dora:
            return
        A, B = self.lora_weights(adapter_name)
        weight = self._dora_weight()
        out_in = weight.T if isinstance(self, LoraEmbedding) else weight
        magnitude = initial_magnitude(out_in, A, B, self.scaling[adapter_name])
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    def _active_names(self) -> list[str]:
        """The active adapters this layer has, in activation order (HF peft applies them in turn)."""
        return [a for a in self.active_adapters if a in self.r]

    def _chained_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Several active adapters with at least one DoRA among them, applied one after the other
        as HF peft does: a DoRA adapter rescales the output its predecessors produced."""
        result = self._first_adapter_output(x, names[0])
        for name in names[1:]:
            result = self._add_adapter_output(result, x, name)
        return result

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        names = self._active_names()
        if not names:
            return None
        if any(self.use_dora.get(n, False) for n in names):
            if len(names) > 1:
                return self._chained_forward(x, names)
            return self._first_adapter_output(x, names[0])
        lora = self.active_lora()
        assert lora is not None
        return self._lora_forward(x, *lora)

    def _lora_forward(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float
    ) -> torch.Tensor:
        """The base output plus one (possibly rank-concatenated) LoRA update, dropout p on its input."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _first_adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        """The eval-mode cached norm of `name` over `weight` ((out, in)), or None (training)."""
        if self.training:
            return None
        A, B = self.lora_weights(name)
        return self._dora_norms.get(name, weight, A, B, self.scaling[name])

    def _refuse_dora_mixed(self, mb: MixedBatch) -> None:
        if any(self.use_dora.get(n, False) for n in mb.names):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")

    def train(self, mode: bool = True) -> LoraLayer:
        if mode:
            self._dora_norms.clear()  # HF peft's DoRA cache is cleared on train()
        return super().train(mode)

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """m / norm shaped to broadcast over the stored base weight."""
        factor = self.lora_magnitude_vector[name].weight / norm
        return factor.view(-1, 1) if self._dora_norm_dim() == 1 else factor.view(1, -1)

    # -- merging: one implementation for float and quantized bases (tuners/lora/bnb.py) ------------
    def _merge_weight(self) -> torch.Tensor:
        """The base weight merging works on, as stored (quantized layers: dequantized)."""
        return self.base_layer.weight.data

    def _store_weight(self, weight: torch.Tensor) -> None:
        """Put `weight`, shaped and laid out as `_merge_weight` gives it, into the base layer
        (quantized layers: requantized with the layer's own settings)."""
        self.base_layer.weight.data = weight

    def _warn_merge_step(self, step: str) -> None:
        """The warning HF peft gives before merging ("Merge") or unmerging ("Unmerge") each adapter:
        none on float layers."""

    def _plain_operands(self, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`weight` and a plain LoRA `delta` in the dtypes HF peft adds or subtracts them in: on float
        layers the delta cast to the weight's dtype."""
        return weight, delta.to(weight.dtype)

    def _plain_merged(self, weight: torch.Tensor, delta: torch.Tensor, safe_merge: bool) -> torch.Tensor:
        """`weight` with a plain LoRA `delta` added as HF peft adds it."""
        w, d = self._plain_operands(weight, delta)
        return w + d

    def _merge_norm(self, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """DoRA's merge norm ‖W₀ + ΔW‖ per output feature of the stored `base` and `delta`, both taken
        as (out, in) first (HF peft's `get_weight_norm` with scaling 1)."""
        if self._dora_norm_dim() == 0:
            base, delta = base.T, delta.T
        weight = base + delta
        return torch.linalg.norm(weight, dim=1).to(weight.dtype).detach()

    @contextmanager
    def _base_without_merged(self, safe_merge: bool) -> Iterator[torch.Tensor]:
        """HF peft's `_unmerged_base_weight`: the merged adapters are unmerged for real (quantized
        layers: dequantize, undo, requantize), a copy of the base weight is yielded, and they are
        merged again on exit. Merges during that replay get the same copy instead of replaying again."""
        if self._replay_base is not None:
            yield self._replay_base
            return
        merged = list(self.merged_adapters)
        try:
            if merged:
                self.unmerge()
            self._replay_base = self._merge_weight().detach().clone()
            yield self._replay_base
        finally:
            try:
                to_merge = [n for n in merged if n not in self.merged_adapters]
                if to_merge:
                    self.merge(safe_merge=safe_merge, adapter_names=to_merge)
            finally:
                self._replay_base = None

    def _merged_weight(self, name: str, safe_merge: bool) -> torch.Tensor:
        """The base weight with adapter `name` merged in (HF peft's `merge`). DoRA (HF's `merge_safe` /
        `merge_unsafe`): m / ‖W₀ + ΔW‖ ⊙ (W + ΔW), W₀ the base without the merged adapters (see
        `_base_without_merged`) and W the weight after that replay; the norm is kept for unmerge."""
        delta = self.delta_weight(name)
        if not self.use_dora.get(name, False):
            return self._plain_merged(self._merge_weight(), delta, safe_merge)
        with self._base_without_merged(safe_merge) as base:
            norm = self._merge_norm(base, delta)
        self._dora_merge_norms[name] = norm
        weight = self._merge_weight()  # rebuilt by the replay
        return (self._dora_factor(name, norm) * (weight + delta)).to(weight.dtype)

    def _unmerged_weight(self, name: str) -> torch.Tensor:
        """The base weight with adapter `name`, the last merged, taken out (HF peft's `unmerge`)."""
        delta = self.delta_weight(name)
        weight = self._merge_weight()
        if not self.use_dora.get(name, False):
            w, d = self._plain_operands(weight, delta)
            return w - d
        factor = self._dora_factor(name, self._dora_merge_norms.pop(name))
        return (weight / factor - delta).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Merge the adapters (default: the active ones) into the base weight one after another, as
        HF peft does; with `safe_merge`, a result holding NaN or inf raises ValueError and is not stored."""
        for name in self._adapters_to_merge(adapter_names):
            self._warn_merge_step("Merge")
            weight = self._merged_weight(name, safe_merge)
            if safe_merge and not torch.isfinite(weight).all():
                self._dora_merge_norms.pop(name, None)
                raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
            self._store_weight(weight)
            self.merged_adapters.append(name)
        self._dora_norms.clear()

    def _unmerge(self) -> None:
        while self.merged_adapters:
            self._warn_merge_step("Unmerge")
            weight = self._unmerged_weight(self.merged_adapters[-1])
            self.merged_adapters.pop()
            self._store_weight(weight)
        self._dora_norms.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dora_norms.clear()


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear or transformers' Conv1D (whose weight is stored (in, out))."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_features(base_layer)
        # Mixed-adapter batches on kernel backends: this layer's adapters stacked along the
        # rank, rebuilt when they change (memory cost: see peft_fast/ops/mixed_batch.py).
        self._lora_stack = LoraStackCache()

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
        use_dora: bool = False,
    ) -> None:
        self._set_numbers(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        w = self.base_layer.weight
        factory = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else None}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        # init_lora_weights=False keeps nn.Linear's random init for both: a non-identity adapter.
        self._init_dora(adapter_name, use_dora)
        self.set_adapter(self.active_adapters or [adapter_name])

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self._scaled_product(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def _lora_forward(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float
    ) -> torch.Tensor:
        """The base output plus one (possibly rank-concatenated) LoRA update."""
        return ops.lora_linear(x, self.base_weight(), self.base_layer.bias, A, B, scaling, p, self.training)

    def _dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The base output with the DoRA adapter `name` applied."""
        A, B = self.lora_weights(name)
        weight, scaling = self.base_weight(), self.scaling[name]
        norm = self._dora_norm(name, weight)
        magnitude = self.lora_magnitude_vector[name].weight
        p = self.dropout_p(name)
        return ops.dora_linear(x, weight, self.base_layer.bias, A, B, magnitude, scaling, p, self.training, norm=norm)

    def _first_adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.use_dora.get(name, False):
            return self._dora_forward(x, name)
        return self._lora_forward(x, *self.lora_weights(name), self.scaling[name], self.dropout_p(name))

    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.lora_weights(name)
        scaling, p = self.scaling[name], self.dropout_p(name)
        if not self.use_dora.get(name, False):
            return ops.lora_add(result, x, A, B, scaling, p, self.training)
        weight = self._dora_weight()
        magnitude = self.lora_magnitude_vector[name].weight
        bias, norm = self.base_layer.bias, self._dora_norm(name, weight)
        return ops.dora_add(result, x, weight, bias, A, B, magnitude, scaling, p, self.training, norm=norm)

    def _mixed_forward(self, x: torch.Tensor, mb: MixedBatch) -> torch.Tensor:
        self._refuse_dora_mixed(mb)
        names = list(self.lora_A.keys())
        return ops.lora_linear_mixed(
            x,
            self.base_weight(),
            self.base_layer.bias,
            [self.lora_A[n].weight for n in names],
            [self.lora_B[n].weight for n in names],
            [self.scaling[n] for n in names],
            [self.dropout_p(n) for n in names],
            mb.rows_for(names, x.device),
            self.training,
            plan=mb.plan_for(names, x.device),
            stack=self._lora_stack,
        )

    def _plain_merged(self, weight: torch.Tensor, delta: torch.Tensor, safe_merge: bool) -> torch.Tensor:
        """Without `safe_merge` HF peft's Linear adds the delta in place uncast (`weight += delta`),
        which rounds the sum once into the weight's dtype; with it, the delta is cast first."""
        if safe_merge:
            return super()._plain_merged(weight, delta, safe_merge)
        return (weight + delta).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"fan_in_fan_out={self.fan_in_fan_out}"


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: A (r, num_embeddings) indexed by token id, B (dim, r)."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
        use_dora: bool = False,
    ) -> None:
        self._set_numbers(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        w = self.base_layer.weight
        num, dim = w.shape
        A = torch.randn((r, num), device=w.device, dtype=w.dtype)
        B = torch.randn((dim, r), device=w.device, dtype=w.dtype)
        if init_lora_weights in (True, "gaussian"):
            nn.init.zeros_(A)
            nn.init.normal_(B)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(B)
        self._init_dora(adapter_name, use_dora)
        self.set_adapter(self.active_adapters or [adapter_name])

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._scaled_product(adapter_name).T

    def _embed(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, result: torch.Tensor | None = None
    ) -> torch.Tensor:
        base = self.base_layer
        return ops.lora_embedding(
            x,
            base.weight,
            A,
            B,
            scaling,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
            result=result,
        )

    def _lora_forward(
        self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, p: float
    ) -> torch.Tensor:
        """The lookup plus one (possibly rank-concatenated) LoRA update; HF peft applies no
        dropout to embedding LoRA, so `p` is unused."""
        return self._embed(x, A, B, scaling)

    def _first_adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.use_dora.get(name, False):
            return self._dora_embed(x, name)
        return self._embed(x, *self.lora_weights(name), self.scaling[name])

    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.use_dora.get(name, False):
            return self._dora_embed(x, name, result=result)
        return self._embed(x, *self.lora_weights(name), self.scaling[name], result=result)

    def _dora_embed(self, x: torch.Tensor, name: str, result: torch.Tensor | None = None) -> torch.Tensor:
        A, B = self.lora_weights(name)
        base, scaling = self.base_layer, self.scaling[name]
        norm = self._dora_norm(name, base.weight.T)
        return ops.dora_embedding(
            x,
            base.weight,
            A,
            B,
            self.lora_magnitude_vector[name].weight,
            scaling,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
            norm=norm,
            result=result,
        )

    def _mixed_forward(self, x: torch.Tensor, mb: MixedBatch) -> torch.Tensor:
        self._refuse_dora_mixed(mb)
        names = list(self.lora_embedding_A.keys())
        rows_idx = mb.rows_for(names, x.device)
        result = self.base_layer(x)
        for k, name in enumerate(names):
            rows = (rows_idx == k).nonzero().flatten()
            if rows.numel():
                A, B = self.lora_weights(name)
                result = result.index_copy(0, rows, self._embed(x[rows], A, B, self.scaling[name]).to(result.dtype))
        return result
