"""How the model is spread over processes: one function per strategy, picked by `parallel.name`."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from distrain.trainer.config import Strategy
from distrain.trainer.distributed import DistEnv


def apply_ddp(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    # The encoders' buffers (position ids) never change: syncing them before every forward is waste.
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def parallelize(model: torch.nn.Module, strategy: Strategy, env: DistEnv) -> torch.nn.Module:
    if strategy == Strategy.ddp:
        return apply_ddp(model, env)
    return model


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (gradient accumulation)."""
    if not sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model, for forward passes that must not trigger collectives (evaluation on uneven shards)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
