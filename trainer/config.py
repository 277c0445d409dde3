"""Typed schema of a distrain run, shared by the launcher (which validates it) and the workers (which read it).

Every config group is one dataclass; `DistrainConfig` nests them and is registered in Hydra's ConfigStore as the
schema of `configs/train.yaml`, so a value of the wrong type fails at composition with its full key. What types
cannot say (ranges, choices that depend on each other, files that must exist) is checked by `validate()`, which
collects every problem, each naming its key, before any worker starts.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from distrain.trainer.errors import ConfigError
from distrain.trainer.paths import is_local, resolve_path
from distrain.trainer.sources import FORMATS, matching_paths


class Strategy(str, enum.Enum):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    tp = "tp"
    fsdp_tp = "fsdp_tp"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Schedule(str, enum.Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class ExportWeights(str, enum.Enum):
    best = "best"
    last = "last"


@dataclass
class ModelConfig:
    name: str = MISSING  # short name, used in run names
    name_or_path: str | None = None  # local folder, pkg://<package>/<folder>, or a Hub id; null = random init
    tokenizer: str | None = None  # defaults to name_or_path
    architecture: dict[str, Any] | None = None  # transformers config fields for a random-init model
    revision: str | None = None  # Hub revision
    trust_remote_code: bool = False  # run model code shipped with a Hub repo: only for repos you trust
    gguf_file: str | None = None  # a GGUF file inside name_or_path: dequantized once into cache_dir
    train_tokenizer_vocab: int | None = None  # random-init models: train a BPE tokenizer of this size on the data
    cache_dir: str = "~/.cache/distrain"  # converted GGUF models


@dataclass
class DataConfig:
    name: str = MISSING
    format: str = "conll"  # conll | jsonl | csv | text | folders (one sub-folder of .txt files per class)
    dir: str | None = None  # folder (or pkg://...) holding the files below; null = use hub_name
    files: dict[str, str] = field(default_factory=dict)  # split -> file (glob) inside dir; "all" + split: cut one
    split: dict[str, float] | None = None  # fractions to cut files.all into train/dev/test, fixed seed
    split_seed: int = 0
    hub_name: str | None = None  # Hub dataset used when dir is null (needs network)
    hub_config: str | None = None
    hub_revision: str | None = None
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"})
    text_column: str = "text"  # jsonl / csv / Hub columns
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"
    labels: list[str] | None = None  # the label set, in id order; null = the labels seen in training data
    text_unit: str = "file"  # text format: one document per file | paragraph (blank-line separated) | line
    packing: bool = False  # mlm/clm: fill blocks of max_length tokens from consecutive documents, no padding
    document_boundaries: bool = True  # clm packing: attention and targets stay inside each document
    max_length: int = 256  # sub-word tokens per sequence, longer ones are truncated
    max_train_samples: int | None = None  # take the first N (after the split) for quick runs
    max_eval_samples: int | None = None
    group_by_length: bool = False  # batches of similar length: less padding, same samples per epoch
    cache_dir: str = "~/.cache/distrain"  # tokenized datasets, keyed by file contents and settings
    num_workers: int = 0  # DataLoader worker processes per rank


@dataclass
class TaskConfig:
    name: str = "ner"  # ner | classify | mlm | clm
    metric: str = "f1"  # dev metric for the best checkpoint and early stopping (perplexity/loss: lower is better)
    mask_probability: float = 0.15  # mlm: fraction of tokens to predict (80% [MASK], 10% random, 10% kept)


@dataclass
class ParallelConfig:
    name: Strategy = Strategy.single  # single | ddp | fsdp | tp | fsdp_tp (see trainer/parallel_dims.py)
    dp: int | None = None  # data-parallel degree; null = derived from the world size and tp
    tp: int | None = None  # tensor-parallel degree; null = derived (tp: the world size; others: 1)
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (less memory, more comm)
    cpu_offload: bool = False  # fsdp: keep sharded parameters, gradients and optimizer state in CPU memory
    backend: str | None = None  # null: nccl on CUDA, gloo on CPU


@dataclass
class PrecisionConfig:
    name: Precision = Precision.fp32


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01  # not applied to biases and norm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.0  # fraction of the steps with linear warmup
    schedule: Schedule = Schedule.linear
    max_grad_norm: float | None = 1.0  # null disables clipping


@dataclass
class LauncherConfig:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # only for static rendezvous; null lets c10d assign it
    rdzv_endpoint: str | None = None  # host:port of the rendezvous, required when nnodes > 1
    rdzv_id: str | None = None  # same on every node of one job; null = derived from run.dir
    max_restarts: int = 0  # restarts of the worker group after a failure (resumes from the last checkpoint)
    monitor_interval: float = 0.5  # seconds between the agent's health checks of its workers
    threads_per_process: int | None = None  # torch threads per worker; null = CPU cores / nproc_per_node
    preempt_signal: str = "USR1"  # asks for a checkpoint and a stop (e.g. #SBATCH --signal=USR1@120); so does TERM
    requeue: bool = True  # under SLURM, requeue the job after such a stop (scontrol requeue)


@dataclass
class TrainLoopConfig:
    micro_batch_size: int = 16  # per rank, per forward pass
    grad_accum_steps: int = 1
    epochs: int = 3
    max_steps: int | None = None  # when set, overrides epochs
    stop_at_step: int | None = None  # end this run after step N with a checkpoint; rerun to resume
    log_every: int = 10
    eval_every: int = 0  # steps between dev evaluations; 0 = at the end of every epoch
    eval_at_start: bool = False  # also evaluate before the first step (a baseline for fine-tuning)
    eval_batch_size: int | None = None  # default 2 x micro_batch_size
    save_every: int = 0  # steps between checkpoints; 0 = only on a new best and at the end
    keep_last: int = 2  # newest checkpoints kept, besides the best
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    export_weights: ExportWeights = ExportWeights.best  # weights put in export/: best dev metric or last step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    compile: bool = False  # torch.compile each block (off by default: no gain on CPU, a long first step)


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = MISSING  # the run directory; a rerun in the same directory resumes


@dataclass
class DistrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    """Register the schema so that configs/train.yaml composes on top of it (`defaults: [distrain_schema]`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="distrain_schema", node=DistrainConfig)


