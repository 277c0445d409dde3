"""The model's forward pass as training and evaluation both run it, and the predictions of a whole split.

One function computes logits for a collated batch: autocast at the run's precision, and under tensor parallelism
the DTensor logits gathered into a plain tensor (the loss and the metrics take whole logits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor

from distrain.trainer.config.schema import Precision
from distrain.trainer.data.loaders import eval_loader
from distrain.trainer.observe.watchdog import mark
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.parallel.precision import autocast
from distrain.trainer.tasks import Task
from distrain.trainer.tasks.base import mean_loss

if TYPE_CHECKING:
    from datasets import Dataset


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_logits(
    model: torch.nn.Module, task: Task, batch: dict[str, torch.Tensor], precision: Precision, device: torch.device
) -> torch.Tensor:
    return forward_logits_and_hidden(model, task, batch, precision, device, hidden_states=False)[0]


def forward_logits_and_hidden(
    model: torch.nn.Module,
    task: Task,
    batch: dict[str, torch.Tensor],
    precision: Precision,
    device: torch.device,
    hidden_states: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The logits (whole, also from a tensor-parallel model), and with `hidden_states` those of the same pass (the
    embeddings' output, then each block's; else None)."""
    with autocast(precision, device):
        out = model(**task.model_batch(batch), **({"output_hidden_states": True} if hidden_states else {}))
    logits = out.logits.full_tensor() if isinstance(out.logits, DTensor) else out.logits
    return logits, out.hidden_states if hidden_states else None


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    task: Task,
    dataset: Dataset,
    batch_size: int,
    env: DistEnv,
    precision: Precision,
    losses: dict[int, tuple[float, int]] | None = None,
) -> dict[int, Any] | None:
    """Every example's prediction, by dataset index, on rank 0 (None on the other ranks), with autocast at
    `precision` (fp32: none). With `losses` (a task with `dev_loss`), rank 0's dict also receives each example's
    (cross-entropy sum, targets), by index like the predictions, so no example counts twice.

    Each data-parallel rank predicts its own shard. A DDP model must come unwrapped (shards may differ by a
    batch); a sharded model (FSDP, TP: `env.dims.sharded`) gets the same number of batches on every rank.
    """
    columns = list(task.loader_columns)
    loader, batches = eval_loader(dataset, task.collator(train=False), columns, batch_size, env)
    was_training = model.training
    model.eval()
    mine: dict[int, Any] = {}
    my_losses: dict[int, tuple[float, int]] = {}
    for indices, cpu_batch in zip(batches, loader, strict=True):
        mark("eval")  # progress for the hang watchdog: an evaluation can outlast its timeout
        batch = to_device(cpu_batch, env.device)
        logits = forward_logits(model, task, batch, precision, env.device)
        mine.update(zip(indices, task.predict(logits, batch), strict=True))
        if losses is not None:
            my_losses.update(zip(indices, task.example_losses(logits, batch), strict=True))
    model.train(was_training)
    gathered = env.gather_objects((mine, my_losses))
    if gathered is None:
        return None
    if losses is not None:
        losses.update({k: v for _, part in gathered for k, v in part.items()})
    return {k: v for part, _ in gathered for k, v in part.items()}


def predict_split_with_loss(
    model: torch.nn.Module, task: Task, dataset: Dataset, batch_size: int, env: DistEnv, precision: Precision
) -> tuple[dict[int, Any] | None, float | None]:
    """predict_split, and on rank 0 the split's loss for a task with `dev_loss` (else None)."""
    losses: dict[int, tuple[float, int]] | None = {} if task.dev_loss else None
    predictions = predict_split(model, task, dataset, batch_size, env, precision, losses)
    return predictions, mean_loss(losses) if losses is not None and predictions is not None else None
