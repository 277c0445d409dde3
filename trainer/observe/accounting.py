"""What a model costs: FLOPs per token, the bytes each rank holds (measured in a run, or planned for a layout
before any worker starts), activations, the device's peak, the process's peak memory.

Shared by the workers (MFU and memory records in metrics.jsonl) and by `distrain plan`, so the plan and the run
count the same way (the tests compare the two).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

from distrain.trainer.optim.registry import spec as optimizer_spec
from distrain.trainer.parallel.apply import tp_plan
from distrain.trainer.parallel.dims import ParallelDims

log = logging.getLogger(__name__)
FP32 = 4


def flops_per_token(model: torch.nn.Module, seq_len: float) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's MFU: per matmul weight 2 forward,
    2 for the gradient of its input and 2 for its own gradient when it is trained, plus attention scores: 6 N +
    12 L H T for a full fine-tune, 4 N + 2 N_trained + 12 L H T with frozen base weights (LoRA). N excludes
    embedding tables (lookups, not matmuls)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    weights = [p for p in model.parameters() if id(p) not in embeddings]
    matmul = sum(_full_numel(p) for p in weights)
    trained = sum(_full_numel(p) for p in weights if p.requires_grad)
    config = model.config
    layers = getattr(config, "num_hidden_layers", 0)
    hidden = getattr(config, "hidden_size", 0)
    return 4 * matmul + 2 * trained + 12 * layers * hidden * seq_len


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


def chunk(size: int, parts: int) -> int:
    """Rank 0's share of a dimension split with torch.chunk (as DTensor and FSDP2 split)."""
    return math.ceil(size / parts)


def rank0_param_shapes(model: torch.nn.Module, dims: ParallelDims) -> list[list[int]]:
    """Each parameter tensor's shape on rank 0 under this layout."""
    plan = tp_plan(model) if dims.tp_enabled else {}
    shapes = []
    for name, param in model.named_parameters():
        shape = list(param.shape)
        module, _, kind = name.rpartition(".")
        style = plan.get(module)
        if style in ("colwise", "colwise_replicated"):
            shape[0] = chunk(shape[0], dims.tp)
        elif style == "rowwise" and kind == "weight":
            shape[1] = chunk(shape[1], dims.tp)
        if dims.fsdp_enabled:
            shape[0] = chunk(shape[0], dims.dp)
        shapes.append(shape)
    return shapes


def planned_bytes(model: torch.nn.Module, dims: ParallelDims, optim: DictConfig) -> HeldBytes:
    """What rank 0 will hold under this layout (fp32 weights; fp32 gradients and the optimizer's state per
    trainable tensor): the figures `held_bytes` measures in the run, computed from shapes (a meta model does)."""
    shapes = rank0_param_shapes(model, dims)
    # Gradients and optimizer state exist for trainable parameters only (adapter=lora: the adapters).
    trained = [s for s, p in zip(shapes, model.parameters(), strict=True) if p.requires_grad]
    state_bytes = optimizer_spec(optim.name).state_bytes
    return HeldBytes(
        params=sum(math.prod(s) for s in shapes) * FP32,
        grads=sum(math.prod(s) for s in trained) * FP32,
        optimizer=sum(state_bytes(s, optim) for s in trained),
    )


def activation_bytes(
    config: Any, micro_batch: int, seq_len: int, tp: int, checkpointing: bool, vocab_logits: bool,
    precision: str = "fp32",
) -> int:  # fmt: skip
    """An estimate of one micro-batch's activations (Korthikanti et al. 2022, for 16-bit ones, as bf16 and fp16
    runs keep them; scaled to 4-byte floats for fp32), plus the fp32 logits over the vocabulary for language
    models."""
    c, s, b = config, seq_len, micro_batch
    h, a, layers = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    if checkpointing:
        per_layer = 2 * s * b * h  # only each block's input is kept (16-bit count)
    else:
        per_layer = s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
    logits = b * s * getattr(c, "vocab_size", 0) * FP32 if vocab_logits else 0
    element = 2 if precision in ("bf16", "fp16") else FP32
    return int(per_layer * layers * element / 2 + logits)


def measure_peak_flops(
    device: torch.device, size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of a square GEMM of `dtype` (the run's: precision=bf16 runs its matmuls in bf16, which CPUs with
    AVX512-BF16 or AMX do several times faster than fp32) on this device with this process's threads: the 'peak' for
    CPU MFU. The fastest of a few timed runs after a warm-up (a peak, and ~0.2 s on one CPU core: every run pays
    it at start)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    fastest = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fastest = min(fastest, time.perf_counter() - started)
    return 2 * size**3 / fastest


def max_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated device memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
