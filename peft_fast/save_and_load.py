"""Adapter state dicts and files in HF peft's format.

Prompt-learning adapters (prompt tuning, prefix tuning, P-tuning) store their encoder's output
for the virtual tokens under the one key `prompt_embeddings`, as HF peft does.

A model key such as `base_model.model.q_proj.lora_A.default.weight` is stored in the file
as `base_model.model.q_proj.lora_A.weight` (the adapter name dropped), and a trained head
`...classifier.modules_to_save.default.weight` as `...classifier.weight`. `adapter_key_map`
is the one place that knows this mapping; saving and loading both use it.

Saving a folder (`write_adapter_files`, used by `save_adapter_folder` and
`PeftConfig.save_pretrained`) is atomic and exclusive. A save that stops at any point (an
exception, a killed process, a power cut) leaves the folder's previous adapter, config and
weights together, loadable; a save that returned left the new one:

1. Lock. `.adapter_save.lock` in the folder is held with an exclusive `flock` for the whole
   save, so concurrent saves into one folder, from threads or processes, run one after the
   other. Loads hold it shared while they read config and weights, so they never see half
   a save.
2. Recover. A journal left by a save that stopped half way is rolled back first (see below).
3. Stage. Every new file (weights, then config) is written to a fresh temporary file in the
   same folder (`.<name>.<random>.peft_fast_tmp`, created exclusively, never through a
   symlink), and `fsync`ed.
4. Journal. The files the save replaces are hard-linked to `.<name>.peft_fast_prev` (the
   previous adapter, kept whole), then the journal `.adapter_save.journal` (the names
   replaced, and which of them existed) is written atomically, and the folder is `fsync`ed.
5. Commit. `os.replace` moves the weights and then the config into place and removes a
   weights file of the other format (`.bin` next to `.safetensors`, which would shadow or
   outlive the new one); the folder is `fsync`ed; deleting the journal is the commit point.
   The backups are deleted last.

While a journal exists, the previous adapter is the folder's content: loads read the backups
(or find no adapter where the interrupted save was the first), and the next save rolls the
journal back (the backups replace the new ones) before it starts. The lock file stays in the
folder (deleting it could let two savers hold two different locks); other files are never
touched.

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
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_NAME_PT
from .tuners.base import BASE_ADAPTER, AdapterLayer, ModulesToSaveWrapper
from .tuners.prompt_learning import PROMPT_FILE_KEY

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
LOCK_NAME = ".adapter_save.lock"
JOURNAL_NAME = ".adapter_save.journal"
CHECKSUM_KEY = "peft_fast.sha256"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
                if isinstance(item, nn.Parameter):
                    mapping[f"{prefix}{container_name}"] = f"{prefix}{container_name}.{adapter_name}"
                else:
                    for pname in item.state_dict():
                        mapping[f"{prefix}{container_name}.{pname}"] = (
                            f"{prefix}{container_name}.{adapter_name}.{pname}"
                        )
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for pname in module.modules_to_save[adapter_name].state_dict():
                mapping[f"{prefix}{pname}"] = f"{prefix}modules_to_save.{adapter_name}.{pname}"
    return mapping


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
    if save_embedding_layers == "auto":
        targets = getattr(config, "target_modules", None)
        save_embedding_layers = isinstance(targets, (set, list)) and any(n in targets for n in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers:
        keys += [
            k
            for k, _ in model.named_parameters()
            if any(f".{n}." in k for n in EMBEDDING_LAYER_NAMES) and k not in adapter_keys and "lora_" not in k
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
    return out


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
    mapping = adapter_key_map(model, adapter_name)
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


# -- folder protocol (see the module docstring) ------------------------------------------------
def _fsync_dir(folder: str) -> None:
    """Make renames and deletions in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(fd: int, shared: bool) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    else:  # pragma: no cover - Windows: msvcrt has exclusive locks only
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)


