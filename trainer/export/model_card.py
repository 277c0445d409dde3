"""The model card (README.md) of every export, in the Hugging Face format: YAML front matter (base_model,
pipeline_tag, tags, library_name, datasets), then the task, the data, the dev metrics of the exported weights, the
adapter settings (when an adapter is used), how to use it (the task's own advice), the resolved config and the
distrain version; so `huggingface-cli upload <repo> <run>/export` publishes a documented model."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from distrain.trainer.config.paths import is_local


def distrain_version() -> str:
    try:
        return importlib.metadata.version("distrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _data_lines(data: DictConfig) -> list[str]:
    where = f"the Hub dataset `{data.hub_name}`" if data.dir is None else f"`{data.dir}` ({data.format})"
    lines = [f"- source: {where}, files {dict(data.files) if data.dir is not None else dict(data.hub_splits)}"]
    if data.streaming:
        lines.append(f"- streamed (shuffle buffer of {data.shuffle_buffer} samples), no cache")
    for source in data.mixture:
        origin = f"Hub `{source.hub_name}`" if source.dir is None else f"`{source.dir}/{source.files}`"
        lines.append(f"- mixture source `{source.name}`: weight {source.weight}, {origin}")
    lines.append(f"- max_length {data.max_length}, packing {data.packing}")
    return lines


@dataclass(frozen=True)
class Pruning:
    """What pruning left in an export, measured on its weights."""

    sparsity: dict[str, float] | None = None  # magnitude: the fraction of zeros of each pruned weight matrix
    intermediate_size: tuple[int, int] | None = None  # structured: feed-forward neurons per layer, before and after
    parameters: tuple[int, int] | None = None  # structured: the model's parameters, before and after


def model_card(cfg: DictConfig, task: Any, dev_metrics: dict[str, Any] | None, pruning: Pruning | None = None) -> str:
    """The README.md of an export; `dev_metrics`: the dev eval record of the exported weights (None: none ran)."""
    adapter = cfg.get("adapter")
    adapter = adapter if adapter is not None and adapter.get("name") not in (None, "none") else None
    datasets = [cfg.data.hub_name] if cfg.data.dir is None and cfg.data.hub_name else []
    datasets += [s.hub_name for s in cfg.data.mixture if s.dir is None and s.hub_name]
    tags = ["distrain", str(task.name), *(["peft", str(adapter.name)] if adapter else [])]
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": task.pipeline_task, "tags": tags}
    base = cfg.model.name_or_path
    if base and not is_local(base):  # a Hub id; bundled and local models have none to link
        front["base_model"] = base
    if datasets:
        front["datasets"] = datasets
    model = base or f"random init ({cfg.model.name})"
    if cfg.model.get("init_from"):  # a student built from another model's blocks
        kept = cfg.model.get("keep_layers")
        model = f"the weights of `{cfg.model.init_from}`" + (f" (its blocks {list(kept)} kept)" if kept else "")
    if cfg.checkpoint.get("init_from"):
        model = f"the weights of `{cfg.checkpoint.init_from}` (checkpoint.init_from)"
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# {cfg.run.name}\n\nA `{task.name}` model ({task.pipeline_task}) trained with distrain "
        f"{distrain_version()} from {model}.",
        "## Data\n\n" + "\n".join(_data_lines(cfg.data)),
    ]
    if dev_metrics:
        values = {k: v for k, v in dev_metrics.items() if k != "step" and isinstance(v, float | int)}
        rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in values.items())
        capped = cfg.data.max_eval_samples
        on = f", on the first {capped} dev examples (data.max_eval_samples)" if capped is not None else ""
        parts.append(
            f"## Evaluation\n\nDev metrics of these weights (step {dev_metrics.get('step')}{on}):\n\n"
            f"| metric | value |\n|---|---|\n{rows}\n\nThe whole of a split: `distrain eval ckpt=<this folder> "
            "split=test` (or `split=dev`)."
        )
    if cfg.get("distill") is not None and cfg.distill.teacher:
        d = cfg.distill
        hidden = f", hidden-state weight {d.hidden_weight}" if d.hidden_weight else ""
        parts.append(f"## Distillation\n\nDistilled from the teacher `{d.teacher}`: alpha {d.alpha} of the loss on "
                     f"its outputs softened at temperature {d.temperature}{hidden}.")  # fmt: skip
    if adapter:
        settings = yaml.safe_dump(OmegaConf.to_container(adapter, resolve=True, enum_to_str=True), sort_keys=False)
        parts.append(f"## Adapter\n\n```yaml\n{settings}```")
    if pruning and pruning.sparsity:
        rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in pruning.sparsity.items())
        mean = sum(pruning.sparsity.values()) / len(pruning.sparsity)
        parts.append(
            f"## Pruning\n\nprune={cfg.prune.name} (scope {cfg.prune.scope}, target sparsity {cfg.prune.sparsity}). "
            f"Measured fraction of zero weights per pruned matrix (mean {mean:.4f}); the zeros are stored, so the "
            f"files and the speed are those of the dense model:\n\n| weight | sparsity |\n|---|---|\n{rows}"
        )
    if pruning and pruning.intermediate_size:
        (before, after), (params_before, params_after) = pruning.intermediate_size, pruning.parameters
        parts.append(
            f"## Pruning\n\nprune=structured (target {cfg.prune.sparsity} of the feed-forward neurons): every layer "
            f"keeps {after} of its {before} feed-forward neurons (intermediate_size {before} -> {after}); the "
            f"pruned ones are removed, so the model has {params_after:,} parameters instead of {params_before:,}."
        )
    parts.append("## Use it\n\n" + task.card_usage())
    config = OmegaConf.to_yaml(cfg, resolve=True)
    parts.append(f"## Training config\n\nThe resolved config (also in `distrain_config.yaml`):\n\n```yaml\n{config}```")
    return "\n\n".join(parts) + "\n"
