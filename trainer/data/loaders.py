"""The DataLoaders that feed the loop and evaluation, over the batches the sampler chooses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from distrain.trainer.data.sampler import GlobalBatchSampler, eval_batches
from distrain.trainer.parallel.distributed import DistEnv

if TYPE_CHECKING:
    from datasets import Dataset


def train_loader(
    dataset: Dataset, collate: Any, columns: list[str], sampler: GlobalBatchSampler, num_workers: int
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset.with_format(columns=columns),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
    )


def eval_loader(
    dataset: Dataset, collate: Any, columns: list[str], batch_size: int, env: DistEnv
) -> tuple[torch.utils.data.DataLoader, list[list[int]]]:
    """This rank's evaluation loader and the dataset indices of each of its batches (shards by data-parallel
    rank: the ranks of a tensor-parallel group evaluate the same examples together). A sharded model needs every
    rank in every forward pass, so then every rank gets the same number of batches."""
    batches = eval_batches(dataset["length"], batch_size, env.dp_rank, env.dp_size, equal_counts=env.dims.sharded)
    loader = torch.utils.data.DataLoader(
        dataset.with_format(columns=columns), batch_sampler=batches, collate_fn=collate
    )
    return loader, batches
