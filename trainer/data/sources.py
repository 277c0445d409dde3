"""Raw records from where the data lives: local files (conll, jsonl, csv, text, folders of classes) or the Hub.

Every reader is strict and says where a problem is: the file and line (or the data.* key) and what was expected.
Records are plain dicts; the task picks its fields (e.g. `tokens`/`tags`, `text`/`label`) by the data.* columns.
Either each split has its own files (`data.files.train`, `.dev`, `.test`), or one set of files (`data.files.all`)
is cut into train/dev/test by `data.split` fractions with a fixed seed.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distrain.trainer.config.paths import resolve_path
from distrain.trainer.config.schema import DataFormat, TextUnit
from distrain.trainer.data.conll import read_conll
from distrain.trainer.errors import DataError

log = logging.getLogger(__name__)
# Formats a stream reads record by record (data.streaming); the others are read whole.
STREAM_FORMATS = (DataFormat.jsonl.value, DataFormat.csv.value, DataFormat.text.value)


@dataclass
class Record:
    fields: dict[str, Any]
    where: str  # "file:line" (or "file", or "hub[split] row N") for error messages


def matching_paths(data: DictConfig, pattern: str) -> list[Path]:
    """What one data.files entry names inside data.dir: the files its glob matches, or (format folders) the
    folder of class folders; empty when nothing of that kind exists."""
    target = resolve_path(data.dir) / pattern
    if data.format == "folders":
        return [target] if target.is_dir() else []
    return sorted(p for p in map(Path, glob.glob(str(target))) if p.is_file())


def source_files(data: DictConfig, skip: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """The files of each split key in data.files (globs allowed, `skip`ped splits left out), relative to data.dir."""
    out = {}
    for split, pattern in data.files.items():
        if split in skip:
            continue
        out[split] = matching_paths(data, pattern)
        if not out[split]:
            raise DataError(f"data.files.{split}: nothing matches {resolve_path(data.dir) / pattern}")
    return out


def read_text_file(path: Path) -> str:
    """UTF-8, or Windows-1252 for files that are not (old corpora mix them); never silently mangled."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; read as Windows-1252", path)
        return raw.decode("cp1252", errors="replace")


