"""The LoKr layer: `ΔW = kron(w1, w2) · alpha / r` on Linear, Conv1d and Conv2d.

Parameters, shapes (from `factorization`), initialisation and state-dict keys are HF peft
0.21's: w1 is `lokr_w1` or `lokr_w1_a @ lokr_w1_b` (decompose_both at a small rank), w2 is
`lokr_w2`, `lokr_w2_a @ lokr_w2_b`, or the CP form `lokr_t2 ×₁ lokr_w2_a ×₂ lokr_w2_b`
(use_effective_conv2d). The forward applies the Kronecker product to x as two small matmuls
where that is cheaper than building ΔW (see `peft_fast.ops.lokr`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ... import ops
from ..lycoris import LycorisLayer
from .config import LoKrConfig


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """HF peft's (LyCORIS') split of `dimension` into m · n with m <= n.

    factor > 0 that divides the dimension: (factor, dimension // factor). Otherwise the pair
    closest to square whose smaller number is at most `factor` (any, for -1); HF peft does not
    refuse a factor that does not divide (LoKrLayer warns)."""
    if factor > 0 and (dimension % factor) == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def _split(dimension: int, factor: int, what: str, key: str | None) -> tuple[int, int]:
    m, n = factorization(dimension, factor)
    if factor > 0 and dimension % factor != 0:
        where = f" of {key!r}" if key else ""
        warnings.warn(
            f"decompose_factor={factor} does not divide the {what} ({dimension}){where}; as HF peft does, LoKr "
            f"factors it as {m} x {n} instead",
            stacklevel=4,
        )
    return m, n


class LoKrLayer(LycorisLayer):
    """LoKr adapters on one Linear, Conv1d or Conv2d base layer."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lokr_w1 = nn.ParameterDict()
        self.lokr_w1_a = nn.ParameterDict()
        self.lokr_w1_b = nn.ParameterDict()
        self.lokr_w2 = nn.ParameterDict()
        self.lokr_w2_a = nn.ParameterDict()
        self.lokr_w2_b = nn.ParameterDict()
        self.lokr_t2 = nn.ParameterDict()

    def update_layer(self, adapter_name: str, r: int, alpha: float, config: LoKrConfig, key: str | None = None) -> None:
        """Add adapter `adapter_name` with rank r, shaped and initialised as HF peft does
        (init_weights=True: w1 zero, so the adapter starts as the identity)."""
        self._set_numbers(adapter_name, r, alpha, config)
        base = self.base_layer
        n_in = base.in_channels // base.groups if self.is_conv else base.in_features
        n_out = self.out_features
        in_m, in_n = _split(n_in, config.decompose_factor, "input dimension", key)
        out_l, out_k = _split(n_out, config.decompose_factor, "output dimension", key)
        kernel = tuple(base.kernel_size) if self.is_conv else ()
        use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = not (r < max(out_k, in_n) / 2)
        effective = config.use_effective_conv2d and self.is_conv and any(k != 1 for k in kernel)

        shapes: dict[str, tuple[int, ...]] = {}
        if use_w1:
            shapes["lokr_w1"] = (out_l, in_m)
        else:
            shapes["lokr_w1_a"] = (out_l, r)
            shapes["lokr_w1_b"] = (r, in_m)
        if use_w2:
            shapes["lokr_w2"] = (out_k, in_n, *kernel)
        elif effective:
            shapes["lokr_t2"] = (r, r, kernel[0], kernel[1] if len(kernel) == 2 else 1)
            shapes["lokr_w2_a"] = (r, out_k)
            shapes["lokr_w2_b"] = (r, in_n)
        else:
            shapes["lokr_w2_a"] = (out_k, r)
            shapes["lokr_w2_b"] = (r, in_n * math.prod(kernel))
        params = {name: torch.empty(shape) for name, shape in shapes.items()}
        self._init(params, config.init_weights)
        self._finish_new_adapter(adapter_name, params)

    @staticmethod
    def _init(params: dict[str, torch.Tensor], init_weights: bool | str) -> None:
        """HF peft's three initialisations, drawing in its order: w1's, w2's, then t2."""
        he = math.sqrt(5)

        def kaiming(name: str) -> None:
            nn.init.kaiming_uniform_(params[name], a=he)

        lycoris = init_weights == "lycoris"
        zero_w1 = bool(init_weights) and not lycoris
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b"):
            if name not in params:
                continue
            if zero_w1 and name != "lokr_w1_b":
                nn.init.zeros_(params[name])
            else:
                kaiming(name)
        for name in ("lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if name not in params:
                continue
            if lycoris and name != "lokr_w2_a":
                nn.init.zeros_(params[name])
            else:
                kaiming(name)
        if "lokr_t2" in params:
            kaiming("lokr_t2")

    def kron_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) of the adapter, built from their factors where they are factored."""
        if adapter_name in self.lokr_w1:
            w1 = self.lokr_w1[adapter_name]
        else:
            w1 = self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]
        if adapter_name in self.lokr_w2:
            w2 = self.lokr_w2[adapter_name]
        elif adapter_name in self.lokr_t2:
            w2 = torch.einsum(
                "i j k l, i p, j r -> p r k l",
                self.lokr_t2[adapter_name],
                self.lokr_w2_a[adapter_name],
                self.lokr_w2_b[adapter_name],
            )
        else:
            w2 = self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]
        return w1, w2

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1, w2 = self.kron_factors(adapter_name)
        return ops.lokr.lokr_delta_weight(w1, w2, self.scaling[adapter_name]).reshape(self.base_layer.weight.shape)

    def _rank_dropout_rows(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        # HF peft: an fp32 keep mask, rescaled by the kept fraction only with rank_dropout_scale.
        drop = (torch.rand(self.out_features) > self.rank_dropout[adapter_name]).float()
        if self.rank_dropout_scale[adapter_name]:
            drop /= drop.mean()
        return drop.to(self.base_layer.weight.device)

    def _delta_activations(self, adapter_name: str, x: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
        w1, w2 = self.kron_factors(adapter_name)
        scaling = self.scaling[adapter_name]
        if not self.is_conv:
            return ops.lokr_linear(x, w1, w2, scaling, row_scale)
        return ops.lokr_conv(x, w1, w2, scaling, row_scale, **self._conv_args())
