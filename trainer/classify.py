"""Sequence classification: text -> one label; accuracy, macro-F1 and a per-class report (scikit-learn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, Features, Value
from sklearn.metrics import accuracy_score, classification_report, f1_score
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from distrain.trainer.errors import DataError
from distrain.trainer.sources import Record, column
from distrain.trainer.tasks import Task


class ClassifyTask(Task):
    name = "classify"
    pipeline_task = "text-classification"

    def to_datasets(self, records: dict[str, list[Record]]) -> dict[str, Dataset]:
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
        if data.labels is not None:
            labels = [str(label) for label in data.labels]
        else:
            cut = data.split is not None
            labels = sorted({label for split, rs in rows.items() if cut or split == "train" for _, label, _ in rs})
        known = set(labels)
        for split_rows in rows.values():
            for text, label, where in split_rows:
                if label not in known:
                    raise DataError(
                        f"{where}: label {label!r} is not one of {labels} (data.labels, or the training labels)"
                    )
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
        return AutoModelForSequenceClassification

    def collator(self, train: bool) -> Any:
        return DataCollatorWithPadding(self.tokenizer)

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[int]:
        return logits.argmax(-1).cpu().tolist()

    def _pairs(self, predictions: dict[int, int], dataset: Dataset) -> tuple[list[int], list[int]]:
        order = sorted(predictions)
        gold = dataset.select(order)["label"] if order else []
        return list(gold), [predictions[i] for i in order]

    def metrics(self, predictions: dict[int, int], dataset: Dataset) -> dict[str, float]:
        gold, pred = self._pairs(predictions, dataset)
        return {
            "accuracy": float(accuracy_score(gold, pred)),
            "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        }

    def report(self, predictions: dict[int, int], dataset: Dataset) -> dict[str, Any]:
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
                out.write(json.dumps({"gold": names[row["label"]], "predicted": names[predictions[index]]}) + "\n")
        return path.with_suffix(".jsonl")

    def format_prediction(self, text: str, output: Any) -> dict[str, Any]:
        best = output[0] if isinstance(output, list) else output
        return {"label": best["label"], "score": round(float(best["score"]), 4)}
