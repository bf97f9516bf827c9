"""LoKrModel: injects LoKr layers into a model's Linear, Conv1d and Conv2d modules."""

from __future__ import annotations

from ..lycoris import LycorisTuner
from .layer import LoKrLayer


class LoKrModel(LycorisTuner):
    """HF peft's LoKrModel: adapter parameters are named `lokr_*`."""

    prefix = "lokr_"
    layer_cls = LoKrLayer
    method_name = "LoKr"
