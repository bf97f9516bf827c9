"""LoKr: a weight update that is the Kronecker product of two small matrices (HF peft's LoKr)."""

from ...config import register_peft_method
from .config import LoKrConfig
from .layer import LoKrLayer, factorization
from .model import LoKrModel

register_peft_method(name="lokr", config_cls=LoKrConfig, model_cls=LoKrModel)

__all__ = ["LoKrConfig", "LoKrLayer", "LoKrModel", "factorization"]
