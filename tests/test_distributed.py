"""peft_fast/distributed.py and `peft-fast train` under torchrun: DDP and FSDP2 on 2 CPU
processes (gloo) give the single-process weights.

The oracle is a single-process `run` in this process with the whole batch (4 examples), on
the same tiny BERT and data; the 2-process runs split each batch over the ranks (4 = 2 + 2,
then 3 = 2 + 1, the two shares' losses weighted 2:1). With dropout 0 and
one seed, the two updates are the same math in another order, so the saved adapters agree to
float rounding. The ranks are started as torchrun starts them (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), each in its own working folder, and `peft-fast train` sets up and
tears down the process group itself (tests/distributed_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file
from test_train import EXAMPLES, _save_tiny_bert

from peft_fast import LoraConfig, get_peft_model
from peft_fast.cli import main as cli_main
from peft_fast.distributed import LaunchEnv, launch_env, rank_share, single_process_group, transformer_blocks
from peft_fast.train import TrainConfig, TrainConfigError, run

WORKER = Path(__file__).with_name("distributed_worker.py")
# Same math, other summation order (two half batches, an all-reduce): fp32 rounding, which AdamW's
# g / sqrt(v) magnifies where a gradient is near 0 (measured: 1.5e-6). An error in the sharding or the
# weighting of the uneven second batch moves weights by a good part of lr = 2e-3.
WEIGHT_ATOL = 1e-5
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, data file): a tiny BERT without dropout, and EXAMPLES with 7 training examples."""
    root = tmp_path_factory.mktemp("dist")
    model = _save_tiny_bert(root / "model", hidden=32, intermediate=64)
    config = json.loads((model / "config.json").read_text())  # no dropout anywhere: the runs are deterministic
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    test = {0, 1, 3, 6, 9}  # 7 training examples: batches of 4 then 3, the second split 2 + 1 over 2 ranks
    rows = [{"text": t, "label": y, "split": "test" if i in test else "train"} for i, (t, y) in enumerate(EXAMPLES)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _launch(world: int, model: Path, data: Path, runs: list[tuple[str, str]], root: Path):
    """Start `world` ranks of the worker with torchrun's variables; return a function that
    waits for them, checks they all succeeded and returns each rank's folder."""
    ports = _free_ports(len(runs))
    specs = [f"{mode}:{backend}:{port}" for (mode, backend), port in zip(runs, ports)]
    folders, procs = [], []
    for rank in range(world):
        folder = root / f"rank{rank}"
        folder.mkdir()
        env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env.update(MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=str(WORKER.parent))
        cmd = [sys.executable, str(WORKER), str(model), str(data), *specs]
        log = (root / f"rank{rank}.log").open("w")
        procs.append((subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        folders.append(folder)

    def wait() -> list[Path]:
        try:
            codes = [p.wait(timeout=240) for p, _ in procs]
        finally:
            for p, log in procs:
                if p.poll() is None:
                    p.kill()
                log.close()
        logs = [(root / f"rank{r}.log").read_text() for r in range(world)]
        assert codes == [0] * world, "\n\n".join(log[-3000:] for log in logs)
        return folders

    return wait


def test_ddp_and_fsdp2_on_two_processes_give_the_single_process_weights(tiny, tmp_path):
    model, data = tiny
    # "accelerate": no --distributed, the variables `accelerate launch` sets with an fsdp_version 2 config
    runs = [(mode, backend) for backend in ("torch", "triton") for mode in ("ddp", "fsdp2")] + [("accelerate", "torch")]
    wait = _launch(2, model, data, runs, tmp_path)
    singles = {}
    try:
        for backend in ("torch", "triton"):  # the oracle, while the ranks run
            config = TrainConfig(model=str(model), data=str(data), steps=2, batch_size=4, dropout=0.0, backend=backend)
            config.output_dir = str(tmp_path / f"single-{backend}")
            run(config, verbose=False)
            singles[backend] = json.loads((tmp_path / f"single-{backend}" / "train_summary.json").read_text())
    finally:
        rank0, rank1 = wait()

    for backend in ("torch", "triton"):
        single = tmp_path / f"single-{backend}"
        expected = load_file(single / "adapter_model.safetensors")
        assert any("lora_B" in k for k in expected) and all(  # trained: B moved away from its zero init
            expected[k].abs().max() > 1e-4 for k in expected if "lora_B" in k
        )
        for mode in [m for m, b in runs if b == backend]:
            folder = rank0 / f"{mode}-{backend}"
            assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == ADAPTER_FILES | {
                "train_summary.json"
            }
            assert json.loads((folder / "adapter_config.json").read_text()) == json.loads(
                (single / "adapter_config.json").read_text()
            )
            got = load_file(folder / "adapter_model.safetensors")
            assert got.keys() == expected.keys()
            for key, want in expected.items():
                assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
                err = (got[key] - want).abs().max().item()
                assert err <= WEIGHT_ATOL, f"{mode}/{backend} {key}: max |diff| {err:.3g} > {WEIGHT_ATOL:g}"
            summary = json.loads((folder / "train_summary.json").read_text())
            assert summary["world_size"] == 2 and summary["steps"] == 2
            assert summary["distributed"] == ("fsdp2" if mode == "accelerate" else mode)
            # the reported loss is the whole batch's mean, as in the single process
            assert summary["final_loss"] == pytest.approx(singles[backend]["final_loss"], abs=1e-6)
    # Rank 1 wrote nothing at all (its working folder is where its files would have gone),
    # and printed no report; rank 0 reported each run.
    assert list(rank1.iterdir()) == []
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    for mode, backend in runs:
        mode = "fsdp2" if mode == "accelerate" else mode
        assert logs[0].count(f"method       lora on cpu, backend {backend}, 2 processes ({mode})\n") >= 1
    assert logs[0].count("accelerate's FSDP config: fsdp_version 2 read") == 1
    assert "adapter saved" not in logs[1] and "processes (" not in logs[1]
    # The Triton runs ran the Triton kernels: dispatch never fell back.
    assert not any("falling back" in log for log in logs)


def test_launch_env_reads_torchrun_variables():
    assert launch_env({}) is None
    assert launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == LaunchEnv(4, 3, 1)
    with pytest.raises(ValueError, match=r"\['WORLD_SIZE'\] are set but \['RANK', 'LOCAL_RANK'\] are not"):
        launch_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        launch_env({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        launch_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_rank_share_splits_contiguously_and_covers_everything():
    items = list(range(7))
    shares = [rank_share(items, r, 3) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert [rank_share(items[:4], r, 2) for r in range(2)] == [[0, 1], [2, 3]]


def test_transformer_blocks_finds_each_models_layers():
    llama = make_model("llama")
    assert [type(b).__name__ for b in transformer_blocks(llama)] == ["LlamaDecoderLayer"] * 2
    bert = get_peft_model(make_model("bert"), LoraConfig(task_type="SEQ_CLS", r=2))  # inside a PeftModel
    assert [type(b).__name__ for b in transformer_blocks(bert)] == ["BertEmbeddings", "BertLayer", "BertLayer"]

    class Stack(torch.nn.Module):  # no _no_split_modules: the entries of its ModuleList
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(3))

    stack = Stack()
    assert transformer_blocks(stack) == list(stack.blocks)
    with pytest.raises(ValueError, match="cannot find the transformer blocks of Linear"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_fsdp2_in_one_process_matches_the_plain_model():
    """FSDP2 on a 1-process gloo group (what the GPU round's e2e suite runs on one GPU):
    parameters become DTensors, and a forward + backward gives the unwrapped model's loss
    and adapter gradients."""
    from torch.distributed.tensor import DTensor

    from peft_fast.distributed import shard_fsdp2

    def build():
        model = make_model("llama").train()
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.0, init_lora_weights=False))

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    plain = build()
    plain_loss = plain(input_ids=ids, labels=ids).loss
    plain_loss.backward()
    with single_process_group(torch.device("cpu")):
        sharded = shard_fsdp2(build(), torch.device("cpu"))
        params = dict(sharded.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        loss = sharded(input_ids=ids, labels=ids).loss
        loss.backward()
        for name, p in plain.named_parameters():
            if p.requires_grad:
                grad = params[name].grad.full_tensor()
                torch.testing.assert_close(grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert not torch.distributed.is_initialized()


def test_torchrun_of_one_process_in_process_and_a_rank_0_failure(tiny, tmp_path, monkeypatch):
    """torchrun's variables for a world of 1: `run` opens a gloo group itself, trains with DDP,
    saves, and destroys the group; when rank 0's reload fails, the error still comes out
    (after rank 0 has told the other ranks) and the group is gone."""
    model, data = tiny
    port = _free_ports(1)[0]
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = TrainConfig(model=str(model), data=str(data), steps=1, batch_size=4, output_dir=str(tmp_path / "a"))
    result = run(config, verbose=False)
    assert (result.world_size, result.distributed) == (1, "ddp")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert not torch.distributed.is_initialized()

    class Broken:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("disk gone")

    monkeypatch.setattr("peft_fast.train.PeftModel", Broken)
    monkeypatch.setenv("MASTER_PORT", str(_free_ports(1)[0]))
    with pytest.raises(OSError, match="disk gone"):
        run(TrainConfig(**{**config.__dict__, "output_dir": str(tmp_path / "b")}), verbose=False)
    assert not torch.distributed.is_initialized()


# -- bad input ---------------------------------------------------------------------------------------------
TORCHRUN_2 = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


@pytest.mark.parametrize(
    "env, kwargs, field, message",
    [
        ({}, {"distributed": "ddp"}, "distributed", "'ddp' needs a torchrun launch"),
        ({}, {"distributed": "fsdp2"}, "distributed", "'fsdp2' needs a torchrun launch"),
        (TORCHRUN_2, {"distributed": "zero3"}, "distributed", "must be one of \\['ddp', 'fsdp2'\\]"),
        (TORCHRUN_2, {"batch_size": 5}, "batch_size", "multiple of the world size 2"),
        (TORCHRUN_2, {"distributed": "fsdp2", "load_in_4bit": True}, "distributed", "cannot shard bitsandbytes"),
        ({"WORLD_SIZE": "2"}, {}, "distributed", "launch with torchrun"),
    ],
)
def test_bad_distributed_settings_name_the_field(monkeypatch, env, kwargs, field, message):
    if kwargs.get("load_in_4bit"):
        pytest.importorskip("bitsandbytes")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(TrainConfigError, match=message) as e:
        TrainConfig(device="cpu", **kwargs).validate()
    assert e.value.field == field


def test_accelerate_fsdp2_config_selects_fsdp2_and_other_versions_are_refused(monkeypatch):
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP and FSDP_VERSION (and
    torchrun's variables); peft-fast train follows fsdp_version 2 and refuses what it cannot do."""
    for name, value in TORCHRUN_2.items():
        monkeypatch.setenv(name, value)
    env = launch_env()
    assert TrainConfig(device="cpu").parallel_mode(env) == "ddp"
    assert TrainConfig(device="cpu").parallel_mode(None) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    TrainConfig(device="cpu").validate()
    assert TrainConfig(device="cpu").parallel_mode(env) == "fsdp2"
    with pytest.raises(TrainConfigError, match="asks for FSDP version 2, but this run would use 'ddp'") as e:
        TrainConfig(device="cpu", distributed="ddp").validate()
    assert e.value.field == "distributed"
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(TrainConfigError, match="set fsdp_cpu_ram_efficient_loading: false"):
        TrainConfig(device="cpu").validate()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(TrainConfigError, match="FSDP version 1.*shards with FSDP2 only"):
        TrainConfig(device="cpu").validate()


def test_ragged_last_batch_smaller_than_the_world_is_refused(tiny, monkeypatch, tmp_path):
    """7 training examples in batches of 6 leave a last batch of 1; with 3 ranks two would get nothing.
    Refused before any process group is needed."""
    model, data = tiny
    for name, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("peft_fast.distributed.process_group", _no_group)
    with pytest.raises(TrainConfigError, match="last batch of each epoch holds 1 .* fewer than the world size 3"):
        run(TrainConfig(model=str(model), data=str(data), batch_size=6, output_dir=str(tmp_path / "o")), verbose=False)
    assert not (tmp_path / "o").exists()


def _no_group(env, device):
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--distributed", "ddp"], "argument --distributed: 'ddp' needs a torchrun launch"),
        (["--distributed", "zero3"], "argument --distributed: invalid choice: 'zero3'"),
    ],
)
def test_cli_distributed_errors_name_the_argument(monkeypatch, capsys, args, expected):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--device", "cpu", *args])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err