@contextmanager
def folder_lock(folder: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """Hold the folder's save lock: exclusive for a save, shared for a load. A load of a folder
    that peft_fast never saved into (no lock file) takes no lock and creates none."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
        fd = os.open(path, flags | _NOFOLLOW, 0o644)
    except FileNotFoundError:
        if not shared:
            raise
        yield
        return
    try:
        _lock(fd, shared)
        yield
    finally:
        os.close(fd)  # releases the lock


_TMP_SUFFIX = ".peft_fast_tmp"
_PREV_SUFFIX = ".peft_fast_prev"


def _prev_name(name: str) -> str:
    return f".{name}{_PREV_SUFFIX}"


def _read_journal(folder: str) -> dict[str, list[str]] | None:
    path = os.path.join(folder, JOURNAL_NAME)
    try:
        with open(path) as f:
            journal = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"the save journal {path!r} cannot be read ({e}); remove it by hand") from e
    if not isinstance(journal, dict) or not all(isinstance(journal.get(k), list) for k in ("replaces", "previous")):
        raise ValueError(f"the save journal {path!r} is not one peft_fast wrote; remove it by hand")
    return journal


def committed_path(folder: str | os.PathLike, name: str) -> str | None:
    """Where the committed version of file `name` of an adapter folder is (while a save is
    unfinished, its previous version), or None where the folder has none."""
    folder = str(folder)
    journal = _read_journal(folder)
    path: str | None = os.path.join(folder, name)
    if journal is not None and name in journal["replaces"]:
        if name not in journal["previous"]:
            path = None  # what is there is the unfinished save's
        elif os.path.lexists(os.path.join(folder, _prev_name(name))):
            path = os.path.join(folder, _prev_name(name))
        # else an interrupted roll-back already put the previous file back in place
    return path if path is not None and os.path.isfile(path) else None


def _recover(folder: str) -> None:
    """Roll back a save that stopped before its commit point; drop leftovers of any save.
    Runs under the exclusive lock; safe to repeat if it is itself interrupted."""
    journal = _read_journal(folder)
    if journal is not None:
        for name in journal["replaces"]:
            final, prev = os.path.join(folder, name), os.path.join(folder, _prev_name(name))
            if name in journal["previous"]:
                if os.path.lexists(prev):  # else already put back by an earlier recovery
                    os.replace(prev, final)
            elif os.path.lexists(final):
                os.unlink(final)
        _fsync_dir(folder)
        os.unlink(os.path.join(folder, JOURNAL_NAME))
        _fsync_dir(folder)
    for entry in os.listdir(folder):  # staged files and backups of saves that stopped
        if entry.startswith(".") and entry.endswith((_TMP_SUFFIX, _PREV_SUFFIX)):
            os.unlink(os.path.join(folder, entry))


def _stage(folder: str, name: str, data: bytes) -> str:
    """Write `data` to a new temporary file next to `name`, fsynced; return its path."""
    path = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _backup(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except (OSError, NotImplementedError):  # file systems (or platforms) without hard links
        shutil.copyfile(src, dst, follow_symlinks=False)


def write_adapter_files(folder: str | os.PathLike, files: dict[str, bytes], remove: Sequence[str] = ()) -> None:
    """Replace the files `files` ({name: contents}, committed in this order) of `folder` and
    delete the files `remove`, all together or not at all (the protocol in the module
    docstring). The folder is created if needed."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with folder_lock(folder):
        _recover(folder)
        staged: dict[str, str] = {}
        try:
            for name, data in files.items():
                staged[name] = _stage(folder, name, data)
            replaces = list(files) + [n for n in remove if n not in files and os.path.lexists(os.path.join(folder, n))]
            previous = [n for n in replaces if os.path.lexists(os.path.join(folder, n))]
            for name in previous:
                _backup(os.path.join(folder, name), os.path.join(folder, _prev_name(name)))
            journal = json.dumps({"replaces": replaces, "previous": previous}).encode()
            os.replace(_stage(folder, JOURNAL_NAME, journal), os.path.join(folder, JOURNAL_NAME))
            _fsync_dir(folder)
            for name, tmp in staged.items():
                os.replace(tmp, os.path.join(folder, name))
            for name in replaces:
                if name not in files:
                    os.unlink(os.path.join(folder, name))
            _fsync_dir(folder)
            os.unlink(os.path.join(folder, JOURNAL_NAME))  # the commit point
            _fsync_dir(folder)
        finally:
            # A save that raised rolls itself back now; one that returned drops its backups.
            _recover(folder)


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
