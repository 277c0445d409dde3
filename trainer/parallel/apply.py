"""How the model is spread over processes: one `apply_<strategy>` each, composed in one order (`parallelize`):

    tensor parallel -> activation checkpointing -> compile -> FSDP or DDP

Tensor parallelism first, because it rewrites the Linear weights into DTensors that FSDP then shards over the
other mesh dimension; activation checkpointing and compile next, so that they wrap the TP'd blocks; data
parallelism (FSDP or DDP) last, outermost, so that its gradient reduction sees the final parameters.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch.distributed.tensor import Replicate
from torch.nn.parallel import DistributedDataParallel

from distrain.trainer.config.schema import Precision
from distrain.trainer.errors import ConfigError, Diverged
from distrain.trainer.model.families import FAMILIES
from distrain.trainer.parallel.comm import row_sparse_embedding
from distrain.trainer.parallel.dims import ParallelDims
from distrain.trainer.parallel.distributed import DistEnv

log = logging.getLogger(__name__)


# --- tensor parallel ---------------------------------------------------------------------------------------------
def transformer_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The repeated blocks (BertLayer, LlamaDecoderLayer, ...): the modules of a ModuleList whose class
    transformers lists in _no_split_modules (which also names non-repeated ones, like BertEmbeddings); a class or
    its base, as fully_shard makes each sharded block an FSDPBertLayer subclass."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [
        (f"{parent}.{child}", module)
        for parent, container in model.named_modules()
        if isinstance(container, torch.nn.ModuleList)
        for child, module in container.named_children()
        if any(cls.__name__ in names for cls in type(module).__mro__)
    ]
    if not blocks:
        raise ConfigError([f"parallel.name: cannot find the transformer blocks of {type(model).__name__}"])
    return blocks


def tp_plan(model: torch.nn.Module) -> dict[str, str]:
    """Module name -> "colwise" | "rowwise" for the whole model."""
    model_type = model.config.model_type
    plan = {}
    family = FAMILIES.get(model_type)
    if family is not None and family.tp_layer_plan:
        layer_plan = family.tp_layer_plan
        for block_name, _ in transformer_blocks(model):
            plan.update({f"{block_name}.{sub}": style for sub, style in layer_plan.items()})
    else:
        # The model's own plan (transformers ships base_model_tp_plan for many decoders): "layers.*.x" patterns.
        base = getattr(model.config, "base_model_tp_plan", None) or {}
        prefix = model.base_model_prefix
        names = {n for n, _ in model.named_modules()}
        import fnmatch

        for pattern, style in base.items():
            if style not in ("colwise", "rowwise"):
                continue
            for name in names:
                if fnmatch.fnmatch(name, f"{prefix}.{pattern}") or fnmatch.fnmatch(name, pattern):
                    plan[name] = style
        if not plan:
            raise ConfigError([f"parallel.name: no tensor-parallel plan for model type {model_type!r}"])
    tied = getattr(model.config, "tie_word_embeddings", False)
    if model_type == "llama" and hasattr(model, "lm_head") and not tied:
        plan["lm_head"] = "colwise_replicated"  # vocab split over ranks, logits gathered for the loss
    return plan


def apply_tp(model: torch.nn.Module, tp_mesh: Any) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "colwise_replicated": lambda: ColwiseParallel(output_layouts=Replicate()),
    }
    plan = {name: styles[style]() for name, style in tp_plan(model).items()}
    return parallelize_module(model, tp_mesh, plan)


# --- activation checkpointing, compile ------------------------------------------------------------------------
def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    # transformers' own switch: blocks recompute their forward in backward. Unlike wrapping blocks, it keeps
    # parameter names unchanged, so checkpoints load with it on or off.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_compile(model: torch.nn.Module) -> None:
    for _, block in transformer_blocks(model):
        block.compile()  # in place: parameter names unchanged


# --- data parallel ---------------------------------------------------------------------------------------------
REDUCE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # parallel.comm_hook -> FSDP's reduce dtype


def fsdp_dtypes(parallel: DictConfig, precision: Precision) -> tuple[torch.dtype | None, torch.dtype]:
    """(the dtype FSDP gathers parameters and computes in, None = theirs (fp32); the dtype it reduce-scatters
    gradients in). Parameters: bf16 under precision=bf16 (FSDP casts them itself, autocast stays off). Gradients:
    fp32 unless parallel.comm_hook=fp16|bf16 asks for half the bytes. Either way FSDP casts each reduced shard back
    to the parameter's dtype, so sharded gradients, master weights and optimizer state stay fp32 (torch's
    _fsdp_collectives.foreach_reduce: `_to_dtype_if_needed(reduce_output, orig_dtype)`)."""
    param_dtype = torch.bfloat16 if precision == Precision.bf16 else None
    return param_dtype, REDUCE_DTYPES.get(str(parallel.comm_hook), torch.float32)


def apply_fsdp(model: torch.nn.Module, dp_mesh: Any, parallel: DictConfig, precision: Precision) -> torch.nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"mesh": dp_mesh, "reshard_after_forward": parallel.reshard_after_forward}
    param_dtype, reduce_dtype = fsdp_dtypes(parallel, precision)
    if param_dtype is not None or reduce_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if parallel.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for _, block in transformer_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def apply_ddp(model: torch.nn.Module, device: torch.device, parallel: DictConfig) -> torch.nn.Module:
    sparse = row_sparse_embedding(model, parallel)
    if sparse is not None:  # reduced by GradientComm.reduce_embedding_rows; DDP would broadcast it at start
        model._ddp_params_and_buffers_to_ignore = [sparse]  # what DDP's constructor reads
        model.get_input_embeddings().sparse = True  # its backward gives the touched rows (parallel/comm.py)
        torch.distributed.broadcast(model.get_parameter(sparse).data, src=0)
    # The encoders' buffers (position ids) never change: syncing them before every forward is waste. Gradients are
    # views into DDP's buckets: the reduced bucket is the gradient, without a copy back (parallel/grads.py says
    # why the norm must not depend on where in a bucket a gradient lies).
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, forward_sync_buffers=False, gradient_as_bucket_view=True
    )


def parallelize(
    model: torch.nn.Module, dims: ParallelDims, mesh: Any, cfg: DictConfig, device: torch.device
) -> torch.nn.Module:
    """Apply the run's strategy in the documented order; return the model the loop trains."""
    if dims.tp_enabled:
        model = apply_tp(model, mesh["tp"])
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    if dims.fsdp_enabled:
        return apply_fsdp(model, mesh["dp"], cfg.parallel, cfg.precision.name)
    if dims.ddp_enabled:
        return apply_ddp(model, device, cfg.parallel)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model without DDP's wrapper (FSDP and TP modify the model in place and need every rank to join)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def check_weights_finite(model: torch.nn.Module, env: DistEnv, step: int, what: str) -> None:
    """A checkpoint or export of non-finite weights is never written (every rank checks its shards)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in unwrap(model).parameters())
    if env.any(not all(bool(torch.isfinite(t).all()) for t in local)):
        raise Diverged(f"the weights after step {step} are not finite: no {what} written")
