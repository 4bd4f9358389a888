"""Process-group plumbing shared by the data-parallel strategies (fsdp, deepspeed).

Launchers (`torchrun`, the `deepspeed` launcher, `srun` through our Slurm scripts) export RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a recipe started with plain `python` has
none of them and runs as a one-rank group (so `strategy=fsdp` also runs, and resumes a checkpoint
written by more ranks, in a single process).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from persimmon_train.errors import ConfigError
from persimmon_train.parallel.base import Strategy, available_device


def launched_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) without one."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(requested: str, local_rank: int) -> torch.device:
    """auto: this rank's GPU (cuda:LOCAL_RANK) when there is one, else CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return available_device(requested, local_rank)


def pick_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The rendezvous store of this launch attempt; None where env:// already gives a fresh one.

    torchrun's workers join the store its agent hosts (TORCHELASTIC_USE_AGENT_STORE=True), and that
    one store outlives a restart of the group. Without a per-attempt prefix the restarted ranks read
    the keys the killed group left there (a dead peer's gloo address: "connectFullMesh ... Connection
    refused", or a hang until the process-group timeout), so every attempt gets its own namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # rank 0 hosts a new store per launch (env://, deepspeed, srun)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"persimmon_train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_process_group(backend: str, timeout_minutes: float) -> None:
    """Join the launcher's group, or make a one-rank group when started without a launcher."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        rank, world, _ = launched_world()
        dist.init_process_group(backend, store=attempt_store(timeout), rank=rank, world_size=world, timeout=timeout)
    else:
        # No rendezvous needed for one rank: an in-process store.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


class DistributedStrategy(Strategy):
    """Collectives over the default process group; subclasses do the sharding."""

    def _join(self, device: str, backend: str, timeout_minutes: float) -> None:
        rank, world, local_rank = launched_world()
        self.local_rank = local_rank
        self._device = pick_device(device, local_rank)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self.backend = pick_backend(backend, self._device)
        init_process_group(self.backend, timeout_minutes)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if world != self.world_size or rank != self.rank:
            raise ConfigError(
                f"strategy: launcher says rank {rank}/{world} but the process group has {self.rank}/{self.world_size}"
            )

    @property
    def device(self) -> torch.device:
        return self._device

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj):
        box = [obj]
        if self.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class GroupComm:
    """The `comm` of `storage.save_checkpoint` over a gloo group of its own: a checkpoint written in
    a background thread synchronises there, so its collectives never interleave with the training
    step's on the default group (which may be NCCL). Every rank creates it at the same point."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.group = dist.new_group(backend="gloo")

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
