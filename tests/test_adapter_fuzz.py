"""Fuzz: corrupted adapter folders either load exactly the saved weights or raise a clear error.

A folder saved by peft_fast is corrupted in many seeded ways (truncation, bit flips, tensors of
another shape or dtype, missing and extra keys, broken configs, another architecture). Every
load must then either raise ValueError/TypeError with a message, or give the adapter weights
exactly as saved; never other numbers, and never another kind of exception. Where a
corruption rewrites the weights file without peft_fast's checksum (as a foreign tool would),
the one other acceptable result is exactly the tensors that file holds, read independently
with safetensors. A config corruption that keeps the weights' shapes (lora_alpha 16 -> 17) is
not detectable from the files; such loads are counted as loads, and their weights must still
be exact."""

from __future__ import annotations

import copy
import json
import random
import shutil
import warnings

import pytest
import torch
from conftest import make_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_fast
from peft_fast import LoraConfig, PeftModel, get_peft_model
from peft_fast.config import CONFIG_NAME, WEIGHTS_NAME
from peft_fast.save_and_load import adapter_key_map

SEED = 1234
CLEAR_ERRORS = (ValueError, TypeError)


def _random_lora() -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(make_model("llama"), config)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _weights(model: PeftModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_fast.get_peft_model_state_dict(model, adapter_name=name).items()}


def _placed(model: PeftModel, name: str, keys) -> dict[str, torch.Tensor]:
    """For each file key, the tensor where a load put it: the adapter's own weight, or a base
    weight stored under its own name (HF peft's rule, e.g. a head whose wrapper is gone)."""
    mapping = adapter_key_map(model, name)
    state = model.state_dict()
    return {k: state[mapping.get(k, k)].detach().clone() for k in keys if mapping.get(k, k) in state}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _rewrite(folder, change, keep_metadata: bool) -> None:
    """Rewrite the weights file after `change(tensors)`; with the saved metadata (checksum) or without."""
    path = folder / WEIGHTS_NAME
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata if keep_metadata else None)


def _edit_config(folder, change) -> None:
    data = json.loads((folder / CONFIG_NAME).read_text())
    change(data)
    (folder / CONFIG_NAME).write_text(json.dumps(data))


def _cases(weights_len: int, header_end: int, config_len: int, keys: list[str]) -> list[tuple[str, object]]:
    """(name, corruption of a folder) pairs, seeded."""
    rng = random.Random(SEED)
    cases: list[tuple[str, object]] = []

    def truncate(name, length):
        return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:length])

    def flip(name, pos, bit):
        def corrupt(folder):
            data = bytearray((folder / name).read_bytes())
            data[pos] ^= 1 << bit
            (folder / name).write_bytes(bytes(data))

        return corrupt

    cuts = {0, 1, 7, 8, header_end - 1, header_end, header_end + 1, weights_len - 1}
    cuts |= {rng.randrange(weights_len) for _ in range(8)}
    cases += [(f"truncate_weights_{n}", truncate(WEIGHTS_NAME, n)) for n in sorted(cuts)]
    flips = [rng.randrange(8, header_end) for _ in range(30)]  # the JSON header: names, dtypes, shapes, offsets
    flips += [rng.randrange(header_end, weights_len) for _ in range(12)]  # the tensors' bytes
    flips += [rng.randrange(0, 8) for _ in range(4)]  # the header-size field
    cases += [(f"flip_weights_{p}", flip(WEIGHTS_NAME, p, rng.randrange(8))) for p in flips]
    cases += [
        (f"truncate_config_{n}", truncate(CONFIG_NAME, n)) for n in sorted({0, 1, config_len // 2, config_len - 2})
    ]
    cases += [(f"flip_config_{p}", flip(CONFIG_NAME, p, rng.randrange(8))) for p in rng.sample(range(config_len), 24)]

    key = next(k for k in keys if "layers.0." in k and "lora_A" in k)
    for keep in (True, False):
        tag = "signed" if keep else "unsigned"

        def grow(t, key=key):
            t[key] = torch.randn(t[key].shape[0] + 1, t[key].shape[1])

        def transpose(t, key=key):
            t[key] = t[key].T.contiguous()

        def drop(t, key=key):
            del t[key]

        def extra(t):
            t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.randn(4, 32)

        def rename(t, key=key):
            t[key.replace("layers.0", "layers.7")] = t.pop(key)

        for name, change in [("grow", grow), ("transpose", transpose), ("drop", drop), ("extra", extra)]:
            cases.append((f"{name}_{tag}", lambda folder, c=change, k=keep: _rewrite(folder, c, k)))
        cases.append((f"rename_{tag}", lambda folder, k=keep, r=rename: _rewrite(folder, r, k)))
        for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool):

            def cast(t, dtype=dtype):
                t[key] = t[key].to(dtype)

            cases.append((f"dtype_{dtype}_{tag}", lambda folder, c=cast, k=keep: _rewrite(folder, c, k)))

    def set_field(field, value):
        return lambda folder: _edit_config(folder, lambda d: d.__setitem__(field, value))

    for field, value in [
        ("r", 8),
        ("r", "4"),
        ("r", 0),
        ("lora_alpha", "x"),
        ("target_modules", ["k_proj"]),
        ("target_modules", 5),
        ("target_modules", "q_proj"),
        ("peft_type", "IA3"),
        ("peft_type", "NOPE"),
        ("layers_to_transform", [9]),
        ("modules_to_save", None),
        ("modules_to_save", ["nope"]),
        ("rank_pattern", {"q_proj": 8}),
        ("rank_pattern", [1]),
        ("bias", "all"),
        ("task_type", 3),
    ]:
        cases.append((f"config_{field}={value!r}", set_field(field, value)))
    cases.append(("config_not_an_object", lambda folder: (folder / CONFIG_NAME).write_text('["r", 4]')))
    cases.append(("no_config", lambda folder: (folder / CONFIG_NAME).unlink()))
    cases.append(("no_weights", lambda folder: (folder / WEIGHTS_NAME).unlink()))
    return cases


def _gpt2_base():
    return make_model("gpt2")


def _wider_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).eval()


