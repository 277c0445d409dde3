"""The learning-rate schedule: linear, cosine or constant after a linear warmup (transformers' schedulers)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from transformers import get_scheduler


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: DictConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[optim.schedule.value]
    warmup = int(optim.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class ScheduleState:
    """The scheduler as a checkpoint part: a resume takes the schedule's position (its step) from the checkpoint
    and its base lrs from this run's optimizer, i.e. its config, so that a rewind with another `optim.lr` trains
    at that lr on the same schedule (torch's `load_state_dict` would bring back the saver's base lrs)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scheduler = self.scheduler
        scheduler.load_state_dict(state["scheduler"])
        # The checkpoint manager has put back this config's settings, the base lr (initial_lr) among them.
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = [group["initial_lr"] for group in groups]
        lrs = [base * schedule(scheduler.last_epoch) for base, schedule in
               zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]  # fmt: skip
        for group, lr in zip(groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() returns
