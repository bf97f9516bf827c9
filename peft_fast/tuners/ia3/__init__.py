"""IA³: learned vectors that scale the output of attention projections and the input of
feed-forward projections."""

from ...config import register_peft_method
from .config import IA3Config
from .layer import IA3Linear
from .model import IA3Model

register_peft_method(name="ia3", config_cls=IA3Config, model_cls=IA3Model)

__all__ = ["IA3Config", "IA3Linear", "IA3Model"]
