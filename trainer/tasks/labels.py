"""The label set of a labelled task (NER tags, classes) and the model head built from it.

One rule for every task with labels: `data.labels` when given, else the labels of the training data (of the
whole file when one file is cut into splits). A label of any split outside that set is an error naming where it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig

from distrain.trainer.errors import DataError


def label_set(
    data: DictConfig,
    labelled: dict[str, list[tuple[str, str]]],
    order: Callable[[Iterable[str]], list[str]],
    kind: str,
) -> list[str]:
    """The labels in id order. `labelled`: split -> (label, where) pairs; `order` puts the set found in the data
    in id order;
    `kind` names a label in messages ("tag", "label")."""
    if data.labels is not None:
        labels = [str(label) for label in data.labels]
    else:
        cut = data.split is not None
        labels = order({label for split, pairs in labelled.items() if cut or split == "train" for label, _ in pairs})
    known = set(labels)
    for pairs in labelled.values():
        for label, where in pairs:
            if label not in known:
                if data.labels is not None:
                    raise DataError(f"{where}: {kind} {label!r} is not one of {labels} (data.labels)")
                raise DataError(f"{where}: {kind} {label!r} does not occur in the training data (known: {labels})")
    return labels


def label_list(tags: Iterable[str]) -> list[str]:
    """BIO tags in a stable id order: `O` first, then by entity type with B before I."""
    return sorted(set(tags), key=lambda tag: ("" if tag == "O" else tag[2:], tag[:1]))


def label_head(labels: list[str]) -> dict[str, Any]:
    """The config fields of a classifier head over `labels` (transformers' num_labels, id2label, label2id)."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
