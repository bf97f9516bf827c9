"""Default target modules per transformers model type, where the user names none.

The values are HF peft's defaults (peft 0.21), so that the same config adapts the same
layers in both libraries."""

from __future__ import annotations

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

_TABLES = {"lora": LORA_TARGETS, "ia3": IA3_TARGETS, "ia3_feedforward": IA3_FEEDFORWARD}


def default_target_modules(method: str, model_type: str | None) -> list[str] | None:
    """HF peft's default targets of `method` ("lora", "ia3", "ia3_feedforward") for a model
    type, or None where it has none."""
    if model_type is None:
        return None
    return _TABLES[method].get(model_type)
