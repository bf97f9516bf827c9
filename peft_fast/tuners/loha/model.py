"""LoHaModel: injects LoHa layers into a model's Linear, Conv1d and Conv2d modules."""

from __future__ import annotations

from ..lycoris import LycorisTuner
from .layer import LoHaLayer


class LoHaModel(LycorisTuner):
    """HF peft's LoHaModel: adapter parameters are named `hada_*`."""

    prefix = "hada_"
    layer_cls = LoHaLayer
    method_name = "LoHa"
