"""Streaming training data (data.streaming=true): records are read, tokenized and packed on the fly, nothing is
cached, memory stays flat in the corpus size.

The stream is global: every rank reads the same records in the same order (the files of each source in a seeded
order per epoch, a source's epoch ending when it wraps), and a seeded shuffle buffer draws the samples; each global
batch is cut like GlobalBatchSampler's, each data-parallel rank collating its own contiguous share. So the samples of
step N depend on the seed and N only, not on the number of processes.

With data.mixture, each sample that enters the buffer comes from a source drawn by weight (seeded), and the counts of
samples each source contributed to training are kept.

The whole position is a small state, yielded with every step and stored in each checkpoint: per source its epoch,
file and byte offset (a Hub stream: datasets' own state_dict), the samples tokenized but not yet in the buffer, the
buffer's contents, the random generator's state and the counts. A resumed run seeks to the stored offsets and
continues with the stored buffer: it draws exactly the samples the uninterrupted run drew, without replaying.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer.data.mixture import renamed, source_columns, train_sources
from distrain.trainer.data.sources import Record, class_names, iter_records, matching_paths, named
from distrain.trainer.errors import DataError

CHUNK = 64  # records tokenized together (LM packing drops each chunk's last partial block, as map mode per batch)


class SourceReader:
    """The records of one source for ever, from a position: its files in a seeded order per epoch."""

    def __init__(self, cfg: DictConfig, seed: int, state: dict[str, Any]):
        self.cfg, self.seed, self.state = cfg, seed, dict(state)
        self.paths = [] if cfg.dir is None else matching_paths(cfg, cfg.files["train"])
        self.columns, self.column_keys = source_columns(cfg)

    def records(self) -> Iterator[Record]:
        read_any = False
        while True:
            if self.cfg.dir is None:
                yield from self._hub()
            else:
                order = list(self.paths)
                random.Random(self.seed * 1_000_003 + self.state["epoch"]).shuffle(order)
                while self.state["file"] < len(order):
                    path = order[self.state["file"]]
                    for record, position in iter_records(path, self.cfg, (self.state["offset"], self.state["line"])):
                        self.state["offset"], self.state["line"] = position
                        read_any = True
                        yield renamed(record, self.columns, self.column_keys)
                    self.state.update(file=self.state["file"] + 1, offset=0, line=0)
            if not read_any:
                raise DataError(f"data.files.train: no records in {[str(p) for p in self.paths]} (empty files?)")
            self.state.update(epoch=self.state["epoch"] + 1, file=0, offset=0, line=0, hub=None)

    def _hub(self) -> Iterator[Record]:
        """A Hub dataset through datasets' streaming, its position by its own state_dict (shard and row)."""
        from datasets import load_dataset

        cfg = self.cfg
        rows = load_dataset(cfg.hub_name, cfg.hub_config, revision=cfg.hub_revision, split=cfg.hub_splits["train"],
                            streaming=True)  # fmt: skip
        rows = rows.shuffle(seed=self.seed + self.state["epoch"], buffer_size=1)  # seeded shard order only
        if self.state.get("hub"):
            rows.load_state_dict(self.state["hub"])
        names = class_names(rows.features)
        for number, row in enumerate(rows):
            self.state["hub"] = rows.state_dict()
            where = f"{cfg.hub_name}[{cfg.hub_splits['train']}] row {number}"
            yield renamed(Record(named(row, names), where), self.columns, self.column_keys)


def first_records(data: DictConfig, seed: int, count: int) -> list[Record]:
    """The first `count` records of each training source, in the stream's order (a tokenizer's training sample)."""
    out = []
    for i, (_, _, cfg) in enumerate(train_sources(data)):
        reader = SourceReader(cfg, source_seed(seed, i), {"epoch": 0, "file": 0, "offset": 0, "line": 0, "hub": None})
        records = reader.records()
        out += [record for _, record in zip(range(count), records, strict=False)]
        records.close()
    return out


def source_seed(seed: int, index: int) -> int:
    return seed * 7919 + index