def _decode(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s:%d is not UTF-8; read as Windows-1252", path, number)
        return raw.decode("cp1252", errors="replace")


def iter_records(
    path: Path, data: DictConfig, start: tuple[int, int] = (0, 0)
) -> Iterator[tuple[Record, tuple[int, int]]]:
    """The records of a jsonl, csv or text file from `start` (byte offset, lines read) on, each with the position
    just after it: what streaming stores in a checkpoint to continue from that record without re-reading."""
    if data.format == "text" and data.text_unit == TextUnit.file:
        text = read_text_file(path) if start[0] == 0 else ""
        if text.strip():
            yield Record({"text": text}, str(path)), (path.stat().st_size, 0)
        return
    with open(path, "rb") as f:
        offset, number = start
        if data.format == "csv":
            header_line = f.readline()
            header = next(csv.reader([_decode(header_line, path, 1)]), [])
            if offset == 0:
                offset, number = f.tell(), 1
        f.seek(offset)

        def lines() -> Iterator[str]:
            nonlocal number
            while raw := f.readline():
                number += 1
                yield _decode(raw, path, number)

        if data.format == "csv":
            for row in csv.reader(lines()):
                if not row:
                    continue
                if len(row) > len(header):
                    raise DataError(f"{path}:{number}: more values than the {len(header)} header columns")
                fields = {name: row[i] if i < len(row) else None for i, name in enumerate(header)}
                yield Record(fields, f"{path}:{number}"), (f.tell(), number)
            return
        paragraph: list[str] = []
        first = 0
        for line in lines():
            line = line.rstrip("\r\n")
            if data.format in ("jsonl", "chat"):  # chat: a JSON conversation per line (trainer/data/chat.py)
                if line.strip():
                    yield _jsonl_record(path, number, line), (f.tell(), number)
            elif data.text_unit == TextUnit.line:
                if line.strip():
                    yield Record({"text": line}, f"{path}:{number}"), (f.tell(), number)
            elif line.strip():  # paragraphs: blank-line separated
                first = first if paragraph else number
                paragraph.append(line)
            elif paragraph:
                yield Record({"text": "\n".join(paragraph)}, f"{path}:{first}"), (f.tell(), number)
                paragraph = []
        if paragraph:
            yield Record({"text": "\n".join(paragraph)}, f"{path}:{first}"), (f.tell(), number)


def _jsonl_record(path: Path, number: int, line: str) -> Record:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number}: not a JSON object ({error.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
    return Record(row, f"{path}:{number}")


def _read_folders(folder: Path) -> list[Record]:
    """`<folder>/<class>/*.txt`: one record per file, the class from its folder's name."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if not classes:
        raise DataError(f"{folder}: expected one sub-folder per class, found none")
    records = []
    for class_dir in classes:
        for path in sorted(class_dir.glob("*.txt")):
            records.append(Record({"text": read_text_file(path), "label": class_dir.name}, str(path)))
    return records


def read_file(path: Path, data: DictConfig) -> list[Record]:
    if data.format == "conll":
        return [Record({"tokens": s.tokens, "tags": s.tags, "lines": s.lines}, f"{path}:{s.lines[0]}")
                for s in read_conll(path)]  # fmt: skip
    if data.format == "folders":
        records = _read_folders(path)
    else:
        records = [record for record, _ in iter_records(path, data)]
    if not records:
        raise DataError(f"{path}: no records (empty file?)")
    return records


def _split(records: list[Record], fractions: DictConfig, seed: int) -> dict[str, list[Record]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_train = round(fractions["train"] * len(order))
    n_dev = round(fractions["dev"] * len(order))
    cuts = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}
    return {split: [records[i] for i in idx] for split, idx in cuts.items()}


def read_splits(data: DictConfig, skip: tuple[str, ...] = ()) -> dict[str, list[Record]]:
    """Records of every split (but the `skip`ped ones), from local files or (with data.dir null) the Hub."""
    if data.dir is None:
        return {split: records for split, records in _read_hub(data).items() if split not in skip}
    files = source_files(data, skip)
    splits = {split: [r for path in paths for r in read_file(path, data)] for split, paths in files.items()}
    if data.split is not None:
        splits = _split(splits["all"], data.split, data.split_seed)
    for split, records in splits.items():
        if not records:
            raise DataError(f"data.split: the {split} split is empty ({len(records)} records); adjust the fractions")
    return splits


def _read_hub(data: DictConfig) -> dict[str, list[Record]]:
    from datasets import load_dataset

    try:
        hub = load_dataset(data.hub_name, data.hub_config, revision=data.hub_revision)
    except Exception as error:
        raise DataError(
            f"data.dir is not set and the Hub dataset data.hub_name={data.hub_name!r} could not be loaded "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]}). Set data.dir=<folder with the files>"
            + (", or train on the bundled data with +experiment=wnut_ner" if data.format == "conll" else "")
        ) from None
    out = {}
    for split, hub_split in data.hub_splits.items():
        if hub_split not in hub:
            raise DataError(f"data.hub_splits.{split}: {data.hub_name} has no split {hub_split!r} ({list(hub)})")
        rows = hub[hub_split]
        names = class_names(rows.features)
        out[split] = [Record(named(row, names), f"{data.hub_name}[{hub_split}] row {number}")
                      for number, row in enumerate(rows)]  # fmt: skip
    return out


def class_names(features: Any) -> dict[str, list[str]]:
    """The class names of each ClassLabel column (or list of ClassLabel) of a Hub dataset's features."""
    from datasets import ClassLabel, List

    names = {}
    for column, feature in (features or {}).items():
        if isinstance(feature, ClassLabel):
            names[column] = feature.names
        elif isinstance(feature, List) and isinstance(feature.feature, ClassLabel):
            names[column] = feature.feature.names
    return names


def named(row: dict[str, Any], names: dict[str, list[str]]) -> dict[str, Any]:
    """A Hub row with class ids replaced by their names, as in local files."""
    for column, labels in names.items():
        value = row[column]
        row[column] = [labels[v] for v in value] if isinstance(value, list) else labels[value]
    return row


def column(record: Record, key: str, name: str) -> Any:
    """The value of column `name` (set by data.<key>), or an error naming the record and the key."""
    if name not in record.fields:
        raise DataError(f"{record.where}: no column {name!r} (data.{key}); the record has {sorted(record.fields)}")
    value = record.fields[name]
    if value is None:  # JSON null, or a CSV row shorter than its header: not a label or text called "None"
        raise DataError(f"{record.where}: column {name!r} (data.{key}) has no value (null, or a CSV row with fewer "
                        "values than the header)")  # fmt: skip
    return value
