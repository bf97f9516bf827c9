"""Nothing lost, nothing misapplied: atomic and exclusive saves (`adapter_files`' protocol),
loads that succeed whole or change nothing, and adapter names that cannot leave their folder.

Crashes are simulated in-process: from a chosen file-system step of a save on, every step
that would change the disk raises instead, so neither the save nor its clean-up writes
anything more (as if the process had died there). The oracle of every check is the adapter
as it was before the save or the one being saved, compared tensor by tensor."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import make_model

import peft_fast
from peft_fast import LoraConfig, PeftModel, get_peft_model
from peft_fast import adapter_files as af
from peft_fast import save_and_load as sl
from peft_fast.config import CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_NAME_PT
from peft_fast.peft_model import _read_adapter

TARGETS = ["q_proj", "v_proj"]


def _lora(r: int = 4, alpha: int = 8, seed: int = 0, **kw) -> PeftModel:
    """A LoRA model whose adapter weights are random (B too), so that two adapters differ."""
    model = get_peft_model(make_model("llama"), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _adapter_weights(model: PeftModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_fast.get_peft_model_state_dict(model, adapter_name=name).items()}


def _loaded(folder) -> tuple[int, dict[str, torch.Tensor]]:
    """(r, adapter weights) of the adapter a fresh base model loads from `folder`."""
    model = PeftModel.from_pretrained(make_model("llama"), folder)
    return model.peft_config["default"].r, _adapter_weights(model)


def _on_disk(folder) -> tuple[int, dict[str, torch.Tensor]]:
    """(r, weights under file keys) that a load of `folder` reads: cheaper than `_loaded`."""
    config, weights = _read_adapter(folder, None, torch.device("cpu"))
    return config.r, weights


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


# -- atomic saves ------------------------------------------------------------------------------
class _Crash(BaseException):
    """The simulated death of the saving process."""


_STEPS = ("_stage", "_backup", "_fsync_dir")  # adapter_files' own steps; os.replace/os.unlink too


def _patch_steps(monkeypatch, crash_at: int | None) -> list[str]:
    """Count the save's file-system steps; from step `crash_at` on, each raises _Crash."""
    log: list[str] = []

    def wrap(name, fn):
        def step(*args, **kwargs):
            log.append(name)
            if crash_at is not None and len(log) >= crash_at:
                raise _Crash(name)
            return fn(*args, **kwargs)

        return step

    for name in _STEPS:
        monkeypatch.setattr(af, name, wrap(name, getattr(af, name)))
    monkeypatch.setattr(af.os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(af.os, "unlink", wrap("unlink", os.unlink))
    return log


def _entries(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("had_adapter", [True, False], ids=["over_an_adapter", "into_an_empty_folder"])
def test_a_save_that_dies_at_any_step_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, had_adapter):
    monkeypatch.setattr(af.os, "fsync", lambda fd: None)  # the order of steps is under test, not the disk
    old, new = _lora(r=4, seed=1), _lora(r=8, alpha=32, seed=2)
    old_w, new_w = _adapter_weights(old), _adapter_weights(new)
    if had_adapter:
        old.save_pretrained(tmp_path / "probe")
    with monkeypatch.context() as m:
        steps = _patch_steps(m, None)
        new.save_pretrained(tmp_path / "probe")
    assert len(steps) >= 8, steps  # stage x2, journal, replace x2, unlink journal, fsyncs...
    outcomes = []
    for crash_at in range(1, len(steps) + 1):
        folder = tmp_path / f"crash{crash_at}"
        if had_adapter:
            old.save_pretrained(folder)
        with monkeypatch.context() as m:
            _patch_steps(m, crash_at)
            with pytest.raises(_Crash):
                new.save_pretrained(folder)
        # Read-only loads see the committed adapter without repairing the folder first.
        try:
            r, weights = _on_disk(folder)
        except ValueError as e:
            assert not had_adapter and ("no adapter_config.json" in str(e) or "no adapter_model" in str(e)), e
            outcomes.append("none")
        else:
            if r == 8 and _same(weights, new_w):
                outcomes.append("new")
            else:
                assert had_adapter and r == 4 and _same(weights, old_w), f"crash at step {crash_at}: a mixture"
                outcomes.append("old")
        # A roll-back that itself dies half way (after its first step) changes nothing either.
        with monkeypatch.context() as m:
            _patch_steps(m, 2)
            with pytest.raises(_Crash):
                old.save_pretrained(folder)
        try:
            r, weights = _on_disk(folder)
        except ValueError:
            assert outcomes[-1] == "none"
        else:
            assert _same(weights, new_w if outcomes[-1] == "new" else old_w)
        # The next save rolls the interrupted one back, then commits, and leaves nothing behind.
        old.save_pretrained(folder)
        r, weights = _on_disk(folder)
        assert r == 4 and _same(weights, old_w)
        assert _entries(folder) == sorted([af.LOCK_NAME, CONFIG_NAME, WEIGHTS_NAME])
    assert _same(_loaded(folder)[1], old_w)  # and a model takes it
    before = "old" if had_adapter else "none"
    # One commit point: the old adapter up to it, the new one after it.
    assert outcomes == sorted(outcomes, key=[before, "new"].index), outcomes
    assert outcomes[0] == before and outcomes[-1] == "new"


def test_a_save_that_raises_rolls_back_and_cleans_up(tmp_path, monkeypatch):
    old, new = _lora(r=4, seed=1), _lora(r=8, seed=2)
    old.save_pretrained(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    real_replace = os.replace
    calls = []

    def replace_then_fail(src, dst):  # the weights are replaced, then the config fails
        calls.append(dst)
        if str(dst).endswith(CONFIG_NAME) and str(src).endswith(af._TMP_SUFFIX):  # not the roll-back's replace
            disk_full()
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(af.os, "replace", replace_then_fail)
        with pytest.raises(OSError, match="No space left"):
            new.save_pretrained(tmp_path)
    assert any(str(c).endswith(WEIGHTS_NAME) for c in calls)  # it did get past the weights
    r, weights = _loaded(tmp_path)
    assert r == 4 and _same(weights, _adapter_weights(old))
    assert _entries(tmp_path) == sorted([af.LOCK_NAME, CONFIG_NAME, WEIGHTS_NAME])


def test_switching_format_removes_the_other_weights_file(tmp_path):
    """A .bin save over a .safetensors one (or back) must not leave the older file to be loaded instead."""
    a, b = _lora(seed=1), _lora(seed=2)
    a.save_pretrained(tmp_path)
    b.save_pretrained(tmp_path, safe_serialization=False)
    assert _entries(tmp_path) == sorted([af.LOCK_NAME, CONFIG_NAME, WEIGHTS_NAME_PT])
    assert _same(_loaded(tmp_path)[1], _adapter_weights(b))
    a.save_pretrained(tmp_path)
    assert WEIGHTS_NAME_PT not in _entries(tmp_path)
    assert _same(_loaded(tmp_path)[1], _adapter_weights(a))


def test_concurrent_saves_into_one_folder_serialize(tmp_path):
    """Two savers and a loader at once: every load is exactly one of the two adapters."""
    models = {4: _lora(r=4, seed=1), 8: _lora(r=8, seed=2)}
    expected = {r: _adapter_weights(m) for r, m in models.items()}
    models[4].save_pretrained(tmp_path)
    errors: list[BaseException] = []
    seen: list[int] = []

    def saver(r):
        try:
            for _ in range(8):
                models[r].save_pretrained(tmp_path)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def loader():
        try:
            for _ in range(8):
                config, weights = _read_adapter(tmp_path, None, torch.device("cpu"))
                assert _same(weights, expected[config.r]), "a mixture of two saves"
                seen.append(config.r)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(r,)) for r in models] + [threading.Thread(target=loader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(seen) == 8
    r, weights = _loaded(tmp_path)
    assert _same(weights, expected[r])


def test_saved_weights_carry_a_checksum_that_loads_verify(tmp_path):
    from safetensors import safe_open

    model = _lora(seed=3)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert metadata[sl.CHECKSUM_KEY] == sl.tensors_digest(_adapter_weights(model))
    data = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's data
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checksum"):
        _loaded(tmp_path)


def test_hf_peft_reads_what_we_save(tmp_path):
    """The extra metadata key and the lock file do not disturb HF peft."""
    import peft

    model = _lora(seed=4)
    model.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path)
    hf_weights = {k: v for k, v in peft.get_peft_model_state_dict(hf).items()}
    assert _same(hf_weights, _adapter_weights(model))


# -- transactional loads -----------------------------------------------------------------------
def _model_state(model: torch.nn.Module) -> dict:
    """Everything a failed load must leave as it was."""
    state = {
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "tensors": {k: (v.detach().clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()},
        "has_peft_config": hasattr(model, "peft_config") and not isinstance(model, PeftModel),
    }
    if isinstance(model, PeftModel):
        state["configs"] = {n: c.to_dict() for n, c in model.peft_config.items()}
        state["active"] = model.active_adapter
    return state


def _assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = _model_state(model)
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, (t, grad) in before["tensors"].items():
        assert torch.equal(after["tensors"][k][0], t), k
        assert after["tensors"][k][1] == grad, f"requires_grad of {k}"
    assert {k: v for k, v in after.items() if k not in ("modules", "tensors")} == {
        k: v for k, v in before.items() if k not in ("modules", "tensors")
    }


def _corrupt_shape(folder) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / WEIGHTS_NAME)
    key = sorted(weights)[-1]
    weights[key] = torch.zeros(weights[key].shape[0] + 1, *weights[key].shape[1:])
    save_file(weights, folder / WEIGHTS_NAME)


def _drop_key(folder) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / WEIGHTS_NAME)
    del weights[sorted(weights)[-1]]
    save_file(weights, folder / WEIGHTS_NAME)


