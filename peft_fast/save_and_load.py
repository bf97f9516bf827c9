"""Adapter state dicts and files in HF peft's format.

Prompt-learning adapters (prompt tuning, prefix tuning, P-tuning) store their encoder's output
for the virtual tokens under the one key `prompt_embeddings`, as HF peft does.

A model key such as `base_model.model.q_proj.lora_A.default.weight` is stored in the file
as `base_model.model.q_proj.lora_A.weight` (the adapter name dropped), and a trained head
`...classifier.modules_to_save.default.weight` as `...classifier.weight`. `adapter_key_map`
is the one place that knows this mapping; saving and loading both use it.

Saving a folder is atomic and exclusive, and loads hold the folder's lock shared: the protocol
is in `adapter_files.py` (`write_adapter_files`, used by `save_adapter_folder` and
`PeftConfig.save_pretrained`).

Weights files carry `peft_fast.sha256` in their safetensors metadata: a digest of every
tensor's name, dtype, shape and bytes. Loading recomputes it and refuses a file whose contents
changed after the save (a flipped bit, a partial copy). Files without it (HF peft's) load
without that check; their keys, shapes and dtypes are still checked against the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import ntpath
import os
from typing import Any, Literal

import torch
from torch import nn

from .adapter_files import committed_path, folder_lock, write_adapter_files
from .config import CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_NAME_PT
from .tuners.base import BASE_ADAPTER, AdapterLayer, BaseTuner, ModulesToSaveWrapper
from .tuners.prompt_learning import PROMPT_FILE_KEY

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
CHECKSUM_KEY = "peft_fast.sha256"
DORA_MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude container (file key without ".weight")


def check_adapter_name(adapter_name: Any, arg: str = "adapter_name") -> None:
    """Refuse a name that is not one plain path component and module key: empty, holding
    `/`, `\\`, `.` (so also `..`), a NUL or a drive, or the reserved `__base__`."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"{arg} must be a string, got {type(adapter_name).__name__}")
    bad = (
        not adapter_name
        or any(c in adapter_name for c in "/\\.\0")
        or os.path.isabs(adapter_name)
        or ntpath.splitdrive(adapter_name)[0]
        or adapter_name == BASE_ADAPTER
    )
    if bad:
        raise ValueError(
            f"{arg} must be a plain name: not empty, no '/', '\\', '.', NUL or drive, and not {BASE_ADAPTER!r}"
            f" (it names a module key and a sub-folder of save_pretrained); got {adapter_name!r}"
        )


def adapter_key_map(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """{key in the adapter file: key in `model.state_dict()`} for one adapter's own weights."""
    mapping: dict[str, str] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, AdapterLayer):
            for container_name in module.adapter_layer_names:
                container = getattr(module, container_name)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                if container_name == DORA_MAGNITUDE:
                    # HF peft's files keep DoRA's magnitude under the container's name alone.
                    mapping[f"{prefix}{container_name}"] = f"{prefix}{container_name}.{adapter_name}.weight"
                elif isinstance(item, nn.Parameter):
                    mapping[f"{prefix}{container_name}"] = f"{prefix}{container_name}.{adapter_name}"
                else:
                    for pname in item.state_dict():
                        mapping[f"{prefix}{container_name}.{pname}"] = (
                            f"{prefix}{container_name}.{adapter_name}.{pname}"
                        )
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for pname in module.modules_to_save[adapter_name].state_dict():
                mapping[f"{prefix}{pname}"] = f"{prefix}modules_to_save.{adapter_name}.{pname}"
        elif isinstance(module, BaseTuner) and adapter_name in module.peft_config:
            for file_key, model_key in module.shared_adapter_keys(adapter_name).items():
                mapping[f"{prefix}{file_key}"] = f"{prefix}{model_key}"
    return mapping


def _tuner_of(model: nn.Module) -> BaseTuner | None:
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, BaseTuner) else None


def tuner_state_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """Keys of weights a tuner itself holds for an adapter, stored under their own names (X-LoRA's
    classifier): whatever a module's `adapter_state_keys(adapter_name)` lists, prefixed by its path."""
    keys: list[str] = []
    for path, module in model.named_modules():
        own = getattr(type(module), "adapter_state_keys", None)
        if callable(own):
            keys += [f"{path}.{k}" if path else k for k in own(module, adapter_name)]
    return keys


