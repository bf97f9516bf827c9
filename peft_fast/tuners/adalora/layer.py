"""AdaLoRA's SVD layer: `ΔW = B (A ⊙ E) · lora_alpha / (ranknum + 1e-5)` on nn.Linear and
transformers' Conv1D (HF peft's SVDLinear).

Parameters, shapes, initialisation and state-dict keys are HF peft 0.21's: `lora_A` (r, in),
`lora_E` (r, 1), `lora_B` (out, r) as ParameterDicts, and `ranknum` (a frozen (1,) parameter
holding the initial rank, never saved). The forward runs through `ops.adalora_linear`."""

from __future__ import annotations

import torch
from torch import nn

from ... import ops
from ...ops.adalora import RANKNUM_EPS
from ..base import linear_features
from ..lora.layer import LoraLayer


class SVDLinear(LoraLayer):
    """AdaLoRA adapters on one nn.Linear or Conv1D (weight stored (in, out), `fan_in_fan_out`)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum", "_ranknum_value")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_features(base_layer)
        # HF peft's module order: lora_A and lora_B keep LoraLayer's slots, lora_E and ranknum come last.
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        # ranknum as a Python number, so the forward needs no device read.
        self._ranknum_value: dict[str, float] = {}

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, init_weights: bool
    ) -> None:
        """Add (or re-create at rank r) adapter `adapter_name`, initialised as HF peft does:
        E zero, A and B normal with std 0.02 (init_weights), or all standard normal."""
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be an integer >= 0 for AdaLoRA, got {r!r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        # HF peft draws A, E, B (and ranknum's placeholder) from the global generator in this order.
        A = torch.randn(r, self.in_features)
        E = torch.randn(r, 1)
        B = torch.randn(self.out_features, r)
        torch.randn(1)
        if init_weights:
            nn.init.zeros_(E)
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else None
        self.lora_A[adapter_name] = nn.Parameter(A.to(device=w.device, dtype=dtype))
        self.lora_E[adapter_name] = nn.Parameter(E.to(device=w.device, dtype=dtype))
        self.lora_B[adapter_name] = nn.Parameter(B.to(device=w.device, dtype=dtype))
        self.set_ranknum(adapter_name, float(r))
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.set_adapter(self.active_adapters or [adapter_name])

    def set_ranknum(self, adapter_name: str, value: float) -> None:
        """Set the rank the adapter's output is divided by (HF peft keeps the initial rank
        when the rank pattern shrinks a layer)."""
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), value, device=w.device, dtype=dtype), False)
        self._ranknum_value[adapter_name] = float(value)

    def _initial_scaling(self, adapter: str) -> float:
        alpha = self.lora_alpha[adapter]
        return alpha if alpha > 0 else float(self.r[adapter])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, E, B = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        delta = B @ (A * E) * self.scaling[adapter_name] / (self.ranknum[adapter_name] + RANKNUM_EPS)
        return delta.T if self.fan_in_fan_out else delta

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        names = [a for a in self.active_adapters if a in self.lora_A]
        if not names:
            return None
        weight, bias = self.base_weight(), self.base_layer.bias
        result = None
        for name in names:
            A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            args = (self.scaling[name], self._ranknum_value[name], self.dropout_p(name), self.training)
            if result is None:
                result = ops.adalora_linear(x, weight, bias, A, E, B, *args)
            else:  # a second active adapter adds its update only (no second base product)
                zero = torch.zeros_like(weight)
                result = result + ops.adalora_linear(x, zero, None, A, E, B, *args)
        return result

    def extra_repr(self) -> str:
        return f"fan_in_fan_out={self.fan_in_fan_out}"
