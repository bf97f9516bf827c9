"""The X-LoRA classifier: HF peft 0.21's architecture, initialisation and state-dict keys.

An MLP on the last hidden state (depth 1: one Linear; deeper: Linear, ReLU, [Dropout], ...,
Linear, sizes hidden -> xlora_size -> ... -> n_experts [× n_layers]) whose output, softmaxed
with a temperature, gives each token's weight for each expert, shared by every LoRA layer or
one set per layer (`layerwise_scalings`)."""

from __future__ import annotations

import torch
from torch import nn

from .config import XLoraConfig


class TemperatureScaledSoftmax(nn.Module):
    """softmax(logits / temperature) over the last dim."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.softmax(logits / self.temperature)


class XLoraClassifier(nn.Module):
    """Predicts scalings (batch, seq, n_layers, n_classes) from the model's last hidden state;
    `n_layers` counts LoRA layers, not transformer blocks. Built on `device` in `dtype` (the
    base model's), with nn.Linear's default initialisation in HF peft's order."""

    def __init__(
        self, config: XLoraConfig, n_classes: int, n_layers: int, device: torch.device | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.n_layers = n_layers
        self.config = config
        self.log_scalings: list[torch.Tensor] = []
        self.softmax = TemperatureScaledSoftmax(temperature=config.softmax_temperature)
        self.override_scaling_pass_value: float = config.scaling_pass_value
        self.scalings_logging = False
        self.dtype = dtype
        out = n_classes * n_layers if config.layerwise_scalings else n_classes

        def linear(n_in: int, n_out: int) -> nn.Linear:
            return nn.Linear(n_in, n_out, bias=True).to(device).to(dtype)

        layers: list[nn.Module] = []
        if config.xlora_depth == 1:
            last = linear(config.hidden_size, out)
        else:
            layers += [linear(config.hidden_size, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0.0:
                layers.append(nn.Dropout(p=config.xlora_dropout_p))
            for _ in range(config.xlora_depth - 2):
                layers += [linear(config.xlora_size, config.xlora_size), nn.ReLU()]
                if config.xlora_dropout_p > 0.0:
                    layers.append(nn.Dropout(p=config.xlora_dropout_p))
            last = linear(config.xlora_size, out)
        self.layers = nn.Sequential(*layers, last)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """Scalings (batch, seq, n_layers, n_classes) for a last hidden state (batch, seq, hidden)."""
        batch, seq = hidden_state.shape[:2]
        logits = self.layers(hidden_state)
        if self.config.layerwise_scalings:
            scalings = logits.reshape(batch, seq, self.n_layers, self.n_classes)
            if self.config.enable_softmax:
                scalings = self.softmax(scalings)
        else:
            # The same scalings for every layer: softmax once, then a broadcast view (HF peft
            # softmaxes the broadcast copy, the same values n_layers times).
            scalings = logits.reshape(batch, seq, 1, self.n_classes)
            if self.config.enable_softmax:
                scalings = self.softmax(scalings)
            scalings = scalings.expand(-1, -1, self.n_layers, -1)
        if self.scalings_logging:
            self.log_scalings.append(scalings)
        return scalings

    def bucketed_scalings(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: {seq_len: (positions in the log, scalings)}."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, scaling in enumerate(self.log_scalings):
            positions, tensors = buckets.setdefault(scaling.shape[1], ([], []))
            positions.append(i)
            tensors.append(scaling)
        return buckets

    def set_override_scaling_pass_value(self, value: float | None) -> None:
        """The scaling pass's value; None means 1 / n_classes (HF peft's rule). Kept in the config."""
        self.override_scaling_pass_value = 1 / self.n_classes if value is None else value
        self.config.scaling_pass_value = self.override_scaling_pass_value
