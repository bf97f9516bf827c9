"""Adapter configs with HF peft's names, defaults and adapter_config.json keys."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_PT = "adapter_model.bin"
# The HF peft release whose adapter-file format we read and write (the `peft_version` key).
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """Which method an adapter uses (the `peft_type` key of adapter_config.json)."""

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    """The task a PeftModel wraps (the `task_type` key); picks the PeftModel subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def _enum_value(value: Any, enum_cls: type[enum.Enum], arg: str) -> Any:
    if value is None or isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"{arg} must be one of {[e.value for e in enum_cls]}, got {value!r}") from None


@dataclass
class PeftConfig:
    """Fields every adapter config shares. Subclasses set `peft_type`."""

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    # Set by subclasses: the value `peft_type` must have.
    PEFT_TYPE: ClassVar[PeftType | None] = None

    def __post_init__(self) -> None:
        self.task_type = _enum_value(self.task_type, TaskType, "task_type")
        if self.PEFT_TYPE is not None:
            given = _enum_value(self.peft_type, PeftType, "peft_type")
            if given is not None and given != self.PEFT_TYPE:
                raise ValueError(
                    f"peft_type must be {self.PEFT_TYPE.value!r} for {type(self).__name__}, got {given.value!r}"
                )
            self.peft_type = self.PEFT_TYPE
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        """The config as adapter_config.json stores it (HF peft's keys; sets become sorted lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        """adapter_config.json's text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write adapter_config.json into `save_directory` (created if needed), atomically."""
        from .save_and_load import write_adapter_files

        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {str(save_directory)!r}")
        write_adapter_files(save_directory, {CONFIG_NAME: self.to_json_string().encode()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the config that `data` describes. On the base class, `peft_type` picks the subclass.

        Keys this version does not know are dropped with a warning that names them."""
        if not isinstance(data, dict):
            raise TypeError(f"an adapter config must be a dict of {{field: value}}, got {type(data).__name__}")
        data = dict(data)
        target_cls: type[PeftConfig] = cls
        if cls.PEFT_TYPE is None:
            if "peft_type" not in data:
                raise ValueError("adapter config has no 'peft_type' key; cannot tell which method it is for")
            from .mapping import config_class_for

            target_cls = config_class_for(data["peft_type"])
        known = {f.name for f in dataclasses.fields(target_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{target_cls.__name__}: ignoring keys this version of peft_fast does not know: {unknown}",
                stacklevel=2,
            )
        return target_cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PeftConfig:
        """Build the config an adapter_config.json describes; ValueError naming the file where
        it is not JSON text holding one object."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"adapter config {str(path)!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"adapter config {str(path)!r} must hold a JSON object ({{field: value}}), got a JSON"
                f" {type(data).__name__}"
            )
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Read adapter_config.json from a local adapter folder (no hub downloads)."""
        folder = (
            os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else str(pretrained_model_name_or_path)
        )
        from .save_and_load import committed_path, folder_lock

        if not os.path.isdir(folder):
            raise ValueError(
                f"adapter folder {folder!r} does not exist (peft_fast loads adapters from local folders only)"
            )
        with folder_lock(folder, shared=True):
            path = committed_path(folder, CONFIG_NAME)
            if path is None:
                raise ValueError(f"no {CONFIG_NAME} in adapter folder {folder!r}")
            config = cls.from_json_file(path)
        for k, v in kwargs.items():
            if not hasattr(config, k):
                raise TypeError(f"{type(config).__name__} has no field {k!r}")
            setattr(config, k, v)
        return config


def check_unsupported(config: PeftConfig, defaults: dict[str, Any]) -> None:
    """Refuse HF peft options this version does not implement, rather than ignore them.

    `defaults` maps a field name to the value that means "option off"."""
    # None counts as "off" too: HF peft writes null for several of these in adapter files.
    used = [
        name for name, off in defaults.items() if getattr(config, name) is not None and getattr(config, name) != off
    ]
    if used:
        raise ValueError(
            f"{type(config).__name__}: {', '.join(f'{n}={getattr(config, n)!r}' for n in used)} "
            "is not supported by peft_fast; leave it at its default"
        )
