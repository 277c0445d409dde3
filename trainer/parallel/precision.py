"""Mixed precision: autocast for bf16/fp16 (weights and optimizer state stay fp32), loss scaling for fp16."""

from __future__ import annotations

import contextlib

import torch

from distrain.trainer.config.schema import Precision
from distrain.trainer.parallel.dims import ParallelDims

DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == Precision.fp32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A real scaler for fp16 (its range underflows small gradients); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == Precision.fp16)


def autocast_precision(dims: ParallelDims, precision: Precision) -> Precision:
    """The precision autocast should use (fp32: none): FSDP casts bf16 itself (MixedPrecisionPolicy)."""
    return Precision.fp32 if dims.fsdp_enabled and precision == Precision.bf16 else precision
