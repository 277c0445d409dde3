"""Gradients across layouts: skipping the reduction on accumulation micro-batches, and the global gradient norm."""

from __future__ import annotations

import contextlib
import math

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on all but the last micro-batch of a step (gradient accumulation)."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def sum_of_squares(tensor: torch.Tensor) -> torch.Tensor:
    """The squared 2-norm in one pass without a temporary (pow(2).sum() makes one: 3x slower on CPU), with torch's
    norm kernel, as torch's clip_grad_norm_ computes it: 6e-6 relative to float64 on MiniLM's gradients, more on a
    single dense table of millions of values (9e-4 on 11.7M), where fp32 accumulation drifts; harmless for
    clipping. Not BLAS's torch.dot (2e-6 here): it rounds differently with the data's address (3 results over 16
    offsets of one gradient), and DDP's gradients are views into its buckets, whose layout differs on the first
    step after a restart, so a resumed run's norm, clipping and weights drifted from the uninterrupted run's."""
    return torch.linalg.vector_norm(tensor.float()).square()


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float | None,
                   rows: dict[torch.nn.Parameter, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """The global gradient norm (as if the model were whole), clipping to max_norm when given. `rows`: for
    parameters whose gradient is zero outside some rows (GradientComm.rows: the word embedding's), only those are
    scaled (zeros stay zeros; the norm still sums every element, in the order of a dense gradient).

    Under FSDP/TP gradients are DTensors, some sharded, some replicated, next to plain tensors (parameters
    TP leaves alone); torch's clip_grad_norm_ cannot mix those, so shards' squared sums are all-reduced over the
    mesh dimensions they are split on.
    """
    total = None
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            square = sum_of_squares(grad.to_local())
            for dim, placement in enumerate(grad.placements):
                if placement.is_shard():
                    torch.distributed.all_reduce(square, group=grad.device_mesh.get_group(dim))
        else:
            square = sum_of_squares(grad)
        total = square if total is None else total + square
    norm = torch.zeros(()) if total is None else total.sqrt()
    if max_norm is not None and math.isfinite(max_norm):
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        rows = rows or {}
        for param in parameters:
            if param in rows:
                param.grad.index_copy_(0, rows[param], param.grad.index_select(0, rows[param]).mul_(coefficient))
            elif param.grad is not None:
                param.grad.mul_(coefficient.to(param.grad.device))
    return norm