def _extra_base_keys(model: nn.Module, adapter_name: str, save_embedding_layers: bool | Literal["auto"]) -> list[str]:
    """Base-model keys an adapter file also carries, stored under their own names: biases
    trained with bias="all"/"lora_only", and whole embedding layers where HF peft saves them."""
    config = model.peft_config[adapter_name]
    keys: list[str] = []
    bias = getattr(config, "bias", "none")
    adapter_keys = set(adapter_key_map(model, adapter_name).values())
    if bias == "all":
        keys += [
            k
            for k, _ in model.named_parameters()
            if "bias" in k and k not in adapter_keys and ".original_module." not in k
        ]
    elif bias == "lora_only":
        for path, module in model.named_modules():
            if (
                isinstance(module, AdapterLayer)
                and adapter_name in module.adapter_names()
                and getattr(module.base_layer, "bias", None) is not None
            ):
                keys.append(f"{path}.base_layer.bias")
    targets = getattr(config, "target_modules", None)
    targeted = isinstance(targets, (set, list)) and any(n in targets for n in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted
    if save_embedding_layers:
        # HF peft's rule: when an embedding layer is targeted, only the embedding layers that carry
        # an adapter (a base_layer) are stored; otherwise (resized vocabulary) all of them are.
        marks = [f".{n}.base_layer." if targeted else f".{n}." for n in EMBEDDING_LAYER_NAMES]
        keys += [
            k
            for k, _ in model.named_parameters()
            if any(m in k for m in marks) and k not in adapter_keys and "lora_" not in k
        ]
    return keys


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's weights under HF peft's file keys (adapter name removed)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(model.peft_config)}")
    if state_dict is None:
        state_dict = model.state_dict()
    out = {file_key: state_dict[model_key] for file_key, model_key in adapter_key_map(model, adapter_name).items()}
    if model.peft_config[adapter_name].is_prompt_learning:
        out[PROMPT_FILE_KEY] = model.get_prompt_embedding_to_save(adapter_name)
    for key in _extra_base_keys(model, adapter_name, save_embedding_layers):
        out[key] = state_dict[key]
    for key in tuner_state_keys(model, adapter_name):
        out[key] = state_dict[key]
    tuner = _tuner_of(model)
    return out if tuner is None else tuner.adapter_state_for_save(adapter_name, out)


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> Any:
    """Load one adapter's weights (HF peft's file keys) into `model`.

    Every key must fit: a key the model has no place for, a weight of the adapter that the
    file lacks, or a shape that differs raises ValueError naming them. Returns torch's
    `_IncompatibleKeys` (both lists empty), as HF peft does."""
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: adapter weights must fit the model exactly")
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} does not exist; add it first (adapters: {list(model.peft_config)})")
    tuner = _tuner_of(model)
    if tuner is not None:
        peft_model_state_dict = tuner.prepare_adapter_load(adapter_name, peft_model_state_dict)
    mapping = adapter_key_map(model, adapter_name)
    # A tuner's own weights (X-LoRA's classifier): under their own names; missing ones warn.
    tuner_keys = tuner_state_keys(model, adapter_name)
    mapping.update({k: k for k in tuner_keys})
    model_sd = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    prompt_embeddings = None
    if model.peft_config[adapter_name].is_prompt_learning:
        peft_model_state_dict = dict(peft_model_state_dict)
        prompt_embeddings = peft_model_state_dict.pop(PROMPT_FILE_KEY, None)
        if prompt_embeddings is None:
            raise ValueError(
                f"adapter weights do not fit the model: {PROMPT_FILE_KEY!r} (the virtual tokens of adapter"
                f" {adapter_name!r}) is missing from the file"
            )
    for file_key, tensor in peft_model_state_dict.items():
        model_key = mapping.get(file_key)
        if model_key is None and file_key in model_sd and file_key not in mapping.values():
            model_key = file_key  # a base weight stored under its own name (bias, embedding layer)
        if model_key is None:
            unexpected.append(file_key)
            continue
        to_load[model_key] = tensor
    missing = sorted(fk for fk, mk in mapping.items() if mk not in to_load)
    missing_tuner = [k for k in missing if k in tuner_keys]
    if missing_tuner:
        from .tuners.xlora.model import warn_missing_classifier_keys

        warn_missing_classifier_keys(missing_tuner)
        missing = [k for k in missing if k not in tuner_keys]
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} keys the model has no place for, e.g. {sorted(unexpected)[:5]}")
        if missing:
            parts.append(
                f"{len(missing)} weights of adapter {adapter_name!r} missing from the file, e.g. {missing[:5]}"
            )
        raise ValueError(f"adapter weights do not fit the model: {'; '.join(parts)}")
    wrong = [
        f"{k}: file {tuple(t.shape)} vs model {tuple(model_sd[k].shape)}"
        for k, t in to_load.items()
        if tuple(t.shape) != tuple(model_sd[k].shape)
    ]
    if wrong:
        raise ValueError(
            f"adapter weight shapes do not fit the model (was it saved with another r or base model?): {wrong[:5]}"
        )
    wrong = [
        f"{k}: file {t.dtype} vs model {model_sd[k].dtype}"
        for k, t in to_load.items()
        if t.is_floating_point() != model_sd[k].is_floating_point() or t.is_complex() != model_sd[k].is_complex()
    ]
    if wrong:
        raise ValueError(f"adapter weight dtypes do not fit the model (floating point expected): {wrong[:5]}")
    if prompt_embeddings is not None:
        model.prompt_encoder[adapter_name].load_prompt_embeddings(prompt_embeddings)
    # Weights still on the meta device (a model built there) are replaced, not copied into.
    assign = low_cpu_mem_usage or any(model_sd[k].is_meta for k in to_load)
    return model.load_state_dict(to_load, strict=False, assign=assign)._replace(missing_keys=[])


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        digest.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"adapter weights file {path!r} is not a readable safetensors file: {e}") from e
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise ValueError(
            f"adapter weights file {path!r} does not match the checksum written when it was saved: its contents"
            " changed since (a corrupt or partial copy?)"
        )
    return tensors