@pytest.fixture
def base_with_adapter():
    """A model holding an inference-mode "default" adapter (frozen), as after from_pretrained."""
    model = _lora(seed=5, modules_to_save=["lm_head"])
    model.peft_config["default"].inference_mode = True
    model.set_adapter("default")
    return model


FAILURES = {
    "wrong_shape": (dict(), _corrupt_shape, "shapes do not fit"),
    "missing_key": (dict(), _drop_key, "missing from the file"),
    # new LoRA layers (on k_proj) and a new modules_to_save wrapper (on a norm) must go again
    "new_targets": (dict(target_modules=["k_proj"], modules_to_save=["norm"]), _corrupt_shape, "shapes do not fit"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failed_load_adapter_changes_nothing(tmp_path, base_with_adapter, case):
    kw, corrupt, message = FAILURES[case]
    other = get_peft_model(make_model("llama"), LoraConfig(r=2, **{"target_modules": TARGETS, **kw}))
    other.save_pretrained(tmp_path)
    corrupt(tmp_path)
    model = base_with_adapter
    before = _model_state(model)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(tmp_path, adapter_name="second")
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="adapter 'second' does not exist"):
        model.set_adapter("second")
    model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "second").exists()


@pytest.mark.parametrize("where", ["_create_layer", "_update_layer", "_cast_adapter_dtype", "set_modules_to_save"])
def test_add_and_load_that_fail_midway_change_nothing(tmp_path, base_with_adapter, monkeypatch, where):
    """A failure inside injection (after some layers were already wrapped or extended), or after it."""
    get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "k_proj"])).save_pretrained(tmp_path)
    model = base_with_adapter
    calls = []

    def fail_on_second(real):
        def hook(*args, **kwargs):
            calls.append(1)
            if where == "set_modules_to_save":
                real(*args, **kwargs)  # the heads are wrapped, then it fails
            if len(calls) == 2 or where in ("_cast_adapter_dtype", "set_modules_to_save"):
                raise RuntimeError(f"injected failure in {where}")
            return real(*args, **kwargs)

        return hook

    import peft_fast.peft_model as pm

    if where == "set_modules_to_save":
        monkeypatch.setattr(pm, where, fail_on_second(pm.set_modules_to_save))
    elif where == "_cast_adapter_dtype":
        monkeypatch.setattr(PeftModel, where, fail_on_second(PeftModel._cast_adapter_dtype))
    else:
        tuner_cls = type(model.base_model)
        monkeypatch.setattr(tuner_cls, where, fail_on_second(getattr(tuner_cls, where)))
    before = _model_state(model)
    config = LoraConfig(r=2, target_modules=["q_proj", "k_proj"], modules_to_save=["norm"])
    with pytest.raises(RuntimeError, match="injected failure"):
        model.add_adapter("second", config)
    _assert_unchanged(model, before)
    if where != "set_modules_to_save":  # load_adapter's config has no modules_to_save
        calls.clear()
        with pytest.raises(RuntimeError, match="injected failure"):
            model.load_adapter(tmp_path, adapter_name="third")
        _assert_unchanged(model, before)
    assert calls  # the hook did run


