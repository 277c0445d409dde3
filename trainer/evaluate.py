"""Predicting a split (during training, on every rank) and evaluating saved weights (`distrain eval`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from omegaconf import DictConfig

from distrain.trainer.checkpoint import is_checkpoint, load_model_weights
from distrain.trainer.config import Precision, load_run_config
from distrain.trainer.data import eval_loader
from distrain.trainer.distributed import DistEnv, pick_device
from distrain.trainer.errors import DataError, UserError
from distrain.trainer.model import build_model, load_tokenizer
from distrain.trainer.precision import autocast
from distrain.trainer.tasks import Task, build_task

log = logging.getLogger(__name__)


@torch.no_grad()
def gather_predictions(
    model: torch.nn.Module, task: Task, dataset: Dataset, batch_size: int, env: DistEnv, precision: Precision
) -> dict[int, Any] | None:
    """Every example's prediction, by dataset index, on rank 0 (None on the other ranks).

    Each rank predicts its own shard; `model` must be the bare module (no DDP hooks), since shards may differ by
    one batch between ranks.
    """
    columns = [*task.model_inputs, "labels"]
    loader, batches = eval_loader(dataset, task.collator(), columns, batch_size, env)
    was_training = model.training
    model.eval()
    mine: dict[int, Any] = {}
    for indices, cpu_batch in zip(batches, loader, strict=True):
        batch = {k: v.to(env.device, non_blocking=True) for k, v in cpu_batch.items()}
        with autocast(precision, env.device):
            logits = model(**{k: batch[k] for k in task.model_inputs}).logits
        mine.update(zip(indices, task.predict(logits, batch), strict=True))
    model.train(was_training)
    gathered = env.gather_objects(mine)
    return None if gathered is None else {k: v for part in gathered for k, v in part.items()}


class EvalError(UserError):
    """The `ckpt` or `split` given to `distrain eval` cannot be used; the message says why."""


@dataclass
class Weights:
    kind: str  # "checkpoint" or "export"
    path: Path
    config: Path  # the run's resolved config.yaml


def locate(ckpt: Path) -> Weights:
    """What `ckpt=` points at: a checkpoint folder, an export folder, or a run dir (its export, else its latest
    complete checkpoint)."""
    if not ckpt.exists():
        raise EvalError(f"ckpt: {ckpt} does not exist")
    if (ckpt / ".metadata").is_file() or ckpt.name.startswith("step_"):
        if not is_checkpoint(ckpt):
            raise EvalError(f"ckpt: {ckpt} is an incomplete checkpoint (no COMPLETE marker): its save was interrupted")
        return Weights("checkpoint", ckpt, ckpt.parent.parent / "config.yaml")
    if (ckpt / "distrain_config.yaml").is_file():
        return Weights("export", ckpt, ckpt / "distrain_config.yaml")
    if (ckpt / "config.yaml").is_file():
        if (ckpt / "export" / "distrain_config.yaml").is_file():
            return locate(ckpt / "export")
        from distrain.trainer.checkpoint import complete_checkpoints

        found = complete_checkpoints(ckpt / "checkpoints")
        if found:
            return locate(found[-1][1])
        raise EvalError(f"ckpt: run dir {ckpt} has neither an export nor a complete checkpoint yet")
    raise EvalError(f"ckpt: expected a checkpoint folder (step_<N>), an export folder or a run dir, got {ckpt}")


def evaluate_weights(
    weights: Weights, split: str, batch_size: int | None, data_dir: str | None, output: Path | None
) -> dict[str, Any]:
    """Evaluate on one split in this process; write eval_<split>.json and predictions_<split>.txt."""
    cfg: DictConfig = load_run_config(weights.config)
    if data_dir is not None:
        cfg.data.dir = data_dir
    env = DistEnv(device=pick_device(cfg.train.device, 0))
    if weights.kind == "export":
        cfg.model.name_or_path = str(weights.path)
        cfg.model.tokenizer = str(weights.path)
    tokenizer = load_tokenizer(cfg.model)
    task = build_task(cfg, tokenizer)
    data = task.prepare(env)
    if split not in data.splits:
        raise EvalError(f"split: expected one of {sorted(data.splits)}, got {split!r}")
    model = build_model(
        cfg.model, task.auto_model_class(), cfg.train.seed, pretrained=weights.kind == "export", **task.head(data)
    )
    if weights.kind == "checkpoint":
        load_model_weights(weights.path, model)
    if list(model.config.id2label.values()) != list(data.labels):
        raise DataError(
            f"the model's labels {list(model.config.id2label.values())} differ from the data's {data.labels}: "
            "evaluate on the data the model was trained on"
        )
    model.to(env.device)
    dataset = data.splits[split]
    size = batch_size or cfg.train.eval_batch_size or 2 * cfg.train.micro_batch_size
    predictions = gather_predictions(model, task, dataset, size, env, cfg.precision.name)
    report = task.report(predictions, dataset)
    report.update({"split": split, "examples": len(dataset), "weights": str(weights.path)})
    out_dir = output or weights.path
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"eval_{split}.json").write_text(json.dumps(report, indent=1))
    task.write_predictions(predictions, dataset, str(out_dir / f"predictions_{split}.txt"))
    report["output_dir"] = str(out_dir)
    return report
