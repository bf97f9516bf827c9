"""Prompt learning: prompt tuning, prefix tuning and P-tuning.

These methods leave the base model untouched. They learn a few virtual tokens that a
PeftModel puts in front of every input: as input embeddings (prompt tuning, P-tuning) or as
keys and values in every attention layer's cache (prefix tuning). The encoders here compute
those virtual tokens (their configs are in config.py); the task wrappers in `peft_model.py` feed
them to the model.

Names follow HF peft, so that state-dict keys are the same: a PeftModel holds
`prompt_encoder.<adapter>.embedding.weight` (and `mlp_head.*`, `lstm_head.*`, `transform.*`
where the encoder has them), and an adapter file stores the encoder's output for the virtual
tokens under the single key `prompt_embeddings`.

Differences from HF peft 0.21.2 (deliberate):
- Only the active adapter's encoder is trainable (HF peft leaves every added encoder trainable),
  and an adapter loaded from a file is frozen (HF peft leaves its embedding trainable).
- `disable_adapter()` also switches modules_to_save heads back to the original ones, so it gives
  the base model's output for every task (HF peft keeps the trained head, or fails for SEQ_CLS).
- Token classification and question answering return one output per input token (see the task
  wrappers); HF peft also returns the virtual tokens' positions.
- merge/unmerge/unload raise TypeError naming the call (HF peft: AttributeError).
- Not supported: prefix tuning on models with per-layer attention shapes (Gemma 3/4) or needing
  HF peft's per-architecture cache post-processing (bloom), static caches in generate, and task
  models whose forward cannot take `past_key_values` (HF peft runs the backbone and head itself).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig, PeftType, TaskType, registered_method
from ..base import ModulesToSaveWrapper, activate_modules_to_save
from .config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

PROMPT_FILE_KEY = "prompt_embeddings"


# -- filling in a config from the base model ---------------------------------------------------
def _first_key(config: dict[str, Any], names: Sequence[str], field_name: str) -> int:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise ValueError(
        f"cannot read {field_name} from the base model's config (none of {list(names)}); set {field_name} in"
        f" the peft config"
    )


def prepare_prompt_learning_config(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """Check `config` and fill its model-dependent fields from `model.config`, as HF peft does.

    Prefix tuning on a grouped-query-attention model gets `token_dim = head_dim * kv_heads`
    and `num_attention_heads = kv_heads`: the prefix lives in the (smaller) key/value space."""
    n = config.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    values = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
    if config.num_layers is None:
        config.num_layers = getattr(model_config, "num_hidden_layers", None) or _first_key(
            values, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers"
        )
    if config.token_dim is None:
        config.token_dim = _first_key(values, ("hidden_size", "n_embd", "d_model"), "token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = _first_key(
            values, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "num_attention_heads"
        )
    if config.peft_type == PeftType.PREFIX_TUNING and "num_key_value_heads" in values:
        if values.get("global_head_dim") is not None or values.get("per_layer_config") is not None:
            raise ValueError(
                "prefix tuning on models with per-layer attention shapes (global_head_dim, per_layer_config) is not supported"  # noqa: E501
            )
        kv_heads = values["num_key_value_heads"]
        head_dim = values.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * kv_heads
        config.num_attention_heads = kv_heads
    if getattr(config, "encoder_hidden_size", 0) is None:
        config.encoder_hidden_size = config.token_dim
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    return config


# -- encoders -----------------------------------------------------------------------------------
class PromptEncoderBase(nn.Module):
    """What every prompt encoder offers: its virtual tokens' outputs, and loading them back.

    An encoder built in inference mode holds only `embedding`, whose weight is the output an
    encoder built for training computed (what adapter files store)."""

    embedding: nn.Embedding

    @classmethod
    def from_config(cls, config: PromptLearningConfig, word_embeddings: nn.Module) -> PromptEncoderBase:
        """The encoder of a prepared config (see prepare_prompt_learning_config); `word_embeddings`
        is the base model's token embedding, for encoders initialised from it."""
        return cls(config)

    def has_head(self) -> bool:
        """Whether the output is computed from `embedding` by further layers."""
        return False

    def _head(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings

    def prompt_embeddings(self) -> torch.Tensor:
        """The output for all virtual tokens, (virtual tokens, width): the tensor adapter files store."""
        weight = self.embedding.weight
        return self._head(weight) if self.has_head() else weight

    def load_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        """Load the tensor an adapter file stores as `prompt_embeddings`; its shape must fit."""
        if self.has_head():
            raise ValueError(
                "prompt_embeddings can only be loaded into a prompt-learning adapter in inference mode "
                "(an adapter file stores the encoder's output, not its layers); load with is_trainable=False"
            )
        if tuple(tensor.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(
                f"prompt_embeddings has shape {tuple(tensor.shape)} but the adapter expects {tuple(self.embedding.weight.shape)} "  # noqa: E501
                "(was it saved with another num_virtual_tokens or base model?)"
            )
        weight = self.embedding.weight
        if weight.is_meta:  # an adapter built on the meta device: take the file's tensor instead
            self.embedding.weight = nn.Parameter(tensor.to(weight.dtype), requires_grad=weight.requires_grad)
            return
        with torch.no_grad():
            weight.copy_(tensor.to(weight))


def _init_token_ids(config: PromptTuningConfig, total: int, vocab_size: int) -> torch.Tensor:
    """Token ids whose embeddings initialise prompt tuning (SAMPLE_VOCAB and TEXT)."""
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        return torch.randint(0, vocab_size, (total,), dtype=torch.long)
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # as HF peft: a config must not run code from a tokenizer repo
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens")
    return torch.tensor((ids * math.ceil(total / len(ids)))[:total], dtype=torch.long)


class PromptEmbedding(PromptEncoderBase):
    """Prompt tuning: one learned embedding per virtual token (num_transformer_submodules sets of them)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.prompt_tuning_init != PromptTuningInit.RANDOM and not config.inference_mode:
            ids = _init_token_ids(config, total, word_embeddings.num_embeddings).to(word_embeddings.weight.device)
            self.embedding.weight = nn.Parameter(word_embeddings(ids).detach().clone().float())

    @classmethod
    def from_config(cls, config: PromptLearningConfig, word_embeddings: nn.Module) -> PromptEmbedding:
        return cls(config, word_embeddings)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


class PrefixEncoder(PromptEncoderBase):
    """Prefix tuning: per virtual token, keys and values for every layer, (n, num_layers * 2 * token_dim).

    With prefix_projection, a two-layer MLP computes them from token_dim-wide embeddings."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = config.num_layers * 2 * config.token_dim
        if self.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def has_head(self) -> bool:
        return hasattr(self, "transform")

    def _head(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.transform(embeddings)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        return self._head(self.embedding(prefix)) if self.has_head() else self.embedding(prefix)


class PromptEncoder(PromptEncoderBase):
    """P-tuning: virtual-token embeddings passed through an MLP, or a bidirectional LSTM and an MLP."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        self.token_dim = config.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, self.token_dim)
        if config.inference_mode:
            return
        hidden = self.hidden_size
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.token_dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, self.token_dim)
            )
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    "encoder_num_layers is ignored for the MLP prompt encoder: it always has 2 hidden layers",
                    stacklevel=3,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, self.token_dim),
            )

    def has_head(self) -> bool:
        return hasattr(self, "mlp_head")

    def _head(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            batched = embeddings.dim() == 3
            out = self.mlp_head(self.lstm_head(embeddings if batched else embeddings[None])[0])
            return out if batched else out[0]
        return self.mlp_head(embeddings)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeddings = self.embedding(indices)
        return self._head(embeddings) if self.has_head() else embeddings


def create_prompt_encoder(config: PromptLearningConfig, word_embeddings: nn.Module) -> PromptEncoderBase:
    """The encoder for a prepared config (see prepare_prompt_learning_config): the class its
    method registered as `model_cls` (HF peft's PromptEmbedding, PrefixEncoder, PromptEncoder)."""
    encoder_cls = registered_method(config.peft_type).model_cls
    if not (isinstance(encoder_cls, type) and issubclass(encoder_cls, PromptEncoderBase)):
        raise TypeError(
            f"peft_type {str(config.peft_type)!r} registered model_cls={encoder_cls!r}; a prompt-learning method"
            " registers its prompt encoder, a PromptEncoderBase subclass"
        )
    return encoder_cls.from_config(config, word_embeddings)


# -- what the task wrappers feed to the model ----------------------------------------------------
def prefix_cache(kv: torch.Tensor, config: PrefixTuningConfig, batch_size: int) -> Any:
    """The transformers cache that puts a prefix encoder's output before every layer's keys and values.

    `kv` is (num_virtual_tokens, num_layers * 2 * token_dim). Decoder-only models get a
    DynamicCache; encoder-decoder models an EncoderDecoderCache whose decoder self-attention
    holds the prefix and whose cross-attention cache starts empty. The per-layer split is
    HF peft's, so the same weights give the same keys and values."""
    from transformers import DynamicCache, EncoderDecoderCache

    n, heads, submodules = config.num_virtual_tokens, config.num_attention_heads, config.num_transformer_submodules
    kv = kv.expand(batch_size, -1, -1).reshape(batch_size, n, config.num_layers * 2, heads, config.token_dim // heads)
    if submodules == 2:
        kv = torch.cat([kv, kv], dim=2)
    # per layer: (2 * submodules, batch, heads, n, head_dim); rows are self-attn k, v (then cross-attn k, v)
    layers = kv.permute(2, 0, 3, 1, 4).split(2 * submodules)
    self_attention = DynamicCache([(layer[0], layer[1]) for layer in layers])
    if submodules == 1:
        return self_attention
    return EncoderDecoderCache(self_attention, DynamicCache())


def prepend(tensor: torch.Tensor | None, n: int, value: float) -> torch.Tensor | None:
    """`tensor` (batch, seq, ...) with n positions filled with `value` put in front (None stays None)."""
    if tensor is None:
        return None
    pad = torch.full((tensor.shape[0], n, *tensor.shape[2:]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


# -- the adapters of a prompt-learning PeftModel -------------------------------------------------
class PromptLearningAdapters:
    """Adapter bookkeeping of a PeftModel with prompt-learning adapters.

    It offers the methods PeftModel calls on a layer tuner (BaseTuner): adding, switching,
    deleting, disabling adapters. The encoders live in the PeftModel's `prompt_encoder`
    ModuleDict (so their keys are HF peft's); the base model is not changed, apart from
    heads listed in modules_to_save. Several adapters can be added; one is active."""

    def __init__(self, model: nn.Module, encoders: nn.ModuleDict, word_embeddings: nn.Module) -> None:
        self.model = model
        self.encoders = encoders
        self.word_embeddings = word_embeddings
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str = ""
        self.enabled = True
        model.peft_config = self.peft_config  # as for layer tuners: the base model knows its adapters

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Create the encoder of a new adapter (active if it is the first one)."""
        if not isinstance(config, PromptLearningConfig):
            raise TypeError(f"a prompt-learning model takes only prompt-learning configs, got {type(config).__name__}")
        prepare_prompt_learning_config(config, model)
        if config.peft_type == PeftType.PREFIX_TUNING and any(
            getattr(m, "gradient_checkpointing", False) for m in model.modules()
        ):
            raise ValueError("prefix tuning does not work with gradient checkpointing; disable it on the base model")
        for p in model.parameters():
            p.requires_grad_(False)
        device = self.word_embeddings.weight.device
        self.encoders[adapter_name] = create_prompt_encoder(config, self.word_embeddings).to(device)
        self.peft_config[adapter_name] = config
        if not self.active_adapter:
            self.active_adapter = adapter_name

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        return (m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter: its encoder (and its modules_to_save) train, the others are frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"prompt-learning models have exactly one active adapter, got {names}")
        name = names[0]
        if name not in self.peft_config:
            raise ValueError(f"adapter {name!r} does not exist; adapters: {list(self.peft_config)}")
        for key, encoder in self.encoders.items():
            encoder.requires_grad_(key == name)
        activate_modules_to_save(self.model, names)
        self.active_adapter = name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        del self.encoders[adapter_name]
        for w in self._wrappers():
            w.delete_adapter(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = ""
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    def enable_adapter_layers(self) -> None:
        self.enabled = True
        for w in self._wrappers():
            w.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        self.enabled = False
        for w in self._wrappers():
            w.enable_adapters(False)

    def _unsupported(self, call: str) -> TypeError:
        kind = str(self.peft_config[self.active_adapter].peft_type) if self.active_adapter else "prompt-learning"
        return TypeError(
            f"{call}() is not supported for {kind} adapters: prompt learning adds virtual tokens "
            "instead of changing the base model's weights, so there is nothing to merge or unload"
        )

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        raise self._unsupported("merge_adapter")

    def unmerge_adapter(self) -> None:
        raise self._unsupported("unmerge_adapter")

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        raise self._unsupported("merge_and_unload")

    def unload(self) -> nn.Module:
        raise self._unsupported("unload")

    @contextmanager
    def mixed_batch(
        self, adapter_names: Sequence[str] | None, device: torch.device | None = None, encoder_adapter_names: Any = None
    ) -> Iterator[None]:
        """Mixed-adapter batches need layer adapters; prompt learning refuses `adapter_names`."""
        if adapter_names is not None:
            raise ValueError("adapter_names (mixed adapter batches) is not supported for prompt-learning adapters")
        yield
