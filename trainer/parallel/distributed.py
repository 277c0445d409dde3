"""The process group and the few collectives the loop needs.

Workers are started by torchrun (`distrain train`), so rank and world size come from its environment. On one node
the store is namespaced by restart attempt: torchrun's agent keeps one TCPStore across worker restarts, and keys
left by the failed attempt (e.g. gloo's connection info) would otherwise be read by the new one, which then hangs
or fails. Multi-node runs get a fresh store per rendezvous round instead (cli/launch.py), since the restart count
is per node: a relaunched node starts again from 0.
Outside torchrun (`distrain eval`) a `DistEnv` of one process makes every collective a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from distrain.trainer.config.schema import Strategy
from distrain.trainer.parallel.dims import ParallelDims


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # Data parallelism (set from the layout and its device mesh): ranks of one tensor-parallel group see the same
    # data. The degree itself is the layout's (ParallelDims.dp).
    dims: ParallelDims = ParallelDims(Strategy.single, 1, 1)
    dp_rank: int = 0
    dp_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def use_layout(self, dims: ParallelDims, mesh: Any) -> None:
        """Take the layout, and this rank's data-parallel rank and group from its ("dp", "tp") device mesh."""
        self.dims = dims
        self.dp_rank, self.dp_group = mesh["dp"].get_local_rank(), mesh["dp"].get_group()

    def all_reduce_sum(self, tensor: torch.Tensor, data_parallel: bool = False) -> torch.Tensor:
        """Sum over ranks (or, with data_parallel, over one rank per data shard), in place; returns it."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.dp_group if data_parallel else None)
        return tensor

    def all_gather_ints(self, value: int) -> list[int]:
        """Every rank's value, on every rank, in rank order."""
        if not self.active:
            return [value]
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        out = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [int(x.item()) for x in out]

    def all_gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's list of numbers (the same length everywhere), on every rank, in rank order."""
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        if not self.active:
            return [mine.tolist()]
        out = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [x.tolist() for x in out]

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True: stop decisions must be the same everywhere."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        if self.active:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's object, on rank 0 only (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


def uses_cuda(choice: str) -> bool:
    """Whether train.device=`choice` trains on CUDA here (auto: when CUDA is available)."""
    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


def pick_device(choice: str, local_rank: int) -> torch.device:
    if uses_cuda(choice):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextmanager
def process_group(device_choice: str, backend: str | None, timeout_s: float) -> Iterator[DistEnv]:
    """Join the torchrun job's process group for the duration of the block, and always leave it. A collective
    that waits longer than `timeout_s` fails (launcher.collective_timeout_s; see trainer/observe/watchdog.py)."""
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_choice, local_rank)
    backend = str(backend or ("nccl" if device.type == "cuda" else "gloo"))
    store, rank, world_size = next(dist.rendezvous("env://"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # One node: the agent's store outlives a restart, and the restart count is the same for every worker.
        # (Multi-node runs get a fresh store per rendezvous round, cli/launch.py: restart counts differ by node.)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"attempt{attempt}", store)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    try:
        yield DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    finally:
        dist.destroy_process_group()
