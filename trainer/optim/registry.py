"""The optimizers distrain trains with, by `optim.name`: how each is built (weight-decay groups, the fastest
correct kernel for the layout) and what state it keeps per parameter, which `distrain plan` counts.

Restoring a checkpoint restores hyper-parameters, never kernel choices: `fused` / `foreach` are decided by the
layout the optimizer runs in (`kernel_choices` before the load, `restore_kernel_choices` after)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

KERNEL_KEYS = ("fused", "foreach", "capturable", "differentiable")


@dataclass(frozen=True)
class OptimizerSpec:
    build: Callable[[list[dict[str, Any]], DictConfig, dict[str, Any]], torch.optim.Optimizer]
    state_tensors: int  # tensors of the parameter's size kept per parameter (e.g. AdamW's two moments)
    step_bytes: int  # bytes of per-parameter scalar state (AdamW's step counter, an fp32 tensor)
    fused: bool  # torch has a fused kernel for plain (non-DTensor) parameters on this device type


def _adamw(groups: list[dict[str, Any]], optim: DictConfig, kernel: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **kernel)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(build=_adamw, state_tensors=2, step_bytes=4, fused=True),
}


def spec(name: Any) -> OptimizerSpec:
    return OPTIMIZERS[getattr(name, "value", name)]


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


def kernel_choices(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's kernel settings, as built for this layout."""
    return [{key: group[key] for key in KERNEL_KEYS if key in group} for group in optimizer.param_groups]


def restore_kernel_choices(optimizer: torch.optim.Optimizer, choices: list[dict[str, Any]]) -> None:
    """Put back the kernels this layout can use after a load that brought the saver's (a fused kernel saved by
    one process cannot step the DTensors of a tensor-parallel resume)."""
    for group, chosen in zip(optimizer.param_groups, choices, strict=True):
        group.update(chosen)
