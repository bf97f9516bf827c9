"""peft_fast: Hugging Face peft's API, with fused kernels behind it.

Swap `from peft import ...` for `from peft_fast import ...`: the same configs, models and
adapter files, with LoRA and IA³ running through `peft_fast.ops` (see `set_backend`).
"""

__version__ = "0.1.0"

from .config import PeftConfig, PeftType, TaskType, register_peft_method  # noqa: E402
from .mapping import get_peft_model  # noqa: E402
from .ops import available_backends, get_backend, set_backend, use_backend  # noqa: E402
from .patch import patch_peft, unpatch_peft  # noqa: E402
from .peft_model import (  # noqa: E402
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .quant import prepare_model_for_kbit_training  # noqa: E402
from .save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict  # noqa: E402
from .tuners import (  # noqa: E402
    AdaLoraConfig,
    AdaLoraModel,
    IA3Config,
    IA3Model,
    LoHaConfig,
    LoHaModel,
    LoKrConfig,
    LoKrModel,
    LoraConfig,
    LoraModel,
    PrefixEncoder,
    PrefixTuningConfig,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    VeraConfig,
    VeraModel,
    XLoraConfig,
    XLoraModel,
)

__all__ = [
    "AdaLoraConfig",
    "AdaLoraModel",
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "XLoraConfig",
    "XLoraModel",
    "available_backends",
    "get_backend",
    "get_peft_model",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "patch_peft",
    "register_peft_method",
    "prepare_model_for_kbit_training",
    "set_backend",
    "set_peft_model_state_dict",
    "unpatch_peft",
    "use_backend",
    "VeraConfig",
    "VeraModel",
]
