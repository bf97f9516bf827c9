"""AdaLoRA: LoRA in SVD form (A, E, B) whose ranks are pruned during training by importance
(HF peft's AdaLoRA). Call `update_and_allocate` every step, or use
`peft_fast.integrations.AdaLoraCallback` with the Trainer."""

from ...config import register_peft_method
from .allocator import RankAllocator
from .config import AdaLoraConfig
from .layer import SVDLinear
from .model import AdaLoraModel

# As in HF peft, AdaLoRA's weights carry LoRA's prefix (its model class derives from LoRA's).
register_peft_method(name="adalora", config_cls=AdaLoraConfig, model_cls=AdaLoraModel, prefix="lora_")

__all__ = ["AdaLoraConfig", "AdaLoraModel", "RankAllocator", "SVDLinear"]
