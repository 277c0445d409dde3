"""Named-entity recognition: CoNLL files or a Hub dataset -> first-sub-word labels -> seqeval entity metrics."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from distrain.trainer.conll import Sentence, check_labels, label_list, read_conll
from distrain.trainer.data import cached_splits, file_digest, tokenizer_fingerprint
from distrain.trainer.distributed import DistEnv
from distrain.trainer.errors import DataError
from distrain.trainer.paths import resolve_path
from distrain.trainer.tasks import Task, TaskData

log = logging.getLogger(__name__)
IGNORE = -100  # label of special tokens and of every sub-word after a word's first


class NerTask(Task):
    name = "ner"
    pipeline_task = "token-classification"

    def prepare(self, env: DistEnv) -> TaskData:
        data = self.cfg.data
        key = {
            "source": self._source_key(),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "max_length": data.max_length,
        }
        splits = cached_splits(data.cache_dir, "ner", key, self._build, env)
        labels = splits["train"].features["tags"].feature.names
        limits = {"train": data.max_train_samples}
        for split, dataset in splits.items():
            limit = limits.get(split, data.max_eval_samples)
            if limit is not None and limit < len(dataset):
                splits[split] = dataset.select(range(limit))
        return TaskData(splits=splits, labels=labels)

    def auto_model_class(self) -> type:
        return AutoModelForTokenClassification

    def collator(self) -> Any:
        return DataCollatorForTokenClassification(self.tokenizer, label_pad_token_id=IGNORE)

    def loss_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def num_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        """Predicted label ids at each word's first sub-word, in word order."""
        predicted = logits.argmax(-1).cpu()
        labels = batch["labels"].cpu()
        return [row[mask].tolist() for row, mask in zip(predicted, labels != IGNORE, strict=True)]

    # --- metrics -------------------------------------------------------------------------------------------
    def tag_sequences(self, predictions: dict[int, list[int]], dataset: Dataset) -> tuple[list, list]:
        """Gold and predicted tags for every word of every sentence. A word the model never saw (cut by
        data.max_length, or with no sub-word) counts as predicted `O`, so nothing is dropped from the gold."""
        names = dataset.features["tags"].feature.names
        gold, pred = [], []
        for index in sorted(predictions):
            example = dataset[index]
            tags = ["O"] * len(example["tokens"])
            for word, label in zip(example["word_index"], predictions[index], strict=True):
                tags[word] = names[label]
            gold.append([names[t] for t in example["tags"]])
            pred.append(tags)
        return gold, pred

    def metrics(self, predictions: dict[int, list[int]], dataset: Dataset) -> dict[str, float]:
        gold, pred = self.tag_sequences(predictions, dataset)
        return {
            "f1": float(f1_score(gold, pred, zero_division=0)),
            "precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "accuracy": float(accuracy_score(gold, pred)),
        }

    def report(self, predictions: dict[int, list[int]], dataset: Dataset) -> dict[str, Any]:
        gold, pred = self.tag_sequences(predictions, dataset)
        rows = classification_report(gold, pred, output_dict=True, zero_division=0)
        return {
            **self.metrics(predictions, dataset),
            "classes": {name: {k: float(v) for k, v in row.items()} for name, row in rows.items()},
        }

    def write_predictions(self, predictions: dict[int, list[int]], dataset: Dataset, path: str) -> None:
        """CoNLL-style `token gold predicted` lines, a blank line between sentences (for conlleval or a diff)."""
        gold, pred = self.tag_sequences(predictions, dataset)
        with open(path, "w", encoding="utf-8") as out:
            for index, g, p in zip(sorted(predictions), gold, pred, strict=True):
                for token, gt, pt in zip(dataset[index]["tokens"], g, p, strict=True):
                    out.write(f"{token} {gt} {pt}\n")
                out.write("\n")

    # --- data ----------------------------------------------------------------------------------------------
    def _source_key(self) -> dict[str, Any]:
        data = self.cfg.data
        if data.dir is None:
            return {
                "hub": data.hub_name,
                "splits": dict(data.hub_splits),
                "columns": [data.tokens_column, data.tags_column],
            }
        folder = resolve_path(data.dir)
        return {
            "files": {split: file_digest(folder / name) for split, name in data.files.items()},
            "split": dict(data.split) if data.split is not None else None,
            "split_seed": data.split_seed,
        }

    def _read(self) -> tuple[dict[str, list[Sentence]], dict[str, str]]:
        """Sentences per split and where each split came from (for error messages)."""
        data = self.cfg.data
        if data.dir is None:
            return self._read_hub()
        folder = resolve_path(data.dir)
        if data.split is None:
            sources = {split: str(folder / name) for split, name in data.files.items()}
            return {split: read_conll(path) for split, path in sources.items()}, sources
        path = folder / data.files["all"]
        sentences = read_conll(path)
        order = list(range(len(sentences)))
        random.Random(data.split_seed).shuffle(order)
        n_train = round(data.split["train"] * len(order))
        n_dev = round(data.split["dev"] * len(order))
        cuts = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}
        return {split: [sentences[i] for i in idx] for split, idx in cuts.items()}, dict.fromkeys(cuts, str(path))

    def _read_hub(self) -> tuple[dict[str, list[Sentence]], dict[str, str]]:
        from datasets import load_dataset

        data = self.cfg.data
        try:
            hub = load_dataset(data.hub_name)
        except Exception as error:
            raise DataError(
                f"data.dir is not set and the Hub dataset data.hub_name={data.hub_name!r} could not be loaded "
                f"({type(error).__name__}: {error}). Set data.dir=<folder with {', '.join(data.files.values())}>, "
                "or train on the bundled data with +experiment=wnut_ner"
            ) from None
        out, sources = {}, {}
        for split, hub_split in data.hub_splits.items():
            if hub_split not in hub:
                raise DataError(f"data.hub_splits.{split}: the Hub dataset has no split {hub_split!r} ({list(hub)})")
            rows = hub[hub_split]
            for column in (data.tokens_column, data.tags_column):
                if column not in rows.column_names:
                    key = "data.tokens_column" if column == data.tokens_column else "data.tags_column"
                    raise DataError(
                        f"{key}: {data.hub_name}[{hub_split}] has no column {column!r} ({rows.column_names})"
                    )
            names = rows.features[data.tags_column].feature.names
            out[split] = [
                Sentence(tokens=row[data.tokens_column], tags=[names[t] for t in row[data.tags_column]])
                for row in rows
                if row[data.tokens_column]
            ]
            sources[split] = f"{data.hub_name}[{hub_split}]"
        return out, sources

    def _build(self, folder: Path) -> None:
        splits, sources = self._read()
        everything = [s for sentences in splits.values() for s in sentences]
        labels = label_list(everything if self.cfg.data.split is not None else splits["train"])
        for split, sentences in splits.items():
            check_labels(sentences, labels, sources[split])
        label_ids = {label: i for i, label in enumerate(labels)}
        features = Features({"tokens": Sequence(Value("string")), "tags": Sequence(ClassLabel(names=labels))})
        for split, sentences in splits.items():
            raw = Dataset.from_dict(
                {"tokens": [s.tokens for s in sentences], "tags": [[label_ids[t] for t in s.tags] for s in sentences]},
                features=features,
            )
            tokenized = raw.map(
                self._tokenize,
                batched=True,
                cache_file_name=str(folder / f"{split}.arrow"),
                desc=f"Tokenizing {split}",
            )
            words = sum(len(s.tokens) for s in sentences)
            unseen = words - sum(len(w) for w in tokenized["word_index"])
            if unseen:
                log.warning(
                    "%s: %d of %d words of the %s split are beyond data.max_length=%d sub-words or have none; "
                    "they are predicted as O",
                    sources[split],
                    unseen,
                    words,
                    split,
                    self.cfg.data.max_length,
                )

    def _tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        encoded = self.tokenizer(
            batch["tokens"], is_split_into_words=True, truncation=True, max_length=self.cfg.data.max_length
        )
        encoded.pop("token_type_ids", None)
        labels, word_index = [], []
        for i, tags in enumerate(batch["tags"]):
            row, words, previous = [], [], None
            for word in encoded.word_ids(i):
                if word is None or word == previous:
                    row.append(IGNORE)
                else:
                    row.append(tags[word])
                    words.append(word)
                previous = word
            labels.append(row)
            word_index.append(words)
        return {
            **encoded,
            "labels": labels,
            "word_index": word_index,
            "length": [len(ids) for ids in encoded["input_ids"]],
        }
