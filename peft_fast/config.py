"""Adapter configs with HF peft's names, defaults and adapter_config.json keys, and the registry
of methods (`register_peft_method`): which config class and tuner class a `peft_type` has.

Each method's package under `peft_fast/tuners/` registers itself when imported (importing
peft_fast imports them all). This module sits below everything else in peft_fast: it imports
no other peft_fast module, and finds config classes by `peft_type` through the registry.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from .adapter_files import committed_path, folder_lock, write_adapter_files

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_PT = "adapter_model.bin"
# The HF peft release whose adapter-file format we read and write (the `peft_version` key).
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """Which method an adapter uses (the `peft_type` key of adapter_config.json).

    These are the methods peft_fast ships with. A method registered under another name (see
    `register_peft_method`) has its plain upper-case name as `peft_type`; both compare equal
    to the JSON string."""

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    LOHA = "LOHA"
    LOKR = "LOKR"
    ADALORA = "ADALORA"
    VERA = "VERA"
    XLORA = "XLORA"

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

    # Set by subclasses: the value `peft_type` must have (a PeftType, or the upper-case
    # name of a method registered under another name).
    PEFT_TYPE: ClassVar[PeftType | str | None] = None

    def __post_init__(self) -> None:
        self.task_type = _enum_value(self.task_type, TaskType, "task_type")
        if self.PEFT_TYPE is not None:
            given = self.peft_type
            if given is not None and (not isinstance(given, str) or str(given) != str(self.PEFT_TYPE)):
                raise ValueError(f"peft_type must be {str(self.PEFT_TYPE)!r} for {type(self).__name__}, got {given!r}")
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
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """HF peft's `PeftConfig.from_peft_type`: the config of the method `peft_type` names (through
        the registry), or of this class where `peft_type` is not given; unknown keys are dropped
        with a warning, as in from_dict. Unlike HF peft, the base PeftConfig without `peft_type`
        raises ValueError rather than build a config that no method can use."""
        if "peft_type" in kwargs:
            return config_class_for(kwargs["peft_type"]).from_dict(kwargs)
        if cls.PEFT_TYPE is None:
            raise ValueError(f"{cls.__name__}.from_peft_type needs peft_type=... to tell which method it is for")
        return cls.from_dict(kwargs)

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


# -- the registry of methods ---------------------------------------------------------------------
@dataclass(frozen=True)
class PeftMethod:
    """A registered method: its name ("lora"), `peft_type` ("LORA"), config class, model class
    and the prefix of its adapter weights' names ("lora_").

    The model class is, as in HF peft, the tuner that puts the method's layers into a model (a
    BaseTuner subclass such as LoraModel) or, for prompt learning, the prompt encoder (a
    PromptEncoderBase subclass such as PrefixEncoder)."""

    name: str
    peft_type: str
    config_cls: type[PeftConfig]
    model_cls: type
    prefix: str


_METHODS: dict[str, PeftMethod] = {}  # by peft_type


def register_peft_method(
    *, name: str, config_cls: type[PeftConfig], model_cls: type, prefix: str | None = None
) -> None:
    """Make a method known to peft_fast, as HF peft's `register_peft_method` does: configs with
    `peft_type == name.upper()` load as `config_cls` (PeftConfig.from_pretrained, from_dict), and
    get_peft_model / PeftModel use `model_cls` (see PeftMethod) to adapt the model.

    `name` is lower case without a trailing "_"; `config_cls.PEFT_TYPE` must be `name.upper()`;
    `prefix` (default `name + "_"`) must equal `model_cls.prefix` where the class has one. Names
    and prefixes are unique (except that a method whose model class subclasses another's may share its
    prefix, as AdaLoRA shares LoRA's "lora_"): registering one twice raises KeyError."""
    if not isinstance(name, str) or not name or not name.islower() or name.endswith("_"):
        raise ValueError(f"name must be a lower-case method name without a trailing '_', got {name!r}")
    peft_type = name.upper()
    if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
        raise TypeError(f"config_cls must be a PeftConfig subclass, got {config_cls!r}")
    if config_cls.PEFT_TYPE is None or str(config_cls.PEFT_TYPE) != peft_type:
        raise ValueError(
            f"config_cls {config_cls.__name__}.PEFT_TYPE must be {peft_type!r} for the method {name!r}, "
            f"got {config_cls.PEFT_TYPE!r}"
        )
    if not isinstance(model_cls, type):
        raise TypeError(
            f"model_cls must be a class (a BaseTuner or, for prompt learning, PromptEncoderBase subclass), "
            f"got {model_cls!r}"
        )
    prefix = name + "_" if prefix is None else prefix
    model_prefix = getattr(model_cls, "prefix", None)
    if model_prefix is not None and model_prefix != prefix:
        raise ValueError(f"prefix {prefix!r} differs from {model_cls.__name__}.prefix {model_prefix!r}")
    if peft_type in _METHODS:
        raise KeyError(f"a method named {name!r} is already registered")
    # A method derived from another (AdaLoRA's model class subclasses LoRA's, as in HF peft) may share its prefix.
    sharing = [m.model_cls for m in _METHODS.values() if m.prefix == prefix]
    if sharing and not any(issubclass(model_cls, cls) for cls in sharing):
        raise KeyError(f"the prefix {prefix!r} is already registered; choose a unique prefix")
    _METHODS[peft_type] = PeftMethod(name, peft_type, config_cls, model_cls, prefix)


def registered_method(peft_type: PeftType | str) -> PeftMethod:
    """The registered method whose `peft_type` (as adapter_config.json stores it) this is."""
    method = _METHODS.get(str(peft_type)) if isinstance(peft_type, str) else None
    if method is None:
        shown = str(peft_type) if isinstance(peft_type, str) else peft_type
        raise ValueError(f"peft_type {shown!r} is not supported by peft_fast; supported: {list(_METHODS)}")
    return method


def config_class_for(peft_type: PeftType | str) -> type[PeftConfig]:
    """The config class of a `peft_type` value as adapter_config.json stores it."""
    return registered_method(peft_type).config_cls
