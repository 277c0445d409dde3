"""Weighted mixtures of training sources (data.mixture), in both data modes.

Each source is a data config of its own (its files or Hub dataset, format and column names; the rest from data.*).
Streaming (trainer/data/streaming.py) draws a source by weight for every sample that enters its shuffle buffer.
Map mode tokenizes each source into its own cache entry (LM packing per source: no block spans two sources), then
`mix` interleaves them by weight with the seed (datasets' `interleave_datasets`, `all_exhausted`: the draws go on
until every source has been used whole, sources that run out earlier start over). The result is one fixed dataset
whose epoch is those draws; GlobalBatchSampler shuffles and cuts it as any training set, so the samples of a step
depend on the seed and the step only, and `SourceCounts` recomputes how many samples each source gave up to a step
from the same global batches: nothing to store in a checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig, OmegaConf

from distrain.trainer.data.sampler import GlobalBatchSampler
from distrain.trainer.data.sources import Record
from distrain.trainer.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

COLUMNS = ("text_column", "label_column", "tokens_column", "tags_column")
SOURCE_COLUMN = "source"  # map mode: the index of each training sample's source


def train_sources(data: DictConfig) -> list[tuple[str, float, DictConfig]]:
    """(name, weight, data config of the source) of each training source: data.mixture, else data itself."""
    if not data.mixture:
        return [("train", 1.0, data)]
    base = OmegaConf.to_container(data, resolve=True)
    base.pop("mixture")
    out = []
    for index, source in enumerate(data.mixture):
        own = {k: v for k, v in OmegaConf.to_container(source, resolve=True).items() if v is not None}
        cfg = OmegaConf.create({**base, "files": {"train": own.get("files")}})
        cfg.hub_splits = {"train": source.hub_split}
        for key in ("dir", "format", "text_unit", "hub_name", "hub_config", "hub_revision"):
            cfg[key] = own.get(key)
        cfg.columns = {own[key]: data[key] for key in COLUMNS if key in own}  # the source's name -> data.*'s
        cfg.column_keys = {own[key]: f"data.mixture[{index}].{key}" for key in COLUMNS if key in own}  # for errors
        cfg.format = cfg.format or data.format
        cfg.text_unit = cfg.text_unit or data.text_unit
        out.append((source.name, float(source.weight), cfg))
    return out


def renamed(record: Record, columns: dict[str, str], keys: dict[str, str]) -> Record:
    """A source's record with its own column names replaced by data.*'s; a DataError naming the source's key
    (`keys`: its column name -> data.mixture[i].<key>) when the record lacks one."""
    if not columns:
        return record
    for name in columns:
        if name not in record.fields:
            raise DataError(f"{record.where}: no column {name!r} ({keys.get(name, 'data.mixture')}); the record has "
                            f"{sorted(record.fields)}")  # fmt: skip
    return Record({columns.get(k, k): v for k, v in record.fields.items()}, record.where)


def source_columns(data: DictConfig) -> tuple[dict[str, str], dict[str, str]]:
    """A mixture source's column renaming and the keys that set it (train_sources), or two empty dicts."""
    columns = dict(OmegaConf.select(data, "columns", default=None) or {})
    return columns, dict(OmegaConf.select(data, "column_keys", default=None) or {})


def mix(parts: list[Dataset], weights: list[float], seed: int) -> Dataset:
    """One training set drawn from the tokenized sources by weight with `seed`, each row tagged with its source."""
    from datasets import interleave_datasets

    tagged = [part.add_column(SOURCE_COLUMN, [i] * len(part)) for i, part in enumerate(parts)]
    total = sum(weights)
    return interleave_datasets(tagged, probabilities=[w / total for w in weights], seed=seed,
                               stopping_strategy="all_exhausted")  # fmt: skip


class SourceCounts:
    """Samples each source contributed to training after a step, from the sampler's global batches (the same on
    every rank and world size), so a resumed run counts what the uninterrupted one did."""

    def __init__(self, names: list[str], sources: list[int], sampler: GlobalBatchSampler):
        self.names, self.sources, self.sampler = names, np.asarray(sources), sampler
        self.full_epochs, self.full = 0, np.zeros(len(names), dtype=np.int64)  # counts of the epochs completed
        self.epoch, self.cumulative = -1, None  # one epoch's counts after each of its steps

    def _within(self, epoch: int) -> np.ndarray:
        if epoch != self.epoch:
            per_step = self.sources[np.asarray(self.sampler.global_batches(epoch))]  # steps x global batch
            self.epoch = epoch
            self.cumulative = (per_step[..., None] == np.arange(len(self.names))).sum(1).cumsum(0)
        return self.cumulative

    def at(self, step: int) -> dict[str, int]:
        epoch, within = divmod(step, self.sampler.steps_per_epoch)
        while self.full_epochs < epoch:
            self.full += self._within(self.full_epochs)[-1]
            self.full_epochs += 1
        counts = self.full + (self._within(epoch)[within - 1] if within else 0)
        return {name: int(count) for name, count in zip(self.names, counts, strict=True)}
