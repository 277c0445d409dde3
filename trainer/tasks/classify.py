"""Sequence classification: text -> one label; accuracy, macro-F1 and a per-class report (scikit-learn)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distrain.trainer import strict_json
from distrain.trainer.config.schema import DataFormat, TaskName
from distrain.trainer.data.augment import TEXT_OPS, TextAugmenter
from distrain.trainer.data.sources import Record, column
from distrain.trainer.errors import DataError
from distrain.trainer.tasks.base import Task
from distrain.trainer.tasks.labels import label_set

if TYPE_CHECKING:
    from datasets import Dataset


class ClassifyTask(Task):
    name = TaskName.classify
    metrics_reported = ("accuracy", "macro_f1")
    dev_loss = True
    metric_modules = ("sklearn.metrics",)
    formats = (DataFormat.jsonl, DataFormat.csv, DataFormat.folders)
    pipeline_task = "text-classification"
    augment_ops = TEXT_OPS
    raw_columns = ("text", "label")

    def to_datasets(self, records: dict[str, list[Record]]) -> dict[str, Dataset]:
        from datasets import ClassLabel, Dataset, Features, Value

        data = self.cfg.data
        rows = {
            split: [
                (
                    str(column(r, "text_column", data.text_column)),
                    str(column(r, "label_column", data.label_column)),
                    r.where,
                )
                for r in recs
            ]
            for split, recs in records.items()
        }
        labelled = {split: [(label, where) for _, label, where in rs] for split, rs in rows.items()}
        labels = label_set(data, labelled, sorted, kind="label")
        for split_rows in rows.values():
            for text, _, where in split_rows:
                if not text.strip():
                    raise DataError(f"{where}: empty text (data.text_column={data.text_column!r})")
        features = Features({"text": Value("string"), "label": ClassLabel(names=labels)})
        return {
            split: Dataset.from_dict(
                {"text": [t for t, _, _ in rs], "label": [lab for _, lab, _ in rs]}, features=features
            )
            for split, rs in rows.items()
        }

    def tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        encoded = self.tokenizer(batch["text"], truncation=True, max_length=self.cfg.data.max_length)
        encoded.pop("token_type_ids", None)
        return {**encoded, "labels": batch["label"], "length": [len(ids) for ids in encoded["input_ids"]]}

    def labels_of(self, splits: dict[str, Dataset]) -> list[str]:
        return splits["train"].features["label"].names

    def auto_model_class(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def collator(self, train: bool) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def augmenter(self, train: Dataset) -> Callable[[dict[str, Any], Any], dict[str, list]]:
        ops = TextAugmenter(list(self.cfg.data.augment), self.cfg.data.augment_p)
        return lambda sample, rng: {"text": [ops(sample["text"], rng)], "label": [sample["label"]]}

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[int]:
        return logits.argmax(-1).cpu().tolist()

    def _pairs(self, predictions: dict[int, int], dataset: Dataset) -> tuple[list[int], list[int]]:
        order = sorted(predictions)
        gold = dataset.select(order)["label"] if order else []
        return list(gold), [predictions[i] for i in order]

    def metrics(self, predictions: dict[int, int], dataset: Dataset) -> dict[str, float]:
        from sklearn.metrics import accuracy_score, f1_score

        gold, pred = self._pairs(predictions, dataset)
        return {
            "accuracy": float(accuracy_score(gold, pred)),
            "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        }

    def report(self, predictions: dict[int, int], dataset: Dataset) -> dict[str, Any]:
        from sklearn.metrics import classification_report

        gold, pred = self._pairs(predictions, dataset)
        names = dataset.features["label"].names
        rows = classification_report(
            gold, pred, labels=list(range(len(names))), target_names=names, output_dict=True, zero_division=0
        )
        rows.pop("accuracy", None)  # a number, not a row; it is reported on its own
        return {
            **self.metrics(predictions, dataset),
            "classes": {name: {k: float(v) for k, v in row.items()} for name, row in rows.items()},
        }

    def write_predictions(self, predictions: dict[int, int], dataset: Dataset, path: Path) -> Path:
        names = dataset.features["label"].names
        with open(path.with_suffix(".jsonl"), "w", encoding="utf-8") as out:
            for index in sorted(predictions):
                row = dataset[index]
                out.write(
                    strict_json.dumps({"gold": names[row["label"]], "predicted": names[predictions[index]]}) + "\n"
                )
        return path.with_suffix(".jsonl")

    def format_prediction(self, text: str, output: Any) -> dict[str, Any]:
        best = output[0] if isinstance(output, list) else output
        return {"label": best["label"], "score": round(float(best["score"]), 4)}
