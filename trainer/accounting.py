"""What a model costs: FLOPs per token, the bytes each rank holds, the device's peak, the process's peak memory.

Shared by the workers (MFU and memory records in metrics.jsonl) and by `distrain plan` (estimates before any
worker starts), so the plan and the run count the same way.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

ADAM_STATES = 2  # exp_avg and exp_avg_sq, each the size of the parameter (plus a scalar step per parameter)


def flops_per_token(model: torch.nn.Module, seq_len: float) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention scores, as in the
    PaLM paper's MFU: 6 N + 12 L H T, where N excludes embedding tables (lookups, not matmuls)."""
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    total = sum(_full_numel(p) for p in model.parameters())
    config = model.config
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    return 6 * (total - embedding) + 12 * layers * hidden * seq_len


def _full_numel(param: torch.Tensor) -> int:
    return math.prod(param.shape)  # a DTensor's shape is the global one


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


@dataclass
class HeldBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> HeldBytes:
    """What this rank holds right now (local shards only): call between backward and zero_grad."""
    params = list(model.parameters())
    optimizer_bytes = sum(
        local_bytes(value) for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    )
    return HeldBytes(
        params=sum(local_bytes(p) for p in params),
        grads=sum(local_bytes(p.grad) for p in params if p.grad is not None),
        optimizer=optimizer_bytes,
    )


def measure_peak_flops(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square fp32 GEMM on this device with this process's threads: the 'peak' for CPU MFU."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def max_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated device memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
