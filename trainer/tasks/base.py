"""What a task supplies to the one shared loop: its data, model head, collation, loss, metrics and inference.

The loop (trainer/train/loop.py) never branches on the task; a new task is a `Task` subclass listed in `TASKS`
(trainer/tasks/__init__.py), not a copy of the loop. The class attributes are everything the launcher, `distrain
eval`, `predict`, `plan` and `report` need to know of a task (its metrics and their direction, the data formats it
reads, its own config rules in `check`), so no other module matches task names. The base class runs the common data
path: raw records (trainer/data/sources.py) -> the task's typed `Dataset`s -> the task's tokenization, cached once
per node (trainer/data/cache.py).

Task modules import transformers, datasets and the metric libraries inside their methods: the launcher imports the
registry to validate a config, and must stay quick to start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from distrain.trainer.config.paths import resolve_path
from distrain.trainer.config.schema import DataFormat, TaskName
from distrain.trainer.data.cache import cached_splits, file_digest, tokenizer_fingerprint
from distrain.trainer.data.mixture import mix, renamed, source_columns, train_sources
from distrain.trainer.data.packing import IGNORE, is_packed, packed_model_inputs
from distrain.trainer.data.sources import Record, column, read_splits, source_files
from distrain.trainer.errors import ConfigError
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks.labels import label_head

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class TaskData:
    """Tokenized splits (each with a `length` column) and the label names of the model head (if any)."""

    splits: dict[str, Dataset]
    labels: list[str]


class Task:
    name: ClassVar[TaskName]
    metrics_reported: ClassVar[tuple[str, ...]]  # what `metrics()` returns; any can be task.metric
    lower_is_better: ClassVar[frozenset[str]] = frozenset()  # the others: higher is better
    metric_titles: ClassVar[dict[str, str]] = {}  # how reports name a metric (default: its key)
    formats: ClassVar[tuple[DataFormat, ...]]  # the local data formats it reads
    language_model: ClassVar[bool] = False  # documents -> token blocks: packing, no labels, logits over the vocab
    packs_examples: ClassVar[bool] = False  # per-token targets: data.pack_examples may lay examples end to end
    dev_loss: ClassVar[bool] = False  # evaluations also report `loss` (example_losses); LM tasks: in metrics()
    pipeline_task: ClassVar[str] = ""  # the transformers.pipeline task that loads this task's export
    # What its metrics import (lazily: validation and `plan` do without). A launcher that forks its workers imports
    # them first, so that no job of a sweep imports them again in its workers (seqeval: 0.4 s).
    metric_modules: ClassVar[tuple[str, ...]] = ()
    model_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    loader_columns: tuple[str, ...] = ("input_ids", "attention_mask", "labels")  # what the collator receives
    forward_kwargs: dict[str, Any] = {}  # fixed keyword arguments of every forward pass
    augment_ops: ClassVar[tuple[str, ...]] = ()  # what data.augment may list (trainer/data/augment.py)
    raw_columns: ClassVar[tuple[str, ...]] = ()  # the untokenized columns an augmenter reads from a sample
    # Its loss compares the model with a frozen reference model (dpo): the worker and `distrain eval` attach one
    # (trainer/train/reference.py) as `task.reference` before the first forward pass.
    needs_reference: ClassVar[bool] = False
    rows_per_sample: ClassVar[int] = 1  # model rows a sample makes in a batch (dpo: the chosen and rejected answer)

    def __init__(self, cfg: DictConfig, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.class_weights: torch.Tensor | None = None  # the loss weight of each label id (task.class_weights)

    # --- what the launcher and the reports know of the task ------------------------------------------------
    @classmethod
    def check(cls, cfg: DictConfig) -> list[str]:
        """This task's rules for the config, each problem naming its key (the launcher adds them to its own)."""
        problems = []
        data, metric = cfg.data, cfg.task.metric
        if metric not in cls.metrics_reported:
            problems.append(f"task.metric: expected one of {list(cls.metrics_reported)} for {cls.name}, got {metric!r}")
        if data.dir is not None and data.format not in cls.formats:
            problems.append(
                f"data.format: expected one of {[str(f) for f in cls.formats]} for task {cls.name}, "
                f"got {str(data.format)!r}"
            )
        if data.packing and not cls.language_model:
            problems.append(
                f"data.packing: packing is for language modelling (mlm, clm), not {cls.name}"
                + ("; data.pack_examples=true packs whole examples" if cls.packs_examples else "")
            )
        if data.pack_examples and not cls.packs_examples:
            problems.append(f"data.pack_examples: packs the examples of tasks with per-token targets (ner, clm, chat), "
                            f"not {cls.name}; expected false")  # fmt: skip
        if data.pack_examples and data.packing:
            problems.append("data.pack_examples: data.packing=true already fills every row with max_length tokens; "
                            "expected one of them")  # fmt: skip
        if data.labels is not None and cls.language_model:
            problems.append(f"data.labels: {cls.name} has no labels; expected null")
        problems += cls._class_weight_problems(cfg)
        for op in data.augment:
            if op not in cls.augment_ops:
                problems.append(f"data.augment: expected operations among {list(cls.augment_ops)} for {cls.name}, "
                                f"got {op!r}")  # fmt: skip
        if data.augment and data.streaming:
            problems.append("data.augment: augments map-style training data; expected [] with data.streaming")
        if not 0 < data.augment_p <= 1:
            problems.append(f"data.augment_p: expected a number in (0, 1], got {data.augment_p}")
        return problems

    @classmethod
    def _class_weight_problems(cls, cfg: DictConfig) -> list[str]:
        weights = cfg.task.class_weights
        if weights is None or weights == "none":
            return []
        if cls.language_model:
            return [f"task.class_weights: {cls.name} has no labels to weight; expected none, got {weights!r}"]
        if isinstance(weights, str):
            if weights != "balanced":
                return [f"task.class_weights: expected none, balanced or a list of weights, got {weights!r}"]
            if cfg.data.streaming:
                return ["task.class_weights: balanced counts the training labels ahead, which data.streaming reads "
                        "as it goes; expected none or a list of weights"]  # fmt: skip
            return []
        values = list(weights) if OmegaConf.is_list(weights) else None
        if (
            not values
            or not all(isinstance(w, int | float) and 0 <= w < float("inf") for w in values)
            or not any(w > 0 for w in values)
        ):
            return [f"task.class_weights: expected none, balanced or a list of numbers >= 0 (one per label, some "
                    f"> 0), got {weights!r}"]  # fmt: skip
        if cfg.data.labels is not None and len(values) != len(cfg.data.labels):
            return [f"task.class_weights: expected {len(cfg.data.labels)} weights, one per label of data.labels "
                    f"{list(cfg.data.labels)}, got {len(values)}"]  # fmt: skip
        return []

    @classmethod
    def is_better(cls, metric: str, value: float, than: float | None) -> bool:
        """Is `value` a better dev `metric` than `than` (None: nothing yet, so yes)?"""
        if than is None:
            return True
        return value < than if metric in cls.lower_is_better else value > than

    @classmethod
    def best_first(cls, metric: str) -> Callable[[float], float]:
        """A sort key that puts the best value of `metric` first."""
        return (lambda v: v) if metric in cls.lower_is_better else (lambda v: -v)

    @classmethod
    def direction(cls, metric: str) -> str:
        return "lower is better" if metric in cls.lower_is_better else "higher is better"

    @classmethod
    def tokenizer_text(cls, record: Record, data: DictConfig) -> str:
        """The text of a raw training record that a tokenizer trained on the data learns from
        (model.train_tokenizer_vocab)."""
        return str(column(record, "text_column", data.text_column))

    # --- data ----------------------------------------------------------------------------------------------
    def prepare(self, env: DistEnv) -> TaskData:
        data = self.cfg.data
        if data.streaming:  # the training data streams (trainer/data/streaming.py); dev/test are tokenized here
            splits = {split: self.in_memory(records) for split, records in read_splits(data, skip=("train",)).items()}
            return TaskData(splits=self._limited(splits), labels=self.labels_of({"train": splits["dev"]}))
        skip = ("train",) if data.mixture else ()  # a mixture's sources are the training data
        splits = self.cached(data, env, skip)
        if data.mixture:
            sources = train_sources(data)
            parts = [self.cached(cfg, env)["train"] for _, _, cfg in sources]
            splits["train"] = mix(parts, [weight for _, weight, _ in sources], self.cfg.train.seed)
        return TaskData(splits=self._limited(splits), labels=self.labels_of(splits))

    def cached(self, data: DictConfig, env: DistEnv, skip: tuple[str, ...] = ()) -> dict[str, Dataset]:
        """The tokenized splits of `data` (the run's data, or one source of a mixture), built once per node."""
        key = {
            "task": self.name,
            "source": source_key(data, skip),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "settings": self.cache_settings(),
        }
        columns, column_keys = source_columns(data)
        if columns:  # a mixture's source: its own column names
            key["columns"] = columns

        def build(folder: Path) -> None:
            records = {split: [renamed(r, columns, column_keys) for r in recs]
                       for split, recs in read_splits(data, skip).items()}  # fmt: skip
            for split, raw in self.to_datasets(records).items():
                raw.map(
                    self.tokenize,
                    batched=True,
                    remove_columns=self.drop_columns(raw),
                    cache_file_name=str(folder / f"{split}.arrow"),
                    desc=f"Tokenizing {split}",
                )

        return cached_splits(data.cache_dir, self.name, key, build, env)

    def _limited(self, splits: dict[str, Dataset]) -> dict[str, Dataset]:
        """data.max_train_samples / max_eval_samples: the first N of each split."""
        for split, dataset in splits.items():
            limit = self.cfg.data.max_train_samples if split == "train" else self.cfg.data.max_eval_samples
            if limit is not None and limit < len(dataset):
                splits[split] = dataset.select(range(limit))
        return splits

    def in_memory(self, records: list[Record]) -> Dataset:
        """Records tokenized in memory, nothing written to disk (streaming's dev/test)."""
        (raw,) = self.to_datasets({"split": records}).values()
        return raw.map(self.tokenize, batched=True, remove_columns=self.drop_columns(raw), keep_in_memory=True)

    def stream_samples(self, records: list[Record]) -> list[dict[str, Any]]:
        """Tokenized samples (dicts of lists) from a chunk of streamed training records; LM tasks pack them."""
        (raw,) = self.to_datasets({"train": records}).values()
        out = self.tokenize(raw.to_dict())
        keys = list(out.keys())
        return [dict(zip(keys, values, strict=True)) for values in zip(*(out[k] for k in keys), strict=True)]

    def cache_settings(self) -> dict[str, Any]:
        """Every setting besides the source and tokenizer that changes the tokenized data."""
        return {"max_length": self.cfg.data.max_length}

    def to_datasets(self, records: dict[str, list[Record]]) -> dict[str, Dataset]:
        """Typed datasets from raw records, with every record checked (labels known, columns present)."""
        raise NotImplementedError

    def tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        raise NotImplementedError

    def drop_columns(self, raw: Dataset) -> list[str]:
        return []

    def labels_of(self, splits: dict[str, Dataset]) -> list[str]:
        return []

    # --- model ---------------------------------------------------------------------------------------------
    def auto_model_class(self) -> type:
        raise NotImplementedError

    def model_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments of the model's forward pass for a collated batch."""
        if is_packed(batch):  # data.pack_examples: position ids alone separate the examples
            return {**packed_model_inputs(batch), **self.forward_kwargs}
        return {**{k: batch[k] for k in self.model_inputs}, **self.forward_kwargs}

    def head(self, data: TaskData) -> dict[str, Any]:
        """Config fields of the model's task head; by default a classifier over the data's labels."""
        return label_head(data.labels)

    def collator(self, train: bool) -> Any:
        raise NotImplementedError

    def augmenter(self, train: Dataset) -> Callable[[dict[str, Any], Any], dict[str, list]]:
        """data.augment: (a training sample's raw_columns, a seeded random.Random) -> a batch of one for
        `tokenize`, from operations set up on the tokenized training split."""
        raise NotImplementedError

    def use_class_weights(self, data: TaskData, device: torch.device) -> dict[str, Any] | None:
        """Set the loss weights of task.class_weights from the training targets (every rank reads the same whole
        training split, so every world size gets the same weights); what was used, for the run dir, or None.
        `balanced`: count(all) / (labels present x count(label)), as scikit-learn's compute_class_weight, so the
        weights average 1 over the training targets and the loss keeps its scale; a label absent from training
        gets 0 (no target carries it). A list: one weight per label, in label id order."""
        setting = self.cfg.task.class_weights
        if setting is None or setting == "none":
            return None
        counts = [0] * len(data.labels)
        for row in data.splits["train"]["labels"] if "train" in data.splits else []:  # streaming: none ahead
            for label in row if isinstance(row, list) else [row]:
                if label != IGNORE:
                    counts[label] += 1
        if setting == "balanced":  # the launcher refuses it with streaming
            total, present = sum(counts), sum(1 for n in counts if n)
            weights = [total / (present * n) if n else 0.0 for n in counts]
        else:
            weights = [float(w) for w in setting]
            if len(weights) != len(data.labels):
                raise ConfigError([f"task.class_weights: expected {len(data.labels)} weights, one per label in id "
                                   f"order {data.labels}, got {len(weights)}"])  # fmt: skip
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        return {"class_weights": setting if isinstance(setting, str) else weights, "labels": list(data.labels),
                "train_counts": counts, "weights": weights}  # fmt: skip

    # --- loss and metrics ----------------------------------------------------------------------------------
    def loss_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum (not mean) of the per-target losses, each times its label's class weight if any: the loop divides
        by the global number of targets (not the sum of weights: the division stays the same on 1 or N ranks)."""
        return F.cross_entropy(
            logits.flatten(0, -2).float(), batch["labels"].flatten(), weight=self.class_weights,
            ignore_index=IGNORE, reduction="sum",
        )  # fmt: skip

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def example_losses(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
        """Each example's (cross-entropy sum over its targets, targets), without class weights: the dev loss of the
        tasks with `dev_loss`, and a language model's predictions."""
        labels = batch["labels"]
        per_target = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE,
                                     reduction="none")  # fmt: skip
        sums = per_target.view(labels.shape[0], -1).sum(1).tolist()
        counts = (labels != IGNORE).view(labels.shape[0], -1).sum(1).tolist()
        return list(zip(sums, counts, strict=True))

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[Any]:
        """One picklable prediction per example of the batch (gathered across ranks by example index)."""
        raise NotImplementedError

    def metrics(self, predictions: dict[int, Any], dataset: Dataset) -> dict[str, float]:
        """The values of `metrics_reported`, from every example's prediction."""
        raise NotImplementedError

    def report(self, predictions: dict[int, Any], dataset: Dataset) -> dict[str, Any]:
        """Detailed report for `distrain eval`: the metrics, plus per-class rows under "classes" if any."""
        return self.metrics(predictions, dataset)

    def write_predictions(self, predictions: dict[int, Any], dataset: Dataset, path: Path) -> Path | None:
        """Write the predictions next to the report; return the file, or None when the task has none."""
        return None

    # --- inference (distrain predict) ----------------------------------------------------------------------
    def check_input(self, line: str) -> str | None:
        """Why `distrain predict` cannot take this input line, or None."""
        return None

    def text_tagger(
        self, model: torch.nn.Module, env: DistEnv, options: DictConfig | None = None
    ) -> Callable[..., list[Any]] | None:
        """`distrain predict`'s runner (texts, batch_size=...) -> one output per text, when the task has its own;
        None: the transformers pipeline of `pipeline_task`. `options`: predict's settings (generation)."""
        return None

    def raw_text_report(
        self, model: torch.nn.Module, dataset: Dataset, batch_size: int, env: DistEnv, options: DictConfig
    ) -> dict[str, Any]:
        """Scores of the raw-text path (predict, the export's pipeline) that `distrain eval` adds to its report;
        `options`: eval's settings (ner: aggregation; chat: max_new_tokens)."""
        return {}

    card_example: ClassVar[str] = "Paris is the capital of France."  # the model card's example input

    def finish_export(self, folder: Path) -> None:
        """Add the task's own settings to an export folder (a plain Hugging Face model folder)."""

    def card_usage(self) -> str:
        """The model card's "Use it" section (trainer/export/model_card.py writes the rest)."""
        return (f'```python\nfrom transformers import pipeline\n\nrunner = pipeline("{self.pipeline_task}", '
                f'model="<this folder>")\nrunner({self.card_example!r})\n```\n\nOr `distrain predict '
                "ckpt=<this folder> input=FILE`: one JSON line per input line.")  # fmt: skip

    def pipeline_kwargs(self, options: DictConfig) -> dict[str, Any]:
        """Arguments of transformers.pipeline(...) for `distrain predict`."""
        return {}

    def generation_kwargs(self, options: DictConfig) -> dict[str, Any]:
        """Arguments of each pipeline call (generation settings for causal LMs)."""
        return {}

    def format_prediction(self, text: str, output: Any) -> dict[str, Any]:
        raise NotImplementedError


def source_key(data: DictConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """What identifies the raw data: the contents of its files, or the Hub dataset and revision."""
    if data.dir is None:
        return {"hub": data.hub_name, "config": data.hub_config, "revision": data.hub_revision,
                "splits": dict(data.hub_splits)}  # fmt: skip
    digests = {}
    for split, paths in source_files(data, skip).items():
        files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
        root = resolve_path(data.dir)
        listing = [(str(f.relative_to(root)), file_digest(f)) for f in files]
        digests[split] = hashlib.sha256(repr(listing).encode()).hexdigest()
    return {
        "format": data.format,
        "files": digests,
        "split": dict(data.split) if data.split is not None else None,
        "split_seed": data.split_seed,
        "text_unit": data.text_unit,
        "columns": [data.text_column, data.label_column, data.tokens_column, data.tags_column],
        "labels": list(data.labels) if data.labels is not None else None,
    }


def mean_loss(losses: dict[int, tuple[float, int]]) -> float:
    """The cross-entropy per target over every example's (loss sum, targets) (the train loss's normalisation)."""
    targets = sum(count for _, count in losses.values())
    return sum(total for total, _ in losses.values()) / max(targets, 1)
