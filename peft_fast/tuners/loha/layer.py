"""The LoHa layer: `ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha / r` on Linear, Conv1d and Conv2d.

Parameters, shapes, initialisation and state-dict keys are HF peft 0.21's. The forward never
builds ΔW where the rank-r² Khatri-Rao product is cheaper (see `peft_fast.ops.loha`).

One documented difference: with use_effective_conv2d (the CP tensors hada_t1/hada_t2), HF peft
0.21's hand-written backward (LyCORIS' HadaWeightCP) gives wrong gradients for hada_w1_a and
hada_w2_a (it contracts with the other factor's tensor); here autograd differentiates the same
forward, so those gradients are the true ones. Outputs and all other gradients match.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ..lycoris import LycorisConfig, LycorisLayer, conv_flat_shape


class LoHaLayer(LycorisLayer):
    """LoHa adapters on one Linear, Conv1d or Conv2d base layer."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        self.hada_t1 = nn.ParameterDict()
        self.hada_t2 = nn.ParameterDict()

    def update_layer(
        self, adapter_name: str, r: int, alpha: float, config: LycorisConfig, key: str | None = None
    ) -> None:
        """Add adapter `adapter_name` with rank r, initialised as HF peft does (init_weights=True:
        He-uniform factors with hada_w2_b zero, so the adapter starts as the identity)."""
        self._set_numbers(adapter_name, r, alpha, config)
        base = self.base_layer
        kernel = tuple(base.kernel_size) if self.is_conv else ()
        # HF peft: the CP form only for kernels larger than 1 (a 1x1 kernel is a matmul).
        effective = config.use_effective_conv2d and self.is_conv and any(k != 1 for k in kernel)
        if effective:
            out_ch, in_ch = base.weight.shape[:2]
            t_shape = (r, r, kernel[0], kernel[1] if len(kernel) == 2 else 1)
            shapes = {
                "hada_t1": t_shape,
                "hada_w1_a": (r, out_ch),
                "hada_w1_b": (r, in_ch),
                "hada_t2": t_shape,
                "hada_w2_a": (r, out_ch),
                "hada_w2_b": (r, in_ch),
            }
        else:
            n_out, n_in = conv_flat_shape(base) if self.is_conv else tuple(base.weight.shape)
            shapes = {"hada_w1_a": (n_out, r), "hada_w1_b": (r, n_in), "hada_w2_a": (n_out, r), "hada_w2_b": (r, n_in)}
        params = {name: torch.empty(shape) for name, shape in shapes.items()}
        he = math.sqrt(5)
        nn.init.kaiming_uniform_(params["hada_w1_a"], a=he)
        nn.init.kaiming_uniform_(params["hada_w1_b"], a=he)
        nn.init.kaiming_uniform_(params["hada_w2_a"], a=he)
        if config.init_weights:
            nn.init.zeros_(params["hada_w2_b"])
        else:
            nn.init.kaiming_uniform_(params["hada_w2_b"], a=he)
        if effective:
            nn.init.kaiming_uniform_(params["hada_t1"], a=he)
            nn.init.kaiming_uniform_(params["hada_t2"], a=he)
        self._finish_new_adapter(adapter_name, params)

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return (
            self.hada_w1_a[adapter_name],
            self.hada_w1_b[adapter_name],
            self.hada_w2_a[adapter_name],
            self.hada_w2_b[adapter_name],
        )

    def _cp(self, adapter_name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if adapter_name in self.hada_t1:
            return self.hada_t1[adapter_name], self.hada_t2[adapter_name]
        return None, None

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        t1, t2 = self._cp(adapter_name)
        dw = ops.loha.loha_delta_weight(*self._factors(adapter_name), self.scaling[adapter_name], t1, t2)
        return dw.reshape(self.base_layer.weight.shape)

    def _rank_dropout_rows(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        # HF peft: rows kept with probability 1 - p, always rescaled by the kept fraction.
        drop = (torch.rand(self.out_features) > self.rank_dropout[adapter_name]).to(dtype)
        return (drop / drop.mean()).to(self.base_layer.weight.device)

    def _delta_activations(self, adapter_name: str, x: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
        factors = self._factors(adapter_name)
        scaling = self.scaling[adapter_name]
        if not self.is_conv:
            return ops.loha_linear(x, *factors, scaling, row_scale)
        t1, t2 = self._cp(adapter_name)
        return ops.loha_conv(x, *factors, scaling, row_scale, **self._conv_args(), t1=t1, t2=t2)