def test_failed_from_pretrained_leaves_the_base_model_as_it_was(tmp_path):
    _lora(seed=6, modules_to_save=["lm_head"]).save_pretrained(tmp_path)
    _corrupt_shape(tmp_path)
    base = make_model("llama")
    before = _model_state(base)
    with pytest.raises(ValueError, match="shapes do not fit"):
        PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, before)
    assert not hasattr(base, "peft_config")
    # and the same model still takes a good adapter afterwards
    good = _lora(seed=7)
    good.save_pretrained(tmp_path / "good")
    loaded = PeftModel.from_pretrained(base, tmp_path / "good")
    assert _same(_adapter_weights(loaded), _adapter_weights(good))


# -- safe names --------------------------------------------------------------------------------
BAD_NAMES = ["", "/elsewhere/x", "a/b", "a\\b", "..", "a.b", "x\0y", "C:x", "__base__"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_adapter_names_are_refused_where_given(tmp_path, name):
    saved = _lora(seed=8)
    saved.save_pretrained(tmp_path / "a")
    model = _lora(seed=9)
    before = _model_state(model)
    with pytest.raises(ValueError, match="adapter_name must be a plain name"):
        model.load_adapter(tmp_path / "a", adapter_name=name)
    with pytest.raises(ValueError, match="adapter_name must be a plain name"):
        model.add_adapter(name, LoraConfig(target_modules=TARGETS))
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="adapter_name must be a plain name"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=TARGETS), adapter_name=name)
    with pytest.raises(ValueError, match="adapter_name must be a plain name"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "a", adapter_name=name)
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["a", "out"]  # nothing written anywhere else


