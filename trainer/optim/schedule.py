"""The learning-rate schedule: linear, cosine or constant after a linear warmup (transformers' schedulers)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import get_scheduler


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: DictConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[optim.schedule.value]
    warmup = int(optim.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
