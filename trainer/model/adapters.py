"""LoRA adapters (adapter=lora) on a frozen base model, with peft.

The adapters are added right after the model is built, before any parallelism: DDP then reduces only their
gradients (it skips frozen parameters), FSDP2 shards frozen and trainable parameters in the same units (it reduces
gradients only for parameters that have them), and the optimizer is built over trainable parameters only.

A checkpoint holds the trainable parameters and their optimizer state only. The frozen base is rebuilt from its
source (`model.name_or_path` + `model.revision`, or the architecture and seed of a random-init model); its
fingerprint (SHA-256 over every tensor, by name) is recorded in each checkpoint and adapter export, and checked when
they are loaded, so an adapter never silently lands on other base weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from distrain.trainer.config.schema import AdapterName
from distrain.trainer.errors import ConfigError, UserError
from distrain.trainer.model.families import FAMILIES

if TYPE_CHECKING:
    from distrain.trainer.parallel.dims import ParallelDims

log = logging.getLogger(__name__)
BASE_FILE = "base_model.json"  # in an adapter folder: the base's source, revision and fingerprint
ADAPTER_DIR = "adapter"  # inside export/ when the merged model is exported beside it

LORA_FAMILIES = [name for name, family in FAMILIES.items() if family.lora_targets]
HEADS = ("classifier", "score")  # a task head new to the base: trained whole and saved with the adapter


@dataclass
class AdapterRun:
    """What the loop needs of an adapter run besides the model: the base's record (checked on resume, written
    into checkpoints and the adapter export) and a builder of a fresh, unsharded base + adapters on the CPU (the
    export fills it with the trained weights, then merges)."""

    base: dict[str, Any]
    rebuild: Callable[[], torch.nn.Module]


class BaseModelMismatch(UserError):
    """The base model's weights differ from the ones an adapter was trained on."""


def enabled(cfg: DictConfig) -> bool:
    return cfg.adapter.name == AdapterName.lora


def layout_problems(cfg: DictConfig, dims: ParallelDims) -> list[str]:
    """Adapters and the layout: tensor parallelism is refused (validation and `distrain plan` ask here)."""
    if not enabled(cfg) or not dims.tp_enabled:
        return []
    return [
        f"adapter.name: lora is not supported with parallel={dims.strategy.value}: the tensor-parallel plan shards "
        "the base Linear layers, not the LoRA matrices peft wraps around them (their outputs would not match). Use "
        "parallel=ddp or parallel=fsdp (FSDP shards the frozen base as well)"
    ]


def target_modules(adapter: DictConfig, model_type: str) -> list[str] | None:
    """The configured targets, else the family's attention and MLP projections (None: no default known)."""
    if adapter.target_modules is not None:
        return list(adapter.target_modules)
    family = FAMILIES.get(model_type)
    return list(family.lora_targets) if family and family.lora_targets else None


def no_default_targets(model_type: str) -> str:
    return (
        f"adapter.target_modules: no default for model type {model_type!r} (known: {', '.join(LORA_FAMILIES)}):"
        " expected a list of the Linear modules to adapt, e.g. adapter.target_modules=[q_proj,v_proj]"
    )


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and persistent buffer, by name: the identity of the base's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_record(cfg: DictConfig, source: str | None, model: torch.nn.Module) -> dict[str, Any]:
    """What rebuilds the frozen base, and its fingerprint (call before the adapters are added)."""
    record = {"source": source, "revision": cfg.model.revision, "sha256": fingerprint(model)}
    if source is None:
        record["architecture"] = OmegaConf.to_container(cfg.model.architecture)
        record["seed"] = cfg.train.seed
    return record


def check_base(recorded: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    if recorded is None or recorded["sha256"] == current["sha256"]:
        return
    raise BaseModelMismatch(
        f"{where} was trained on a base model with weights SHA-256 {recorded['sha256'][:16]}... "
        f"(source {recorded['source']!r}, revision {recorded['revision']!r}); the base built now "
        f"(source {current['source']!r}, revision {current['revision']!r}) has {current['sha256'][:16]}... . "
        "Point model.name_or_path / model.revision at the original base, or start a new run (another run.dir)"
    )


def apply_lora(model: torch.nn.Module, adapter: DictConfig) -> torch.nn.Module:
    """The model with LoRA adapters on its target modules; only the adapters (and a new task head) train."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules(adapter, model.config.model_type)
    if targets is None:
        raise ConfigError([no_default_targets(model.config.model_type)])
    heads = [name for name in HEADS if isinstance(getattr(model, name, None), torch.nn.Module)]
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        modules_to_save=heads or None,
    )
    return get_peft_model(model, config)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (global shapes: the same under every strategy)."""
    total = trainable = 0
    for param in model.parameters():
        count = param.shape.numel()
        total += count
        trainable += count if param.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total}


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict; a key it lacks must name a parameter tied to one it has (tied embeddings)."""
    result = model.load_state_dict(state, strict=False)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(tensors[name]) for name in state if name in tensors}
    untied = [name for name in result.missing_keys if id(tensors.get(name)) not in loaded]
    if untied or result.unexpected_keys:
        unexpected = result.unexpected_keys[:5]
        raise RuntimeError(f"export: the trained state does not fit the model: missing {untied[:5]}, "
                           f"unexpected {unexpected}")  # fmt: skip


def save_adapter(model: torch.nn.Module, folder: Path, base: dict[str, Any]) -> None:
    """The peft adapter folder of `model` (adapter_config.json + adapter_model.safetensors), and the base's record."""
    model.save_pretrained(folder)
    (folder / BASE_FILE).write_text(json.dumps(base, indent=1))


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The base with the adapters folded into its weights: a plain transformers model (modifies `model`)."""
    return model.merge_and_unload()


def load_adapter(base: torch.nn.Module, folder: Path, current: dict[str, Any]) -> torch.nn.Module:
    """Base + the adapter folder, checking that the base is the one the adapter was trained on."""
    from peft import PeftModel

    recorded_file = folder / BASE_FILE
    recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else None
    check_base(recorded, current, f"the adapter {folder}")
    return PeftModel.from_pretrained(base, folder)