def test_add_adapter_keeps_an_inference_mode_adapter_frozen(tmp_path):
    """As HF peft: adding a trainable adapter next to one loaded for inference leaves that one frozen."""
    import peft

    _lora(seed=12).save_pretrained(tmp_path)
    trainable = {}
    for lib in (peft, peft_fast):
        model = lib.PeftModel.from_pretrained(make_model("llama"), tmp_path)
        model.add_adapter("b", lib.LoraConfig(target_modules=TARGETS))
        trainable[lib.__name__] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable["peft_fast"] == trainable["peft"] == []


def test_adapter_name_must_be_a_string():
    with pytest.raises(TypeError, match="adapter_name must be a string"):
        _lora().add_adapter(3, LoraConfig(target_modules=TARGETS))


def test_save_pretrained_never_writes_outside_its_folder(tmp_path):
    model = _lora(seed=10)
    model.add_adapter("other", LoraConfig(target_modules=TARGETS))
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "other").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside save_directory"):
        model.save_pretrained(root)
    assert os.listdir(outside) == [] and sorted(os.listdir(root)) == ["other"]  # nothing saved at all
    # A name slipped into peft_config past the checks is refused at save time too.
    model.peft_config["../escaped"] = model.peft_config.pop("other")
    with pytest.raises(ValueError, match="adapter name must be a plain name"):
        model.save_pretrained(tmp_path / "root2")
    assert not (tmp_path / "escaped").exists()


def test_a_symlinked_weights_file_is_replaced_not_written_through(tmp_path):
    model = _lora(seed=11)
    target = tmp_path / "elsewhere.safetensors"
    target.write_bytes(b"keep me")
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / WEIGHTS_NAME).symlink_to(target)
    model.save_pretrained(folder)
    assert target.read_bytes() == b"keep me"
    assert not (folder / WEIGHTS_NAME).is_symlink()
    assert _same(_loaded(folder)[1], _adapter_weights(model))


def test_a_save_leaves_other_files_of_the_folder_alone(tmp_path):
    (tmp_path / ".notes.tmp").write_text("mine")
    (tmp_path / ".model.prev").write_text("mine too")
    (tmp_path / "README.md").write_text("hello")
    _lora(seed=13).save_pretrained(tmp_path)
    _lora(seed=14).save_pretrained(tmp_path)
    assert _entries(tmp_path) == sorted(
        [".notes.tmp", ".model.prev", "README.md", af.LOCK_NAME, CONFIG_NAME, WEIGHTS_NAME]
    )