TASK_METRICS = {
    "ner": ("f1", "precision", "recall", "accuracy"),
    "classify": ("accuracy", "macro_f1"),
    "mlm": ("perplexity", "loss"),
    "clm": ("perplexity", "loss"),
}
TASK_FORMATS = {
    "ner": ("conll", "jsonl"),
    "classify": ("jsonl", "csv", "folders"),
    "mlm": ("text", "jsonl", "csv"),
    "clm": ("text", "jsonl", "csv"),
}


def validate(cfg: DictConfig) -> None:
    """Check what the schema's types cannot: ranges, cross-field rules and files. Raise one ConfigError."""
    problems: list[str] = []

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            problems.append(f"{key}: expected {expected}, got {OmegaConf.select(cfg, key)!r}")

    t, o, launcher, data = cfg.train, cfg.optim, cfg.launcher, cfg.data
    task = cfg.task.name
    need(task in TASK_METRICS, "task.name", f"one of {list(TASK_METRICS)}")
    if task in TASK_METRICS:
        need(cfg.task.metric in TASK_METRICS[task], "task.metric", f"one of {list(TASK_METRICS[task])} for {task}")
        if data.dir is not None:
            formats = TASK_FORMATS[task]
            need(data.format in formats, "data.format", f"one of {list(formats)} for task {task}")
        lm = task in ("mlm", "clm")
        if data.packing and not lm:
            problems.append(f"data.packing: packing is for language modelling (mlm, clm), not {task}")
        if data.labels is not None and lm:
            problems.append(f"data.labels: {task} has no labels; expected null")
        if task == "mlm" and data.packing and data.document_boundaries:
            problems.append(
                "data.document_boundaries: packed mlm blocks attend across documents (BERT-style models take no "
                "block mask); expected false with data.packing=true, or data.packing=false"
            )
    need(0 < cfg.task.mask_probability < 1, "task.mask_probability", "a number in (0, 1)")
    need(data.text_unit in ("file", "paragraph", "line"), "data.text_unit", "one of ['file', 'paragraph', 'line']")
    for key in ("micro_batch_size", "grad_accum_steps", "epochs", "log_every"):
        need(t[key] >= 1, f"train.{key}", "an integer >= 1")
    for key in ("eval_every", "save_every", "keep_last", "early_stopping_patience"):
        need(t[key] >= 0, f"train.{key}", "an integer >= 0")
    need(t.keep_last >= 1, "train.keep_last", "an integer >= 1 (the latest checkpoint is what a rerun resumes)")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "null or an integer >= 1")
    need(t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size", "null or an integer >= 1")
    if t.stop_at_step is not None:
        need(t.stop_at_step >= 1, "train.stop_at_step", "null or an integer >= 1")
        if t.max_steps is not None:
            need(t.stop_at_step <= t.max_steps, "train.stop_at_step", f"<= train.max_steps ({t.max_steps})")
    need(t.device in ("auto", "cpu", "cuda"), "train.device", "one of ['auto', 'cpu', 'cuda']")
    need(o.lr > 0, "optim.lr", "a number > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0")
    need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "a number in [0, 1)")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)")
    need(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "null or a number > 0")

    need(launcher.nproc_per_node >= 1, "launcher.nproc_per_node", "an integer >= 1")
    need(launcher.nnodes >= 1, "launcher.nnodes", "an integer >= 1")
    need(launcher.max_restarts >= 0, "launcher.max_restarts", "an integer >= 0")
    need(
        launcher.threads_per_process is None or launcher.threads_per_process >= 1,
        "launcher.threads_per_process",
        "null or an integer >= 1",
    )
    try:
        from distrain.trainer.preemption import signal_number

        signal_number(launcher.preempt_signal)
    except (KeyError, ValueError):
        problems.append(
            f"launcher.preempt_signal: expected a signal name such as USR1, got {launcher.preempt_signal!r}"
        )
    if launcher.nnodes > 1:
        need(
            launcher.rdzv_endpoint is not None,
            "launcher.rdzv_endpoint",
            "host:port of the rendezvous (the same on every node) when launcher.nnodes > 1",
        )
    need(cfg.parallel.backend in (None, "gloo", "nccl"), "parallel.backend", "null, 'gloo' or 'nccl'")
    problems += _parallel_problems(cfg)

    model = cfg.model
    need(model.name_or_path is not None or model.architecture is not None,
         "model.name_or_path", "a model path or Hub id, or model.architecture for a random-init model")  # fmt: skip
    if model.name_or_path is None:
        need(model.tokenizer is not None or model.train_tokenizer_vocab is not None, "model.tokenizer",
             "a tokenizer path or Hub id (or model.train_tokenizer_vocab) for a random-init model")  # fmt: skip
    elif model.train_tokenizer_vocab is not None:
        problems.append("model.train_tokenizer_vocab: only for random-init models (model.name_or_path=null)")
    need(model.train_tokenizer_vocab is None or model.train_tokenizer_vocab >= 300, "model.train_tokenizer_vocab",
         "null or an integer >= 300 (256 bytes plus merges)")  # fmt: skip
    for key in ("name_or_path", "tokenizer"):
        value = model[key]
        if value is not None and is_local(value):
            need(resolve_path(value).is_dir(), f"model.{key}", "an existing folder")
    if model.gguf_file is not None and model.name_or_path is not None and is_local(model.name_or_path):
        gguf = resolve_path(model.name_or_path) / model.gguf_file
        need(gguf.is_file(), "model.gguf_file", f"a file inside model.name_or_path ({gguf} does not exist)")

    need(data.max_length >= 8, "data.max_length", "an integer >= 8")
    for key in ("max_train_samples", "max_eval_samples"):
        need(data[key] is None or data[key] >= 1, f"data.{key}", "null or an integer >= 1")
    problems += _data_problems(data)
    if problems:
        raise ConfigError(problems)