def _read_torch(path: str) -> dict[str, torch.Tensor]:
    import pickle

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"adapter weights file {path!r} is not a readable torch file: {e}") from e
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"adapter weights file {path!r} does not hold a dict of tensors")
    return tensors


def load_peft_weights(model_id: str | os.PathLike, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Read adapter_model.safetensors (or the older adapter_model.bin) from a local folder.

    A file that cannot be parsed, or whose checksum no longer matches, raises ValueError."""
    folder = str(model_id)
    if not os.path.isdir(folder):
        raise ValueError(f"adapter folder {folder!r} does not exist (peft_fast loads adapters from local folders only)")
    with folder_lock(folder, shared=True):
        st = committed_path(folder, WEIGHTS_NAME)
        pt = None if st is not None else committed_path(folder, WEIGHTS_NAME_PT)
        if st is None and pt is None:
            raise ValueError(
                f"no {WEIGHTS_NAME} or {WEIGHTS_NAME_PT} in adapter folder {folder!r}"
                f" (it has {sorted(os.listdir(folder))})"
            )
        tensors = _read_safetensors(st) if st is not None else _read_torch(pt)
    if device is not None and torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def save_adapter_folder(
    folder: str, state_dict: dict[str, torch.Tensor], config: Any, safe_serialization: bool = True
) -> None:
    """Write one adapter, weights and adapter_config.json, atomically (see the module docstring)."""
    # safetensors refuses tensors that share memory: give each its own contiguous copy.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    if safe_serialization:
        from safetensors.torch import save

        metadata = {"format": "pt", CHECKSUM_KEY: tensors_digest(tensors)}
        weights, name, other = save(tensors, metadata=metadata), WEIGHTS_NAME, WEIGHTS_NAME_PT
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        weights, name, other = buffer.getvalue(), WEIGHTS_NAME_PT, WEIGHTS_NAME
    write_adapter_files(folder, {name: weights, CONFIG_NAME: config.to_json_string().encode()}, remove=[other])