def _outcome(load, expected: dict[str, torch.Tensor], file_tensors: dict[str, torch.Tensor] | None) -> str:
    """'refused' or 'loaded', asserting that a load gave the saved (or the file's own) weights."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = load()
    except CLEAR_ERRORS as e:
        assert str(e), "an error without a message"
        return "refused"
    if _same(got, expected):
        return "loaded"
    assert file_tensors is not None, "loaded weights that differ from the saved ones"
    converted = {k: file_tensors[k].to(expected[k].dtype) for k in file_tensors}
    assert _same(got, converted), "loaded weights that differ from the file's"
    return "loaded_file"


def test_corrupted_adapter_folders_load_exactly_or_fail_clearly(tmp_path):
    model = _random_lora()
    expected = _weights(model)
    clean = tmp_path / "clean"
    model.save_pretrained(clean)
    base = make_model("llama")
    holder = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))

    def from_pretrained(folder):
        return lambda: _placed(PeftModel.from_pretrained(copy.deepcopy(base), folder), "default", expected)

    def load_adapter(folder):
        def load():  # into a model that already holds an adapter
            peft_model = copy.deepcopy(holder)
            peft_model.load_adapter(folder, adapter_name="fuzz")
            return _placed(peft_model, "fuzz", expected)

        return load

    # the clean folder loads exactly, both ways
    assert _outcome(from_pretrained(clean), expected, None) == "loaded"
    assert _outcome(load_adapter(clean), expected, None) == "loaded"

    weights_bytes = (clean / WEIGHTS_NAME).read_bytes()
    header_end = 8 + int.from_bytes(weights_bytes[:8], "little")
    cases = _cases(len(weights_bytes), header_end, len((clean / CONFIG_NAME).read_bytes()), sorted(expected))
    outcomes: dict[str, str] = {}
    for i, (name, corrupt) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        shutil.copytree(clean, folder)
        corrupt(folder)
        unsigned = name.endswith("_unsigned")
        file_tensors = load_file(folder / WEIGHTS_NAME) if unsigned else None
        try:
            outcome = _outcome(from_pretrained(folder), expected, file_tensors)
            # may differ from from_pretrained's (a second adapter with bias="all" is refused), never be wrong
            _outcome(load_adapter(folder), expected, file_tensors)
        except AssertionError as e:
            raise AssertionError(f"case {name}: {e}") from e
        outcomes[name] = outcome

    for name in ("no_config", "no_weights", "config_not_an_object", "config_r=8", "config_peft_type='IA3'"):
        assert outcomes[name] == "refused", name
    for name, outcome in outcomes.items():
        if name.startswith(("truncate_weights", "grow", "transpose", "drop", "extra", "rename")):
            assert outcome == "refused", name
        if name.endswith("_signed") or name.startswith("flip_weights"):
            assert outcome in ("refused", "loaded"), name  # the checksum leaves no room for other numbers
    assert outcomes["dtype_torch.int32_unsigned"] == outcomes["dtype_torch.bool_unsigned"] == "refused"
    assert outcomes["dtype_torch.float16_unsigned"] == "loaded_file"
    assert sum(o == "refused" for o in outcomes.values()) > len(outcomes) // 2


@pytest.mark.parametrize("make_base", [_gpt2_base, _wider_llama], ids=["gpt2", "wider_llama"])
def test_an_adapter_for_another_architecture_is_refused(tmp_path, make_base):
    _random_lora().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="matched no module|shapes do not fit"):
        PeftModel.from_pretrained(make_base(), tmp_path)
