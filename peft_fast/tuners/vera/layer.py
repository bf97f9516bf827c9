"""VeRA layers: `y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) A_sᵀ)) B_sᵀ)` on nn.Linear and
transformers' Conv1D (HF peft's vera.Linear).

`vera_A` (r, max in) and `vera_B` (max out, r) are frozen random projections shared by every
layer of the model: one BufferDict held by the VeraModel, each layer holding a reference to
that same module (so the tensors exist once in memory; the state-dict keys are HF peft's, one
per layer and one on the model). A layer uses the first `in` columns of A and `out` rows of
B. Only `vera_lambda_b` (out,) and `vera_lambda_d` (r,) train."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ... import ops
from ..base import AdapterLayer, linear_features


class BufferDict(nn.Module):
    """A dict of buffers, registered (persistent or not) on this module: HF peft's BufferDict."""

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        self.persistent = persistent

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        self.register_buffer(key, buffer, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def keys(self):  # noqa: ANN201 - dict view
        return self._buffers.keys()

    def values(self):  # noqa: ANN201 - dict view
        return self._buffers.values()


class VeraLinear(AdapterLayer):
    """VeRA adapters on one nn.Linear or Conv1D (weight stored (in, out), `fan_in_fan_out`)."""

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("vera_A", "vera_B", "vera_dropout", "r")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_features(base_layer)
        self.r: dict[str, int] = {}
        self.vera_dropout = nn.ModuleDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_A: BufferDict | None = None
        self.vera_B: BufferDict | None = None

    def update_layer(
        self,
        adapter_name: str,
        vera_A: BufferDict,
        vera_B: BufferDict,
        r: int,
        vera_dropout: float,
        init_weights: bool,
        d_initial: float,
    ) -> None:
        """Add adapter `adapter_name`: λ_b zero and λ_d = d_initial (init_weights), as HF peft
        initialises them; the layer refers to the model's shared projections."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if adapter_name not in vera_A:
            # Not the model's first VeRA adapter: it uses the first adapter's projections.
            A, B = next(iter(vera_A.values())), next(iter(vera_B.values()))
            if A.shape[1] < self.in_features or B.shape[0] < self.out_features:
                raise ValueError(
                    f"the shared vera_A/vera_B are {tuple(A.shape)}/{tuple(B.shape)}, too small for this layer"
                    f" ({self.in_features} -> {self.out_features}); the first VeRA adapter must target the largest"
                    " layers"
                )
            if A.shape[0] != r:
                raise ValueError(
                    f"all VeRA adapters of a model share vera_A/vera_B of rank {A.shape[0]}; got r={r} (HF peft"
                    " accepts a larger r here but then fails in the forward)"
                )
            vera_A[adapter_name] = A
            vera_B[adapter_name] = B
        self.r[adapter_name] = r
        self.vera_dropout[adapter_name] = nn.Dropout(p=vera_dropout) if vera_dropout > 0.0 else nn.Identity()
        # HF peft draws λ_d from the global generator (then overwrites it when init_weights).
        lambda_b = torch.ones(self.out_features)
        lambda_d = torch.randn(r)
        if init_weights:
            lambda_d.fill_(d_initial)
            lambda_b.zero_()
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else None
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b.to(device=w.device, dtype=dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d.to(device=w.device, dtype=dtype))
        self.vera_A = vera_A
        self.vera_B = vera_B
        self.set_adapter(self.active_adapters or [adapter_name])

    def dropout_p(self, adapter_name: str) -> float:
        d = self.vera_dropout[adapter_name]
        return d.p if isinstance(d, nn.Dropout) else 0.0

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """(λ_b B_s)(λ_d A_s), in the base weight's layout; fp16/bf16 on CPU computed in fp32 (HF peft)."""
        A, B = self.vera_A[adapter_name], self.vera_B[adapter_name]
        lambda_d, lambda_b = self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]
        dtype = B.dtype
        upcast = B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            A, B, lambda_d, lambda_b = A.float(), B.float(), lambda_d.float(), lambda_b.float()
        A = A[:, : self.in_features].to(lambda_d.device)
        B = B[: self.out_features, :].to(lambda_d.device)
        delta = (lambda_b.unsqueeze(-1) * B) @ (lambda_d.unsqueeze(-1) * A)
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(dtype) if upcast else delta

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        weight = self.base_layer.weight
        for name in self._adapters_to_merge(adapter_names):
            if name not in self.vera_lambda_d:
                continue
            delta = self.delta_weight(name)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN or inf into the base weights; not merged")
                weight.data = merged
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    def _unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.vera_lambda_d:
                weight.data -= self.delta_weight(name)

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        names = [a for a in self.active_adapters if a in self.vera_lambda_d]
        if not names:
            return None
        weight, bias = self.base_weight(), self.base_layer.bias
        result = None
        for name in names:
            args = (
                self.vera_A[name],
                self.vera_B[name],
                self.vera_lambda_d[name],
                self.vera_lambda_b[name],
                self.dropout_p(name),
                self.training,
            )
            if result is None:
                result = ops.vera_linear(x, weight, bias, *args)
            else:  # a second active adapter adds its update only
                result = result + ops.vera_linear(x, torch.zeros_like(weight), None, *args)
        return result

    def extra_repr(self) -> str:
        return f"fan_in_fan_out={self.fan_in_fan_out}"
