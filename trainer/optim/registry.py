"""The optimizers distrain trains with, by `optim.name`: how each is built (weight-decay groups, the fastest
correct kernel for the layout) and what state it keeps per parameter, which `distrain plan` counts.

Restoring a checkpoint restores the optimizer's state (moments, step counts), never its settings: hyper-parameters
are this run's config (a rewind with a lower `optim.lr` trains at it) and `fused` / `foreach` are decided by the
layout the optimizer runs in (`group_settings` before the load, `restore_group_settings` after)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

KERNEL_KEYS = ("fused", "foreach", "capturable", "differentiable")
FP32 = 4


# The keys every optimizer reads (the schedule and clipping act on any optimizer's lr and gradients).
COMMON_KEYS = ("name", "lr", "weight_decay", "warmup_ratio", "schedule", "max_grad_norm")


@dataclass(frozen=True)
class OptimizerSpec:
    build: Callable[[list[dict[str, Any]], DictConfig, dict[str, Any]], torch.optim.Optimizer]
    keys: tuple[str, ...]  # the optim.* keys it reads besides COMMON_KEYS; setting another one is a config error
    # bytes of state it keeps for one parameter of this (rank-local) shape under these settings
    state_bytes: Callable[[list[int], DictConfig], int]
    fused: bool  # torch has a fused kernel for plain (non-DTensor) parameters on this device type
    sharded: bool = True  # it can step DTensor parameters (fsdp, tp)


def _tensors(count: int, step: bool = True) -> Callable[[list[int], DictConfig], int]:
    """`count` fp32 tensors of the parameter's shape, plus the fp32 step-counter tensor when `step`."""
    return lambda shape, optim: FP32 * (count * math.prod(shape) + step)


def _sgd_bytes(shape: list[int], optim: DictConfig) -> int:
    return FP32 * math.prod(shape) if optim.momentum else 0  # the momentum buffer; plain SGD keeps nothing


def _rmsprop_bytes(shape: list[int], optim: DictConfig) -> int:
    return FP32 * ((1 + bool(optim.momentum)) * math.prod(shape) + 1)  # square average (+ momentum) and step


def _adafactor_bytes(shape: list[int], optim: DictConfig) -> int:
    # A matrix keeps factored second moments: one value per row and one per column (row_var [..., r, 1], col_var
    # [..., 1, c]); a vector keeps a whole one. Plus the step.
    if len(shape) < 2:
        return FP32 * (math.prod(shape) + 1)
    lead = math.prod(shape[:-2])
    return FP32 * (lead * (shape[-2] + shape[-1]) + 1)


def _adamw(groups: list[dict[str, Any]], optim: DictConfig, kernel: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **kernel)


def _sgd(groups: list[dict[str, Any]], optim: DictConfig, kernel: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, **kernel)


