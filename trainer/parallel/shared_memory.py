"""DDP's gradient all-reduce through shared memory, for ranks on one host with CPU tensors (`parallel.shm_allreduce`).

gloo moves a bucket between two processes of one host over loopback TCP: every byte is copied through the kernel
on gloo's threads, which on a small machine take cores from the backward. A MiniLM bucket of 28 MB took 19 ms
alone and 52 ms beside the backward on 2 cores, and the step waited ~40 ms for the last one (docs/performance.md).
Here each rank writes its bucket (times 1/world, as DDP does) into its own slot of a buffer every rank has mapped,
waits until every rank has written (a one-element gloo all-reduce: its syscalls also order the memory), and sums
the slots in rank order into its bucket: 7 ms for those 28 MB, on the thread that runs the step. Every rank adds
the same numbers in the same order, so the ranks stay identical; with two ranks the sum is gloo's bit for bit
(a + b = b + a), with more its ring adds in another order (rounding-level differences).

Buckets go through in chunks of CHUNK_BYTES, each slot twice that (two chunks alternate): a rank writes a chunk's
slot again only after the next chunk's barrier, which every rank reaches after reading it. The files are created
in DISTRAIN_SHM_DIR (default /dev/shm), filled with posix_fallocate (a full tmpfs fails there, not with SIGBUS
mid-step) and unlinked once mapped: nothing is left behind, whatever happens to the run. When a rank cannot make its
file, every rank keeps gloo, and the rank's log says why.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # per slot half: 2 x 4 MiB per rank
SHM_DIR = "DISTRAIN_SHM_DIR"


def on_one_host(group: dist.ProcessGroup) -> bool:
    """Every rank of `group` runs under the same torchrun agent (LOCAL_WORLD_SIZE: the workers of this node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == dist.get_world_size(group) > 1


class SharedMemoryAllReduce:
    """Sum-all-reduce of contiguous CPU tensors among the ranks of `group`, through one mapped file per rank.
    `open` returns None (every rank agreeing) when some rank could not make its file."""

    def __init__(self, group: dist.ProcessGroup, slots: list[torch.Tensor]):
        self.group, self.slots = group, slots
        self.rank = dist.get_rank(group)
        self.barrier_flag = torch.zeros(1)
        self.chunks = 0  # chunks reduced so far: which half of the slots the next one uses

    @classmethod
    def open(cls, group: dist.ProcessGroup) -> SharedMemoryAllReduce | None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        token = [uuid.uuid4().hex if rank == 0 else None]
        dist.broadcast_object_list(token, group=group, group_src=0)
        folder = Path(os.environ.get(SHM_DIR, "/dev/shm"))
        paths = [folder / f"distrain-{token[0]}-{r}" for r in range(world)]
        problem, created = None, False
        try:
            fd = os.open(paths[rank], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
            try:
                os.posix_fallocate(fd, 0, 2 * CHUNK_BYTES)
            finally:
                os.close(fd)
        except OSError as error:
            problem = f"{error.strerror} ({error.filename or paths[rank]}, {2 * CHUNK_BYTES >> 20} MiB)"
        slots = []
        try:
            made = torch.tensor([0.0 if problem else 1.0])
            dist.all_reduce(made, op=dist.ReduceOp.MIN, group=group)
            if made.item() == 1.0:
                slots = [torch.from_file(str(path), shared=True, size=2 * CHUNK_BYTES, dtype=torch.uint8).view(2, -1)
                         for path in paths]  # fmt: skip
            dist.barrier(group=group)  # every rank has mapped every file (or given up)
        finally:  # mapped files live on without their names; a failed start leaves none behind either
            if created:
                paths[rank].unlink()
        if not slots:
            why = problem or "another rank could not make its file (its log says why)"
            log.warning("gradients all-reduced by gloo, not through shared memory: %s; set %s to a tmpfs folder "
                        "with room, or parallel.shm_allreduce=false", why, SHM_DIR)  # fmt: skip
            return None
        log.info("gradients all-reduced through shared memory (%d ranks, %s)", world, folder)
        return cls(group, slots)

    def all_reduce(self, tensor: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """`tensor` (contiguous) becomes the sum over ranks of `scale` x each rank's `tensor`."""
        flat = tensor.view(-1)
        per_chunk = CHUNK_BYTES // flat.element_size()
        for start in range(0, flat.numel(), per_chunk):
            piece = flat[start : start + per_chunk]
            half = self.chunks % 2
            self.chunks += 1
            slots = [slot[half].view(flat.dtype)[: piece.numel()] for slot in self.slots]
            torch.mul(piece, scale, out=slots[self.rank])
            dist.all_reduce(self.barrier_flag, group=self.group)  # every rank's piece is in its slot
            torch.add(slots[0], slots[1], out=piece)
            for slot in slots[2:]:
                piece.add_(slot)
        return tensor
