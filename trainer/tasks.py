"""What a task supplies to the one shared loop: its data, model head, collation, loss and metrics.

The loop (trainer/loop.py) never branches on the task; a new task is a new `Task` subclass registered in
`TASKS`, not a copy of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from omegaconf import DictConfig

from distrain.trainer.distributed import DistEnv
from distrain.trainer.model import label_head


@dataclass
class TaskData:
    """Tokenized splits (each with a `length` column) and the label names of the model head."""

    splits: dict[str, Dataset]
    labels: list[str]


class Task:
    name: str = ""
    pipeline_task: str = ""  # the transformers.pipeline task that loads this task's export
    model_inputs: tuple[str, ...] = ("input_ids", "attention_mask")

    def __init__(self, cfg: DictConfig, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer

    def prepare(self, env: DistEnv) -> TaskData:
        raise NotImplementedError

    def auto_model_class(self) -> type:
        raise NotImplementedError

    def head(self, data: TaskData) -> dict[str, Any]:
        """Config fields of the model's task head; by default a classifier over the data's labels."""
        return label_head(data.labels)

    def collator(self) -> Any:
        raise NotImplementedError

    def loss_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum (not mean) of the per-target losses: the loop divides by the global number of targets."""
        raise NotImplementedError

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[Any]:
        """One picklable prediction per example of the batch (gathered across ranks by example index)."""
        raise NotImplementedError

    def metrics(self, predictions: dict[int, Any], dataset: Dataset) -> dict[str, float]:
        raise NotImplementedError

    def report(self, predictions: dict[int, Any], dataset: Dataset) -> dict[str, Any]:
        """Detailed report for `distrain eval`: metrics plus per-class rows."""
        raise NotImplementedError

    def write_predictions(self, predictions: dict[int, Any], dataset: Dataset, path: str) -> None:
        raise NotImplementedError


def build_task(cfg: DictConfig, tokenizer: Any) -> Task:
    from distrain.trainer.ner import NerTask

    tasks = {"ner": NerTask}
    return tasks[cfg.task.name](cfg, tokenizer)
