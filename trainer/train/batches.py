"""Where each step's micro-batches come from: map-style data through the global batch sampler, or the training
stream (`data.streaming`). The one place that knows which; the loop asks for the batches of its step on.

What fixes the order of the data (the global batch, the seed, length grouping, the training samples) is stored in
every checkpoint, so a resume that would silently train on other batches is refused, naming what changed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer.data.augment import AugmentingCollator
from distrain.trainer.data.loaders import train_loader
from distrain.trainer.data.mixture import SOURCE_COLUMN, SourceCounts
from distrain.trainer.data.sampler import GlobalBatchSampler
from distrain.trainer.data.streaming import TrainStream
from distrain.trainer.errors import UserError
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks import Task, TaskData

MicroBatches = list[dict[str, torch.Tensor]]

# What each entry of the data order means, for the message of a refused resume.
ORDER_KEYS = {
    "global_batch": "train.micro_batch_size x train.grad_accum_steps x data-parallel processes",
    "seed": "train.seed",
    "group_by_length": "data.group_by_length",
    "train_samples": "the training samples (data.*: files, max_train_samples, max_length)",
    "lengths_sha256": "the tokenized training samples (data.* or the tokenizer)",
    "sources": "data.mixture / the data source",
    "shuffle_buffer": "data.shuffle_buffer",
    "augment": "data.augment",
    "augment_p": "data.augment_p",
}


class DataOrderChanged(UserError):
    """A resume would train on other batches than the checkpointed run; the message names what changed."""


def config_order(cfg: DictConfig, dp_size: int) -> dict[str, Any]:
    """The part of the data order the config alone fixes (the launcher checks it before any worker starts)."""
    order = {"global_batch": cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp_size, "seed": cfg.train.seed}
    if cfg.data.streaming:
        return order | {"shuffle_buffer": cfg.data.shuffle_buffer}
    return order | {"group_by_length": cfg.data.group_by_length}


def order_problems(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each entry of the data order known to both that differs: its keys, the checkpoint's value and this run's."""
    return [
        f"{ORDER_KEYS.get(key, key)}: the checkpoint has {saved[key]!r}, this run {current[key]!r}"
        for key in saved
        if key in current and saved[key] != current[key]
    ]


def reorder_message(where: str, problems: list[str], run_dir: Any) -> str:
    return (
        f"cannot resume {where}: it was trained on another order of the data, which this run would not continue "
        "(another number of processes with the same global batch is fine).\n"
        + "\n".join(f"  - {p}" for p in problems)
        + "\nRerun with the checkpoint's values, or start a new run dir that warm-starts from its weights: "
        f"checkpoint.init_from={run_dir} run.dir=<new dir>"
    )


def refuse_reorder(saved: dict[str, Any] | None, current: dict[str, Any], where: str, run_dir: Any) -> None:
    """Raise DataOrderChanged when the checkpoint's data order differs from this run's (None: a checkpoint from
    before orders were recorded, nothing to compare)."""
    problems = order_problems(saved, current) if saved else []
    if problems:
        raise DataOrderChanged(reorder_message(where, problems, run_dir))


class BatchSource:
    def __init__(self, cfg: DictConfig, task: Task, data: TaskData, env: DistEnv):
        t = cfg.train
        self.accum = t.grad_accum_steps
        self.num_workers = cfg.data.num_workers
        self.collate = task.collator(train=True)
        self.stream: TrainStream | None = None
        self.source_counts: SourceCounts | None = None  # map mode with data.mixture
        self.stream_state: dict[str, Any] | None = None  # streaming: the position after the last step taken
        self.order = config_order(cfg, env.dp_size)
        if cfg.data.streaming:
            self.stream = TrainStream(task, t.micro_batch_size, t.grad_accum_steps, env.dp_rank, env.dp_size,
                                      self.collate)  # fmt: skip
            self.stream_state = self.stream.state
            self.steps_per_epoch: int | None = None  # unsized: epochs are counted when the stream wraps
            self.order["sources"] = [name for name, _, _ in self.stream.sources]
            return
        columns = list(task.loader_columns)
        if cfg.data.augment:  # re-tokenizes augmented raw columns each epoch (trainer/data/augment.py)
            augment = task.augmenter(data.splits["train"])
            self.collate = AugmentingCollator(task, self.collate, augment, t.seed)
            columns += task.raw_columns
            self.order |= {"augment": list(cfg.data.augment), "augment_p": cfg.data.augment_p}
        lengths = list(data.splits["train"]["length"])
        self.sampler = GlobalBatchSampler(lengths, micro_batch_size=t.micro_batch_size, grad_accum_steps=self.accum,
                                          dp_rank=env.dp_rank, dp_size=env.dp_size, seed=t.seed,
                                          group_by_length=cfg.data.group_by_length)  # fmt: skip
        self.loader = train_loader(data.splits["train"], self.collate, columns, self.sampler,
                                   self.num_workers)  # fmt: skip
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if cfg.data.mixture:
            names = [source.name for source in cfg.data.mixture]
            self.source_counts = SourceCounts(names, data.splits["train"][SOURCE_COLUMN], self.sampler)
        digest = hashlib.sha256(torch.tensor(lengths, dtype=torch.int64).numpy().tobytes()).hexdigest()
        self.order |= {"train_samples": len(lengths), "lengths_sha256": digest}

    def batches(self, step: int) -> Iterator[MicroBatches]:
        """The micro-batches of each step from step `step` on, epoch after epoch."""
        if self.stream is not None:
            for item in self.stream.loader(self.num_workers):
                self.stream_state = item["state"]  # the position after this step: what its checkpoint stores
                yield item["micro_batches"]
            return
        while True:
            epoch, start = divmod(step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start)
            if hasattr(self.collate, "set_epoch"):  # e.g. MLM masking draws per epoch
                self.collate.set_epoch(epoch)
            batches = iter(self.loader)
            for _ in range(start, self.steps_per_epoch):
                yield [next(batches) for _ in range(self.accum)]
            step = (epoch + 1) * self.steps_per_epoch

    def epoch(self, step: int) -> float:
        """Epochs done: fractional in map mode; completed passes when streaming."""
        if self.stream is not None:
            return self.stream.epoch(self.stream_state)
        return step / self.steps_per_epoch

    def samples_by_source(self, step: int) -> dict[str, int] | None:
        """The samples each source of a mixture (or stream) gave so far; the same global count on every rank."""
        if self.stream is not None:
            return self.stream.counts(self.stream_state)
        return self.source_counts.at(step) if self.source_counts is not None else None

    # --- checkpointed state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"data_order": self.order, **({"data": self.stream_state} if self.stream is not None else {})}

    def check_resume(self, state: dict[str, Any], where: str, run_dir: Any) -> None:
        refuse_reorder(state.get("data_order"), self.order, where, run_dir)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stream is not None:
            if "data" not in state:
                raise UserError("the checkpoint holds no stream position: a run without data.streaming wrote it")
            self.stream.load_state_dict(state["data"])
            self.stream_state = state["data"]
