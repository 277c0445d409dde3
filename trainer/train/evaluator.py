"""Dev (and test) evaluation during training, the best dev metric so far, and early stopping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer.model.forward import predict_split_with_loss
from distrain.trainer.observe.watchdog import mark
from distrain.trainer.parallel.apply import unwrap
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.parallel.precision import autocast_precision
from distrain.trainer.tasks import Task, TaskData


class Evaluator:
    def __init__(self, cfg: DictConfig, env: DistEnv, task: Task, data: TaskData, model: torch.nn.Module,
                 report: Callable[[dict[str, Any]], None], say: Callable[[str], None]):  # fmt: skip
        self.env, self.task, self.data, self.model = env, task, data, model
        self.metric = cfg.task.metric
        self.patience = cfg.train.early_stopping_patience
        self.batch_size = cfg.train.eval_batch_size or 2 * cfg.train.micro_batch_size
        self.precision = autocast_precision(env.dims, cfg.precision.name)
        self.report, self.say = report, say
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0

    def evaluate(self, split: str, step: int) -> dict[str, float]:
        """The task's metrics on a split, the same on every rank, recorded as an eval record of `step`."""
        mark("eval")
        dataset = self.data.splits[split]
        # DDP: the bare module (shards may differ by a batch; DDP's forward could wait on a collective).
        # FSDP/TP: the sharded model itself, with the same number of batches on every rank.
        merged, loss = predict_split_with_loss(unwrap(self.model), self.task, dataset, self.batch_size, self.env,
                                               self.precision)  # fmt: skip
        metrics = self.task.metrics(merged, dataset) if merged is not None else None
        if loss is not None:
            metrics["loss"] = loss
        metrics = self.env.broadcast_object(metrics)
        self.report({"kind": "eval", "split": split, "step": step, **metrics})
        return metrics

    def judge(self, metrics: dict[str, float], step: int) -> tuple[bool, bool]:
        """(new best?, stop now?) after a dev evaluation — the same on every rank, since the metrics were
        broadcast."""
        value = metrics[self.metric]
        improved = self.task.is_better(self.metric, value, than=self.best_metric)
        if improved:
            self.best_metric, self.best_step = value, step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        stop = self.env.any(self.patience > 0 and self.evals_without_improvement >= self.patience)
        if stop:
            self.say(f"early stopping: no better dev {self.metric} for {self.patience} evaluations")
        return improved, stop

    @property
    def patience_ran_out(self) -> bool:
        """Early stopping stopped the run (restored from its checkpoint): it stays stopped."""
        return self.patience > 0 and self.evals_without_improvement >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best_metric": self.best_metric, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
