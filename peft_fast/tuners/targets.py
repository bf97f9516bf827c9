"""Target modules: the defaults per transformers model type, where the user names none, and
the normalisation of a config's target fields.

The defaults are HF peft's (peft 0.21), so that the same config adapts the same layers in
both libraries. A tuner names its table in `BaseTuner.target_module_mapping`."""

from __future__ import annotations

from ..config import PeftConfig

_QV_PROJ = ["q_proj", "v_proj"]

LORA_TARGETS: dict[str, list[str]] = {
    "llama": _QV_PROJ,
    "mistral": _QV_PROJ,
    "mixtral": _QV_PROJ,
    "qwen2": _QV_PROJ,
    "qwen3": _QV_PROJ,
    "gemma": _QV_PROJ,
    "gemma2": _QV_PROJ,
    "gemma3_text": _QV_PROJ,
    "gptj": _QV_PROJ,
    "opt": _QV_PROJ,
    "bart": _QV_PROJ,
    "mbart": _QV_PROJ,
    "stablelm": _QV_PROJ,
    "blip-2": _QV_PROJ,
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "mpt": ["Wqkv"],
}

IA3_TARGETS: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
}

IA3_FEEDFORWARD: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "phi": ["fc2"],
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "bloom": ["mlp.dense_4h_to_h"],
    "gptj": ["fc_out"],
    "opt": ["fc2"],
    "bart": ["fc2"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "deberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "t5": ["wo"],
    "mt5": [],
}


def normalize_targets(config: PeftConfig) -> None:
    """HF peft's conventions for a config's target fields: lists become sets; layer selection
    needs a list of targets. Raises ValueError for combinations HF peft refuses."""
    for name in ("target_modules", "exclude_modules", "feedforward_modules"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(config, name, set(value))
    if getattr(config, "layers_pattern", None) and getattr(config, "layers_to_transform", None) is None:
        raise ValueError("layers_pattern is only used together with layers_to_transform; set layers_to_transform too")
    if isinstance(config.target_modules, str) and getattr(config, "layers_to_transform", None) is not None:
        raise ValueError("layers_to_transform cannot be used when target_modules is a regex string; pass a list")
    if isinstance(config.target_modules, str) and getattr(config, "layers_pattern", None):
        raise ValueError("layers_pattern cannot be used when target_modules is a regex string; pass a list")
    if config.modules_to_save is not None and not isinstance(config.modules_to_save, list):
        config.modules_to_save = list(config.modules_to_save)


# HF peft's AdaLoRA defaults (gemma4's entry there is a regex string; it is left out here).
ADALORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": _QV_PROJ,
    "gpt_neox": ["query_key_value"],
    "gpt_neo": _QV_PROJ,
    "llama": _QV_PROJ,
    "llama4": _QV_PROJ,
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": _QV_PROJ,
    "gemma2": _QV_PROJ,
    "gemma3_text": _QV_PROJ,
    "qwen2": _QV_PROJ,
    "qwen3": _QV_PROJ,
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# HF peft's VeRA defaults: LoRA's, with phi's attention projections only.
VERA_TARGETS: dict[str, list[str]] = {**LORA_TARGETS, "phi": _QV_PROJ}
