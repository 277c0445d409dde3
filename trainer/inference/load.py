"""Saved weights outside training: find them (`ckpt=`), load them in one process, and evaluate them on a split.

Serves `distrain eval` and `distrain predict`. A checkpoint needs the task head's settings (the label names), which
the worker writes once into the run dir (`save_head`), so weights load without reading the data again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer import strict_json
from distrain.trainer.checkpoint.store import (
    complete_checkpoints,
    damage,
    is_checkpoint,
    load_model_weights,
    read_trainer_state,
)
from distrain.trainer.config import run_files
from distrain.trainer.config.schema import load_run_config
from distrain.trainer.errors import DataError, UserError
from distrain.trainer.model import adapters
from distrain.trainer.model.build import build_model, model_source
from distrain.trainer.model.forward import predict_split_with_loss
from distrain.trainer.model.head import load_head
from distrain.trainer.model.tokenizer import load_tokenizer
from distrain.trainer.parallel.distributed import DistEnv, pick_device
from distrain.trainer.tasks import Task, build_task

log = logging.getLogger(__name__)


class EvalError(UserError):
    """The `ckpt` or `split` given to `distrain eval` cannot be used; the message says why."""


@dataclass
class Weights:
    kind: str  # "checkpoint", "export", "adapter" (a peft adapter folder, loaded onto the run's base) or "onnx"
    path: Path
    config: Path  # the run's resolved config.yaml


def locate(ckpt: Path, verify: bool = True) -> Weights:
    """What `ckpt=` points at: a checkpoint folder, an export folder (Hugging Face or ONNX: `distrain export`), or a
    run dir (its export, else its latest complete checkpoint). `verify`: check the files are whole (a checkpoint's
    digests, an export's headers and lengths); False where the launcher has just done so."""
    if not ckpt.exists():
        raise EvalError(f"ckpt: {ckpt} does not exist")
    if (ckpt / ".metadata").is_file() or ckpt.name.startswith("step_"):
        if not is_checkpoint(ckpt):
            raise EvalError(f"ckpt: {ckpt} is an incomplete checkpoint (no COMPLETE marker): its save was interrupted")
        problem = damage(ckpt) if verify else None
        if problem:
            raise EvalError(f"ckpt: checkpoint {ckpt} is damaged: {problem}")
        return Weights("checkpoint", ckpt, ckpt.parent.parent / run_files.CONFIG)
    if (ckpt / run_files.EXPORT_CONFIG).is_file():
        kind = "onnx" if (ckpt / "model.onnx").is_file() else "adapter" if (ckpt / "adapter_config.json").is_file() \
            else "export"  # fmt: skip
        problem = export_damage(ckpt) if verify else None
        if problem:
            raise EvalError(f"ckpt: {kind} folder {ckpt} is damaged: {problem}; export it again from its run (a "
                            "checkpoint or the run dir)")  # fmt: skip
        return Weights(kind, ckpt, ckpt / run_files.EXPORT_CONFIG)
    if (ckpt / run_files.CONFIG).is_file():
        if (ckpt / run_files.EXPORT / run_files.EXPORT_CONFIG).is_file():
            return locate(ckpt / run_files.EXPORT, verify)
        found = complete_checkpoints(ckpt / run_files.CHECKPOINTS)
        if found:
            return locate(found[-1][1], verify)
        raise EvalError(f"ckpt: run dir {ckpt} has neither an export nor a complete checkpoint yet")
    raise EvalError(f"ckpt: expected a checkpoint folder (step_<N>), an export folder or a run dir, got {ckpt}")


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")  # what a tokenizer is read from


def export_damage(folder: Path) -> str | None:
    """What is wrong with an export folder, or None: no model config.json (an adapter folder has its own) or no
    tokenizer vocabulary (transformers would build one of a few special tokens and map every word to [UNK]); a
    safetensors file whose header or length is off (safetensors checks both on opening), an ONNX graph that does
    not parse, or external ONNX weights shorter than the graph says. Exports carry no digests (they are meant to
    be edited and shared), so a file that is whole but altered passes."""
    from safetensors import SafetensorError, safe_open

    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        return "config.json (the model's architecture and labels) is missing"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return f"the tokenizer's vocabulary is missing (none of {', '.join(TOKENIZER_FILES)})"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except SafetensorError as error:
            return f"{path.name}: {error}"
    graph = folder / "model.onnx"
    if not graph.is_file():
        return None
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except DecodeError as error:
        return f"{graph.name} does not parse as an ONNX graph ({error})"
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {entry.key: entry.value for entry in tensor.external_data}
        data = folder / where["location"]
        end = int(where.get("offset", 0)) + int(where.get("length", 0))
        if not data.is_file() or data.stat().st_size < end:
            size = f"{data.stat().st_size:,} bytes" if data.is_file() else "missing"
            return f"{where['location']}: {size}, but {graph.name} places {tensor.name} up to byte {end:,}"
    return None


def load_for_inference(weights: Weights) -> tuple[DictConfig, DistEnv, Any, Task, torch.nn.Module]:
    """The run's config, a one-process environment on the run's device kind, and the tokenizer, task and model
    with the given weights (on that device, in eval mode)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar would break up our phase lines
    cfg: DictConfig = load_run_config(weights.config)
    env = DistEnv(device=pick_device(cfg.train.device, 0))
    run_dir = weights.config.parent
    if weights.kind in ("export", "onnx"):
        cfg.model.name_or_path = cfg.model.tokenizer = str(weights.path)
        cfg.model.gguf_file = cfg.model.train_tokenizer_vocab = cfg.model.init_from = None  # all in the folder
    if weights.kind == "adapter":  # the base from the run's source; tokenizer and labels from the folder
        cfg.model.tokenizer, cfg.model.train_tokenizer_vocab = str(weights.path), None
    tokenizer = load_tokenizer(cfg.model, env, run_dir)
    task = build_task(cfg, tokenizer)
    if weights.kind == "onnx":  # the graph through ONNX Runtime, behind the model interface the tasks call
        from transformers import AutoConfig

        from distrain.trainer.export.onnx import GRAPH, ort_model

        return cfg, env, tokenizer, task, ort_model(weights.path / GRAPH, AutoConfig.from_pretrained(weights.path))
    head = {} if weights.kind == "export" else load_head(run_dir)
    source = model_source(cfg.model, env)
    lora = adapters.enabled(cfg) and weights.kind != "export"
    model = build_model(cfg.model, task.auto_model_class(), cfg.train.seed, source, tokenizer,
                        pretrained=weights.kind == "export" or lora, **head)  # fmt: skip
    if lora:  # a checkpoint or adapter folder holds the adapters only: onto the base they were trained on
        base = adapters.base_record(cfg, source, model)
        if weights.kind == "adapter":
            model = adapters.load_adapter(model, weights.path, base)
        else:
            adapters.check_base(read_trainer_state(weights.path).get("base_model"), base, f"checkpoint {weights.path}")
            model = adapters.apply_lora(model, cfg.adapter)
    if weights.kind == "checkpoint":
        load_model_weights(weights.path, model)
    if lora:
        model = adapters.merged(model)  # a plain transformers model, for the task's pipeline
    return cfg, env, tokenizer, task, model.to(env.device).eval()


def failed_export(weights: Weights) -> str | None:
    """A warning when the weights are an ONNX export its own check marked failed (int8 lost too much)."""
    if weights.kind != "onnx":
        return None
    from distrain.trainer.export.onnx import read_metadata

    meta = read_metadata(weights.path)
    if meta.get("status") != "failed":
        return None
    return f"{weights.path} failed its export check ({meta.get('failure', 'see onnx_export.json')}); using it anyway"


def runtime(weights: Weights, cfg: DictConfig) -> dict[str, str]:
    """Which runtime and precision produce a report of these weights (an ONNX export's from its metadata)."""
    if weights.kind == "onnx":
        from distrain.trainer.export.onnx import read_metadata

        meta = read_metadata(weights.path)
        return {"runtime": "onnxruntime", "runtime_precision": meta["precision"], "onnx_status": meta["status"]}
    return {"runtime": "torch", "runtime_precision": str(cfg.precision.name)}


def default_eval_output(weights: Weights) -> Path:
    """Beside the evaluated folder, never in it: an export folder is what gets uploaded, and a test split's
    predictions (CoNLL-2003's words with their gold tags) must not ship with it."""
    return weights.path.with_name(weights.path.name + "_eval")


def eval_report(
    weights: Weights,
    split: str,
    batch_size: int | None,
    data_dir: str | None,
    output: Path,
    options: DictConfig,
    say: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Evaluate on one split in this process; write eval_<split>.json and the task's predictions file into `output`.
    `options`: eval's settings of the task's raw-text scores (Task.raw_text_report); `say`: each phase as it starts
    and its seconds as it ends (a large split takes minutes)."""
    cfg, env, tokenizer, task, model = load_for_inference(weights)
    if task.needs_reference:  # dpo's rewards: against the run's reference, built apart (the weights are merged)
        from distrain.trainer.train.reference import build_reference

        # From the run's own model settings: cfg.model now names the evaluated weights (an export), which as the
        # reference would score the model against itself (every reward 0, accuracy 0.5)
        task.reference = build_reference(load_run_config(weights.config), env, task, tokenizer)
    if data_dir is not None:
        cfg.data.dir = data_dir
    # The whole split: a run's data.max_*_samples kept its own evaluations short, not this report's
    cfg.data.max_train_samples = cfg.data.max_eval_samples = None
    data = task.prepare(env)
    if split not in data.splits:
        raise EvalError(f"split: expected one of {sorted(data.splits)}, got {split!r}")
    names = list(model.config.id2label.values()) if data.labels else []
    if names != list(data.labels):
        raise DataError(
            f"the model's labels {names} differ from the data's {data.labels}: evaluate on the data it was trained on"
        )
    dataset = data.splits[split]
    if options.get("max_samples") and options.max_samples < len(dataset):
        dataset = dataset.select(range(options.max_samples))
    size = batch_size or cfg.train.eval_batch_size or 2 * cfg.train.micro_batch_size
    precision = "fp32" if weights.kind == "onnx" else cfg.precision.name  # autocast is torch's, not ORT's
    started = time.perf_counter()
    say(f"predicting {len(dataset):,} {split} examples in batches of {size} ...")
    predictions, loss = predict_split_with_loss(model, task, dataset, size, env, precision)
    report = task.report(predictions, dataset)
    if loss is not None:
        report["loss"] = loss  # what the run's eval records call loss, on this split
    say(f"  done in {time.perf_counter() - started:.1f} s")
    if type(task).raw_text_report is not Task.raw_text_report:  # ner, chat: another pass or two over the split
        started = time.perf_counter()
        say(f"scoring the raw-text path ({task.name}: what `distrain predict` and the export's pipeline return) ...")
        report.update(task.raw_text_report(model, dataset, size, env, options))
        say(f"  done in {time.perf_counter() - started:.1f} s")
    # metric: the run's task.metric (what it picked its best checkpoint by), not the task's first metric.
    report.update({"task": str(task.name), "metric": str(cfg.task.metric), "split": split, "examples": len(dataset),
                   "weights": str(weights.path), **runtime(weights, cfg)})  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / f"eval_{split}.json").write_text(strict_json.dumps(report, indent=1))
    written = task.write_predictions(predictions, dataset, output / f"predictions_{split}.txt")
    report["files"] = [str(output / f"eval_{split}.json"), *([str(written)] if written else [])]
    return report