def _parallel_problems(cfg: DictConfig) -> list[str]:
    from distrain.trainer.parallel_dims import ParallelDims

    if cfg.launcher.nproc_per_node < 1 or cfg.launcher.nnodes < 1:
        return []  # reported with their keys already
    dims, problems = ParallelDims.resolve(cfg.parallel, cfg.launcher.nproc_per_node * cfg.launcher.nnodes)
    if dims is not None:
        problems += dims.model_problems(model_config_if_local(cfg.model))
    return problems


def model_config_if_local(model: DictConfig) -> Any:
    """The model's architecture when it can be read without a network or a conversion, else None."""
    from types import SimpleNamespace

    if model.name_or_path is None and model.architecture is not None:
        return SimpleNamespace(**OmegaConf.to_container(model.architecture))
    if model.name_or_path is not None and model.gguf_file is None and is_local(model.name_or_path):
        folder = resolve_path(model.name_or_path)
        if (folder / "config.json").is_file():
            return SimpleNamespace(**json.loads((folder / "config.json").read_text()))
    return None


def _data_problems(data: DictConfig) -> list[str]:
    if data.dir is None:
        if data.hub_name is None:
            return ["data.dir: expected a folder with the data files (or data.hub_name for a Hub dataset), got None"]
        reason = hub_dataset_unreachable(data.hub_name)
        if reason:
            return [
                f"data.dir: expected a folder with the {data.name} files ({', '.join(data.files.values())}), got None;"
                f" and the Hub dataset data.hub_name={data.hub_name!r} is not reachable ({reason})."
                " Set data.dir=<folder>, or train on the bundled data with +experiment=wnut_ner"
            ]
        return []
    folder = resolve_path(data.dir)
    if not folder.is_dir():
        return [f"data.dir: expected an existing folder, got {data.dir!r}"]
    problems = []
    if data.format not in FORMATS:
        return [f"data.format: expected one of {list(FORMATS)}, got {data.format!r}"]
    splits = set(data.files)
    if data.split is not None:
        if splits != {"all"}:
            problems.append(
                f"data.files: with data.split set, expected exactly one file under 'all', got {sorted(splits)}"
            )
        if set(data.split) != {"train", "dev", "test"} or abs(sum(data.split.values()) - 1) > 1e-6:
            problems.append(
                f"data.split: expected fractions for train, dev and test that sum to 1, got {dict(data.split)}"
            )
    elif not {"train", "dev"} <= splits or not splits <= {"train", "dev", "test"}:
        problems.append(f"data.files: expected files for train and dev (and optionally test), got {sorted(splits)}")
    for split, name in data.files.items():
        if not matching_paths(data, name):
            kind = "a folder of class folders" if data.format == "folders" else "a file"
            problems.append(f"data.files.{split}: expected {kind}, '{folder / name}' does not exist")
    return problems


def load_run_config(path: str | Path) -> DictConfig:
    """Load a resolved config.yaml onto the schema, so workers and `distrain eval` get typed values."""
    schema = OmegaConf.structured(DistrainConfig)
    return OmegaConf.merge(schema, OmegaConf.load(path))


def hub_dataset_unreachable(name: str) -> str | None:
    """Why the Hub dataset cannot be fetched, or None when it can (or when offline mode defers to the cache)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None  # offline mode: `datasets` will look in its local cache, and say so if it is not there
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(name, timeout=10)
    except Exception as error:  # network errors, unknown repo, gated repo: all mean "not usable from here"
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return None
