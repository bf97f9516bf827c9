"""LoHa: a weight update that is the Hadamard product of two low-rank products (HF peft's LoHa)."""

from ...config import register_peft_method
from .config import LoHaConfig
from .layer import LoHaLayer
from .model import LoHaModel

register_peft_method(name="loha", config_cls=LoHaConfig, model_cls=LoHaModel, prefix="hada_")

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaModel"]
