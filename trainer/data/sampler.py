"""Which samples each rank trains on, step by step.

`GlobalBatchSampler` draws global batches (micro_batch_size x grad_accum_steps x data-parallel size samples) from
one seeded permutation per epoch, identical on every rank, and gives each rank its contiguous share, cut into
micro-batches. It replaces `DistributedSampler` for three reasons:
- the samples of step N do not depend on the world size, so 1 process and N processes train on the same global
  batches (what makes loss-parity tests and resharding resume possible); DistributedSampler pads or drops by
  world size instead;
- a run resumes mid-epoch by skipping whole steps (`start_step`), without replaying the data;
- length grouping is part of the permutation: samples of similar length share a global batch, batch order stays
  random.
The incomplete last global batch of an epoch is dropped, as DataLoader's drop_last would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from distrain.trainer.errors import DataError


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    def __init__(
        self,
        lengths: Sequence[int],
        micro_batch_size: int,
        grad_accum_steps: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        group_by_length: bool = False,
        mega_batch_factor: int = 50,
    ):
        self.lengths = list(lengths)
        self.micro = micro_batch_size
        self.accum = grad_accum_steps
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch_factor = mega_batch_factor
        self.global_batch = micro_batch_size * grad_accum_steps * dp_size
        self.steps_per_epoch = len(self.lengths) // self.global_batch
        self.epoch = 0
        self.start_step = 0
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training set has {len(self.lengths)} samples, fewer than one global batch of "
                f"{self.global_batch} (train.micro_batch_size x train.grad_accum_steps x data-parallel processes)"
            )

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch `epoch` from its step `start_step` (to resume mid-epoch)."""
        self.epoch, self.start_step = epoch, start_step

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of an epoch, in training order; the same on every rank and world size."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.group_by_length:
            # Sort within mega-batches so each global batch holds similar lengths, then shuffle batch order.
            mega = self.global_batch * self.mega_batch_factor
            order = [
                i
                for start in range(0, len(order), mega)
                for i in sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            ]
        batches = [order[s * self.global_batch : (s + 1) * self.global_batch] for s in range(self.steps_per_epoch)]
        if self.group_by_length:
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in shuffle]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        share = self.micro * self.accum
        for batch in self.global_batches(self.epoch)[self.start_step :]:
            mine = batch[self.dp_rank * share : (self.dp_rank + 1) * share]
            for m in range(self.accum):
                yield mine[m * self.micro : (m + 1) * self.micro]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum


def eval_batches(
    lengths: Sequence[int], batch_size: int, rank: int, world_size: int, equal_counts: bool = False
) -> list[list[int]]:
    """This rank's evaluation batches: a strided shard, sorted by length so batches pad little. Predictions are
    gathered by index, so order does not matter.

    With `equal_counts` (sharded models: every rank must join every forward pass), shards with fewer batches
    repeat their last one; a repeated example predicts the same again and is counted once.
    """
    mine = sorted(range(rank, len(lengths), world_size), key=lambda i: -lengths[i])
    batches = [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]
    if equal_counts:
        most = -(-((len(lengths) + world_size - 1) // world_size) // batch_size)
        batches = batches or [[0]]
        batches += [batches[-1]] * (most - len(batches))
    return batches
