"""VeRA: frozen random projections shared by all layers, with trainable scaling vectors
λ_b and λ_d per layer (HF peft's VeRA)."""

from ...config import register_peft_method
from .config import VeraConfig
from .layer import BufferDict, VeraLinear
from .model import VeraModel

register_peft_method(name="vera", config_cls=VeraConfig, model_cls=VeraModel, prefix="vera_lambda_")

__all__ = ["BufferDict", "VeraConfig", "VeraLinear", "VeraModel"]