def _adagrad(groups: list[dict[str, Any]], optim: DictConfig, kernel: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(groups, lr=optim.lr, eps=optim.eps, **kernel)


def _rmsprop(groups: list[dict[str, Any]], optim: DictConfig, kernel: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=optim.lr, alpha=optim.alpha, eps=optim.eps, momentum=optim.momentum,
                               **kernel)  # fmt: skip


def _adafactor(groups: list[dict[str, Any]], optim: DictConfig, kernel: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(groups, lr=optim.lr, beta2_decay=optim.beta2_decay, d=optim.clip_threshold, **kernel)


# Fused kernels: torch 2.13 has CPU ones for AdamW, SGD and Adagrad; RMSprop and Adafactor have foreach at best.
# Weight decay: AdamW and Adafactor decay decoupled from the gradient; SGD, Adagrad and RMSprop add
# weight_decay * w to it (L2), as torch.optim defines them.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(build=_adamw, keys=("betas", "eps"), state_bytes=_tensors(2), fused=True),
    "sgd": OptimizerSpec(build=_sgd, keys=("momentum", "nesterov"), state_bytes=_sgd_bytes, fused=True),
    "adagrad": OptimizerSpec(build=_adagrad, keys=("eps",), state_bytes=_tensors(1), fused=True),
    "rmsprop": OptimizerSpec(
        build=_rmsprop, keys=("alpha", "eps", "momentum"), state_bytes=_rmsprop_bytes, fused=False
    ),  # fmt: skip
    # torch's Adafactor reduces a gradient over rows and columns in place, which DTensor shards cannot do.
    "adafactor": OptimizerSpec(
        build=_adafactor,
        keys=("beta2_decay", "clip_threshold"),
        state_bytes=_adafactor_bytes,
        fused=False,
        sharded=False,
    ),  # fmt: skip
}


def spec(name: Any) -> OptimizerSpec:
    return OPTIMIZERS[getattr(name, "value", name)]


def unused_keys(optim: DictConfig, defaults: DictConfig) -> list[str]:
    """The optim.* keys set to something other than their default that the chosen optimizer does not read."""
    used = set(COMMON_KEYS) | set(spec(optim.name).keys)
    return [key for key in optim if key not in used and optim[key] != defaults[key]]


def layout_problems(optim: DictConfig, sharded: bool) -> list[str]:
    """Why this optimizer cannot run in a layout whose parameters are DTensors (`sharded`: fsdp, tp)."""
    if sharded and not spec(optim.name).sharded:
        return [f"optim.name: {optim.name} cannot step sharded (DTensor) parameters in torch (it reduces each "
                "gradient over rows and columns in place); use parallel=single or parallel=ddp"]  # fmt: skip
    return []


def build_optimizer(model: torch.nn.Module, optim: DictConfig) -> torch.optim.Optimizer:
    # Biases and normalization weights are vectors; decaying them toward 0 only hurts (as in BERT's recipe).
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    chosen = spec(optim.name)
    return chosen.build(groups, optim, _kernel(decay + no_decay, chosen))


def _kernel(params: list[torch.nn.Parameter], chosen: OptimizerSpec) -> dict[str, Any]:
    # Plain parameters (single process, DDP) take the fused kernel where there is one (Hugging Face Trainer's
    # default too): one pass per parameter; on CPU, 15 ms of CPU a step for MiniLM against 96 ms for the
    # multi-tensor (foreach) one and its temporaries, with the same losses. DTensor parameters (FSDP, TP) keep
    # torch's default. Tensor parallelism leaves some parameters plain beside DTensors, which no multi-tensor
    # kernel can mix: such a model takes the per-parameter implementation.
    kinds = {isinstance(p, DTensor) for p in params}
    if kinds == {False} and chosen.fused:
        return {"fused": True}
    return {"foreach": False if len(kinds) > 1 else None}


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's settings as this config and layout built them: hyper-parameters and kernels, without
    its parameters and its current lr (the schedule's position sets that)."""
    return [{key: value for key, value in group.items() if key not in ("params", "lr")}
            for group in optimizer.param_groups]  # fmt: skip


def restore_group_settings(optimizer: torch.optim.Optimizer, settings: list[dict[str, Any]]) -> list[str]:
    """Put back this run's settings after a load brought the saver's (a fused kernel saved by one process cannot
    step the DTensors of a tensor-parallel resume; a rewind may lower the lr). Returns the hyper-parameters that
    differed, as "key saved -> now"."""
    changed: dict[str, str] = {}
    for group, built in zip(optimizer.param_groups, settings, strict=True):
        for key, value in built.items():
            saved = group.get(key)
            if key not in KERNEL_KEYS and _plain(saved) != _plain(value):
                name = "lr" if key == "initial_lr" else key  # the schedule's base lr
                changed.setdefault(name, f"{name} {_plain(saved)} -> {_plain(value)}")
        group.update(built)
    return list(changed.values())


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # a loaded state may hold betas as a list
