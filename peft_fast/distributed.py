"""Training on several processes: torchrun's environment, the process group, DDP and FSDP2.

`peft-fast train` uses these when it is launched by `torchrun` (or any launcher that sets the
same variables, `accelerate launch` included). Nothing here is imported by the layers or ops:
the custom ops see FSDP2's unsharded parameters in forward and backward like any other tensor.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MODES = ("ddp", "fsdp2")
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a torchrun-style launch."""

    world_size: int
    rank: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one process that writes files and prints."""
        return self.rank == 0


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launch this process belongs to, read from WORLD_SIZE, RANK and LOCAL_RANK (set by
    torchrun); None when none of them is set (a plain single process).

    Raises ValueError when only some are set, or when they are not integers with
    0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0."""
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return None
    if len(present) != len(LAUNCH_VARIABLES):
        missing = [name for name in LAUNCH_VARIABLES if name not in environ]
        raise ValueError(
            f"environment variables {present} are set but {missing} are not: launch with torchrun, "
            "which sets WORLD_SIZE, RANK and LOCAL_RANK together"
        )
    try:
        world_size, rank, local_rank = (int(environ[name]) for name in LAUNCH_VARIABLES)
    except ValueError:
        values = {name: environ[name] for name in LAUNCH_VARIABLES}
        raise ValueError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers, got {values}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"expected WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got WORLD_SIZE={world_size}, "
            f"RANK={rank}, LOCAL_RANK={local_rank}"
        )
    return LaunchEnv(world_size, rank, local_rank)


def accelerate_fsdp_version(environ: Mapping[str, str] | None = None) -> str | None:
    """The FSDP version `accelerate launch` asks for with an FSDP config (its ACCELERATE_USE_FSDP
    and FSDP_VERSION variables), or None when it asks for no FSDP."""
    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1"):
        return None
    return environ.get("FSDP_VERSION", "1")


def backend_for(device: torch.device) -> str:
    """The collective backend for `device`: nccl on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(env: LaunchEnv, device: torch.device) -> Iterator[None]:
    """The default process group of `env`'s launch, for the body of the `with`.

    Initialises it from torchrun's variables (MASTER_ADDR, MASTER_PORT: `env://`) with
    `backend_for(device)` and destroys it on exit. A group that is already initialised (by the
    caller) is used as it is and left alone, after checking it has `env`'s rank and size."""
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise RuntimeError(
                f"the initialised process group has rank {dist.get_rank()} of {dist.get_world_size()}, but "
                f"RANK={env.rank} and WORLD_SIZE={env.world_size}"
            )
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A process group of world size 1 (this process), for the body of the `with`: lets FSDP2
    wrap a model on one device. Uses a FileStore in a temporary folder (no port to pick), and
    `backend_for(device)`. An already initialised group is used as it is."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory(prefix="peft_fast_pg_") as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group(backend_for(device), store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of `model` (a transformers model, bare or inside a PeftModel): the
    modules whose class is named in the model's `_no_split_modules` (what accelerate's FSDP
    wraps by default), or else every module held in an `nn.ModuleList` whose entries all
    have one class (BERT's `encoder.layer`, for one).

    Raises ValueError when it finds neither."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        for module in model.modules():
            if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
                blocks.extend(module)
    if not blocks:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__} to shard: it names no "
            "_no_split_modules and holds no nn.ModuleList of blocks"
        )
    # Outermost only: a block inside another block is sharded with it.
    inner = {id(sub) for b in blocks for sub in b.modules() if sub is not b}
    return [b for b in blocks if id(b) not in inner]


def shard_fsdp2(model: nn.Module, device: torch.device) -> nn.Module:
    """Apply FSDP2's `fully_shard` to each of `transformer_blocks(model)`, then to `model`, on
    a 1-D mesh over the default process group; return `model` (sharded in place: its
    parameters become DTensors, gathered for each block's forward and backward)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """`model` (already on `device`) ready for data-parallel training: "ddp" wraps it in
    DistributedDataParallel (gradients averaged over ranks), "fsdp2" shards it with
    `shard_fsdp2` (gradients reduce-scattered, averaged). Returns the module to call."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp2":
        return shard_fsdp2(model, device)
    raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with every FSDP2-sharded tensor gathered whole, on the CPU, on rank
    0; an empty dict on the other ranks. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rank_share(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank `rank`'s contiguous part of `items` when they are split over `world_size` ranks
    as evenly as possible (the first len(items) % world_size ranks take one more)."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (rank < extra)])


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; a collective)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
