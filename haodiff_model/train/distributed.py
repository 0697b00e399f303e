"""Process-group setup for `torchrun` and `accelerate launch`, with a single-process fallback.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to every process
(`accelerate launch --multi_gpu` runs torchrun underneath), so one env:// initialisation serves
both, on one node or many. NCCL on CUDA, gloo on CPU. Without WORLD_SIZE (or with WORLD_SIZE=1)
nothing is initialised and every helper here degrades to the single-process answer.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from haodiff_data.config import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def ranks_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when unset."""
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    if world > 1:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(n)]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun or "
                             "accelerate launch, or export them")
    return rank, world, local


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise ValueError(f"device must be 'cuda', 'cpu' or None (auto), got {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but this torch build sees no CUDA device; set train.device=cpu "
                          "(or null to pick CUDA when there is one)")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group the launcher describes (idempotent), or run as a single process.

    device: "cuda", "cpu" or None (CUDA when available); rank r uses cuda:LOCAL_RANK.
    """
    rank, world, local = ranks_from_env()
    dev = _pick_device(device, local)
    if world == 1:
        return DistContext(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) already exists "
                           f"and disagrees with the environment (rank {rank} of {world})")
    return DistContext(rank, world, local, dev, dist.get_backend())


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around `model` (already on ctx.device) when distributed, else `model`.

    DDP broadcasts rank 0's parameters and buffers at construction, so all ranks start equal.
    """
    if not ctx.is_distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def mean_scalars(values: Mapping[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """Mean over all ranks of each scalar, in one all-reduce (and one host sync)."""
    names = list(values)
    if not names:
        return {}
    stacked = torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=device).reshape(())
                           for n in names])
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the argument is ignored on other ranks)."""
    if not dist.is_initialized():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["DistContext", "all_gather_objects", "barrier", "broadcast_object", "init_distributed",
           "mean_scalars", "ranks_from_env", "shutdown_distributed", "unwrap", "wrap_ddp"]