def _identity(item: Any) -> Any:
    return item


class TrainStream(torch.utils.data.IterableDataset):
    """Yields, per global step, {"micro_batches": this rank's collated micro-batches, "state": the stream's
    position after the step}. Run in a DataLoader worker (data.num_workers=1) or in the training process."""

    def __init__(self, task: Any, micro: int, accum: int, dp_rank: int, dp_size: int, collate: Any):
        data = task.cfg.data
        self.task, self.collate = task, collate
        self.micro, self.accum, self.dp_rank, self.dp_size = micro, accum, dp_rank, dp_size
        self.seed, self.buffer_size = task.cfg.train.seed, data.shuffle_buffer
        self.sources = train_sources(data)
        self.columns = list(task.loader_columns)
        self.state = self.initial_state()

    def initial_state(self) -> dict[str, Any]:
        return {
            "sources": [{"epoch": 0, "file": 0, "offset": 0, "line": 0, "hub": None} for _ in self.sources],
            "pending": [[] for _ in self.sources],  # tokenized samples of each source not yet in the buffer
            "buffer": [],  # [source index, sample]
            "rng": None,
            "counts": [0 for _ in self.sources],  # samples each source contributed to training
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise DataError(
                f"data.mixture: the checkpoint's stream has {len(state['sources'])} sources, this config "
                f"{len(self.sources)}; resume with the sources it was trained with"
            )
        self.state = state

    def loader(self, num_workers: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self, batch_size=None, collate_fn=_identity, num_workers=num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        state = self.state
        readers = [SourceReader(cfg, source_seed(self.seed, i), state["sources"][i])
                   for i, (_, _, cfg) in enumerate(self.sources)]  # fmt: skip
        streams = [reader.records() for reader in readers]
        pending = [list(p) for p in state["pending"]]
        buffer = [list(entry) for entry in state["buffer"]]
        counts = list(state["counts"])
        rng = random.Random(self.seed)
        if state["rng"] is not None:
            version, internal, gauss = state["rng"]
            rng.setstate((version, tuple(internal), gauss))
        weights = [weight for _, weight, _ in self.sources]

        def next_sample() -> list[Any]:
            source = rng.choices(range(len(weights)), weights)[0] if len(weights) > 1 else 0
            while not pending[source]:
                chunk = [record for _, record in zip(range(CHUNK), streams[source], strict=False)]
                pending[source] = self.task.stream_samples(chunk)
            return [source, pending[source].pop(0)]

        global_batch = self.micro * self.accum * self.dp_size
        share = self.micro * self.accum
        while True:
            while len(buffer) < self.buffer_size:
                buffer.append(next_sample())
            drawn = []
            for _ in range(global_batch):
                slot = rng.randrange(len(buffer))
                drawn.append(buffer[slot])
                buffer[slot] = next_sample()
            for source, _ in drawn:
                counts[source] += 1
            mine = [sample for _, sample in drawn[self.dp_rank * share : (self.dp_rank + 1) * share]]
            if hasattr(self.collate, "set_epoch"):  # MLM masks are drawn per epoch (the first source's)
                self.collate.set_epoch(readers[0].state["epoch"])
            micro_batches = [
                self.collate([{k: s[k] for k in self.columns} for s in mine[m * self.micro : (m + 1) * self.micro]])
                for m in range(self.accum)
            ]
            version, internal, gauss = rng.getstate()
            yield {
                "micro_batches": micro_batches,
                "state": {
                    "sources": [dict(reader.state) for reader in readers],
                    "pending": [list(p) for p in pending],
                    "buffer": [list(entry) for entry in buffer],
                    "rng": [version, list(internal), gauss],
                    "counts": list(counts),
                },
            }

    def epoch(self, state: dict[str, Any]) -> int:
        """Completed passes over the first source (over the data, without a mixture)."""
        return state["sources"][0]["epoch"]

    def counts(self, state: dict[str, Any]) -> dict[str, int]:
        return {name: count for (name, _, _), count in zip(self.sources, state["counts"], strict=True)}
