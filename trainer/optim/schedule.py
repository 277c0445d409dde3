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
    at that lr on the same schedule (torch's `load_state_dict` would bring back the saver's base lrs). A run
    extended (or shortened) by `train.max_steps` or `train.epochs` follows the schedule of its new length: its
    `notice` names the lr that changes with it, for the resume to print."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int):
        self.scheduler, self.total_steps = scheduler, total_steps
        self.notice: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}  # the run's length: the trainer's total_steps entry

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scheduler = self.scheduler
        scheduler.load_state_dict(state["scheduler"])
        saved_lrs = list(scheduler._last_lr)  # the saver's lr for the next step, on the saver's schedule
        # The checkpoint manager has put back this config's settings, the base lr (initial_lr) among them.
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = [group["initial_lr"] for group in groups]
        lrs = [base * schedule(scheduler.last_epoch) for base, schedule in
               zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]  # fmt: skip
        for group, lr in zip(groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() returns
        saved_steps = state.get("total_steps")
        if saved_steps is not None and saved_steps != self.total_steps:
            self.notice = (
                f"the learning-rate schedule spans {self.total_steps} steps now, the checkpoint's "
                f"{saved_steps} (train.max_steps or train.epochs changed): the lr of step "
                f"{scheduler.last_epoch + 1} is {lrs[0]:.4g} on it, {saved_lrs[0]:.4g} on the checkpoint's"
            )
