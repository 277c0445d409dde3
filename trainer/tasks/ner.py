"""Named-entity recognition: CoNLL files, jsonl or a Hub dataset -> sub-word labels -> seqeval metrics on words.

Training targets the first sub-word of each word (data.label_subwords=first) or every sub-word (`all`); evaluation
and `distrain predict` read a word's label at its first sub-word, so both see the same words and labels."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import DictConfig

from distrain.trainer.config.schema import DataFormat, LabelSubwords, TaskName
from distrain.trainer.data.augment import NER_OPS, NerAugmenter
from distrain.trainer.data.conll import TAG_PATTERN
from distrain.trainer.data.packing import pack
from distrain.trainer.data.sources import Record, column
from distrain.trainer.errors import DataError
from distrain.trainer.tasks.base import IGNORE, Task
from distrain.trainer.tasks.labels import label_list, label_set

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)


class NerTask(Task):
    name = TaskName.ner
    metrics_reported = ("f1", "precision", "recall", "accuracy", "token_micro_f1")
    dev_loss = True
    metric_modules = ("seqeval.metrics",)
    metric_titles = {
        "f1": "entity F1",
        "accuracy": "token accuracy",
        "token_micro_f1": "token micro F1",
        "predict_f1": "raw-text F1 of distrain predict",
        "pipeline_f1": "raw-text F1 of transformers.pipeline",
    }
    formats = (DataFormat.conll, DataFormat.jsonl)
    pipeline_task = "token-classification"
    packs_examples = True
    augment_ops = NER_OPS
    raw_columns = ("tokens", "tags")

    # --- data ----------------------------------------------------------------------------------------------
    def _sentences(self, records: list[Record]) -> list[tuple[list[str], list[str], list[str]]]:
        """(tokens, tags, where-of-each-tag) per record; jsonl/Hub tags are checked like CoNLL files'."""
        data = self.cfg.data
        out = []
        for record in records:
            if "lines" in record.fields:  # from read_conll: already checked, with a line per token
                path = record.where.rsplit(":", 1)[0]
                places = [f"{path}:{n}" for n in record.fields["lines"]]
                out.append((record.fields["tokens"], record.fields["tags"], places))
                continue
            tokens = column(record, "tokens_column", data.tokens_column)
            tags = column(record, "tags_column", data.tags_column)
            if len(tokens) != len(tags):
                raise DataError(f"{record.where}: {len(tokens)} tokens but {len(tags)} tags")
            for tag in tags:
                if not TAG_PATTERN.match(str(tag)):
                    raise DataError(f"{record.where}: expected BIO tags (O, B-TYPE, I-TYPE), got {tag!r}")
            out.append((list(tokens), list(tags), [record.where] * len(tags)))
        return out

    def to_datasets(self, records: dict[str, list[Record]]) -> dict[str, Dataset]:
        from datasets import ClassLabel, Dataset, Features, List, Value

        sentences = {split: self._sentences(recs) for split, recs in records.items()}
        tagged = {
            split: [(tag, place) for _, tags, where in rows for tag, place in zip(tags, where, strict=True)]
            for split, rows in sentences.items()
        }
        labels = label_set(self.cfg.data, tagged, label_list, kind="tag")
        label_ids = {label: i for i, label in enumerate(labels)}
        self.continuation = continuation_ids(labels)
        features = Features({"tokens": List(Value("string")), "tags": List(ClassLabel(names=labels))})
        out = {}
        for split, rows in sentences.items():
            out[split] = Dataset.from_dict(
                {"tokens": [t for t, _, _ in rows], "tags": [[label_ids[x] for x in tags] for _, tags, _ in rows]},
                features=features,
            )
        return out

    def tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        """Sub-word ids and their targets. `word_index` lists the word of each position with a target, in order:
        with data.label_subwords=first one per word, with `all` one per sub-word (a word's first entry is its
        first sub-word, which word-level evaluation reads)."""
        encoded = self.tokenizer(
            batch["tokens"], is_split_into_words=True, truncation=True, max_length=self.cfg.data.max_length
        )
        encoded.pop("token_type_ids", None)
        every_piece = self.cfg.data.label_subwords == LabelSubwords.all
        labels, word_index = [], []
        for i, tags in enumerate(batch["tags"]):
            row, words, previous = [], [], None
            for word in encoded.word_ids(i):
                if word is None:
                    row.append(IGNORE)
                elif word != previous:
                    row.append(tags[word])
                    words.append(word)
                elif every_piece:
                    row.append(self.continuation[tags[word]])
                    words.append(word)
                else:
                    row.append(IGNORE)
                previous = word
            labels.append(row)
            word_index.append(words)
        unseen = sum(len(t) for t in batch["tokens"]) - sum(len(set(w)) for w in word_index)
        if unseen:
            log.warning(
                "%d words are beyond data.max_length=%d sub-words or have none; they count as predicted O",
                unseen, self.cfg.data.max_length,
            )  # fmt: skip
        return {
            **encoded,
            "labels": labels,
            "word_index": word_index,
            "length": [len(ids) for ids in encoded["input_ids"]],
        }

    def cache_settings(self) -> dict[str, Any]:
        return {**super().cache_settings(), "label_subwords": str(self.cfg.data.label_subwords)}

    def labels_of(self, splits: dict[str, Dataset]) -> list[str]:
        return splits["train"].features["tags"].feature.names

    # --- model ---------------------------------------------------------------------------------------------
    def auto_model_class(self) -> type:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def collator(self, train: bool) -> Any:
        from transformers import DataCollatorForTokenClassification

        if train and self.cfg.data.pack_examples:  # whole sentences end to end (trainer/data/packing.py)
            return partial(pack, budget=self.cfg.data.max_length, pad_id=self.tokenizer.pad_token_id)
        return DataCollatorForTokenClassification(self.tokenizer, label_pad_token_id=IGNORE)

    def augmenter(self, train: Dataset) -> Callable[[dict[str, Any], Any], dict[str, list]]:
        names = train.features["tags"].feature.names
        self.continuation = continuation_ids(names)  # tokenize needs it; a cached split skipped to_datasets
        ops = NerAugmenter(list(self.cfg.data.augment), self.cfg.data.augment_p, names, list(train["tokens"]),
                           list(train["tags"]))  # fmt: skip

        def augment(sample: dict[str, Any], rng: Any) -> dict[str, list]:
            tokens, tags = ops(sample["tokens"], sample["tags"], rng)
            return {"tokens": [tokens], "tags": [tags]}

        return augment

    def predict(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        """Predicted label ids at each position with a target (the `word_index` positions), in order."""
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
            tags: list[str | None] = [None] * len(example["tokens"])
            for word, label in zip(example["word_index"], predictions[index], strict=True):
                if tags[word] is None:  # a word's tag is its first sub-word's
                    tags[word] = names[label]
            tags = [tag or "O" for tag in tags]
            gold.append([names[t] for t in example["tags"]])
            pred.append(tags)
        return gold, pred

    def metrics(self, predictions: dict[int, list[int]], dataset: Dataset) -> dict[str, float]:
        from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

        gold, pred = self.tag_sequences(predictions, dataset)
        return {
            "f1": float(f1_score(gold, pred, zero_division=0)),
            "precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "accuracy": float(accuracy_score(gold, pred)),
            "token_micro_f1": token_report(gold, pred)["micro avg"]["f1-score"],
        }

    def report(self, predictions: dict[int, list[int]], dataset: Dataset) -> dict[str, Any]:
        from seqeval.metrics import classification_report

        gold, pred = self.tag_sequences(predictions, dataset)
        rows = classification_report(gold, pred, output_dict=True, zero_division=0)
        return {
            **self.metrics(predictions, dataset),
            "classes": {name: {k: float(v) for k, v in row.items()} for name, row in rows.items()},
            "token_classes": token_report(gold, pred),
        }

    def write_predictions(self, predictions: dict[int, list[int]], dataset: Dataset, path: Path) -> Path:
        """CoNLL-style `token gold predicted` lines, a blank line between sentences (for conlleval or a diff)."""
        gold, pred = self.tag_sequences(predictions, dataset)
        with open(path, "w", encoding="utf-8") as out:
            for index, g, p in zip(sorted(predictions), gold, pred, strict=True):
                for token, gt, pt in zip(dataset[index]["tokens"], g, p, strict=True):
                    out.write(f"{token} {gt} {pt}\n")
                out.write("\n")
        return path

    # --- inference -----------------------------------------------------------------------------------------
    # The aggregation the export's model card and the README document for transformers.pipeline, and that
    # `distrain eval` scores on raw text (pipeline_f1). Chosen from the measurements in the README.
    pipeline_aggregation: ClassVar[str] = "first"

    def text_tagger(
        self, model: torch.nn.Module, env: Any, options: DictConfig | None = None
    ) -> Callable[..., list[list[dict[str, Any]]]]:
        """`distrain predict`'s tagger: lines of raw text -> each line's {"entities"}, as `distrain eval` sees them,
        and "truncated" (words, tagged, max_length) when the line's words did not all fit in data.max_length tokens.

        A line's words are its whitespace-separated tokens (a sentence of the data joined by spaces gives back its
        words); each word is labelled at its first sub-word, as in evaluation, and an entity is a seqeval entity
        over the word labels, with the character span from its first word's start to its last word's end."""
        from seqeval.metrics.sequence_labeling import get_entities

        from distrain.trainer.model.forward import forward_logits

        names = model.config.id2label

        def tag(texts: list[str], batch_size: int, **_: Any) -> list[list[dict[str, Any]]]:
            out = []
            for start in range(0, len(texts), batch_size):
                lines = texts[start : start + batch_size]
                words = [[(m.start(), m.end()) for m in WORD.finditer(line)] for line in lines]
                encoded = self.tokenizer(
                    [[line[a:b] for a, b in spans] for line, spans in zip(lines, words, strict=True)],
                    is_split_into_words=True, truncation=True, max_length=self.cfg.data.max_length,
                    padding=True, return_tensors="pt",
                )  # fmt: skip
                batch = {k: encoded[k].to(env.device) for k in self.model_inputs}
                with torch.no_grad():
                    logits = forward_logits(model, self, batch, self.cfg.precision.name, env.device)
                scores, labels = logits.float().softmax(-1).max(-1)
                for row, (line, spans) in enumerate(zip(lines, words, strict=True)):
                    tags, score = ["O"] * len(spans), [0.0] * len(spans)
                    previous, tagged = None, 0
                    for position, word in enumerate(encoded.word_ids(row)):
                        if word is not None and word != previous:  # the word's first sub-word
                            tags[word], score[word] = names[int(labels[row, position])], float(scores[row, position])
                            tagged = word + 1
                        previous = word
                    result: dict[str, Any] = {"entities": [
                        {"type": kind, "text": line[spans[first][0] : spans[last][1]], "start": spans[first][0],
                         "end": spans[last][1], "score": round(sum(score[first : last + 1]) / (last - first + 1), 4)}
                        for kind, first, last in get_entities(tags)]}  # fmt: skip
                    if tagged < len(spans):  # the rest did not fit in data.max_length tokens: O, as in evaluation
                        result["truncated"] = {"words": len(spans), "tagged": tagged,
                                               "max_length": self.cfg.data.max_length}  # fmt: skip
                    out.append(result)
            return out

        return tag

    def format_prediction(self, text: str, output: Any) -> dict[str, Any]:
        return output  # the tagger's record: entities, and what did not fit (truncated)

    def card_usage(self) -> str:
        subwords = self.cfg.data.label_subwords
        trained = (
            "every sub-word of a word (continuation pieces of a `B-X` word learned `I-X`)"
            if subwords == LabelSubwords.all
            else "only the first sub-word of each word (the model's outputs on the other pieces are untrained)"
        )
        return CARD_USAGE.format(trained=trained, subwords=subwords, aggregation=self.pipeline_aggregation)

    def raw_text_report(
        self, model: torch.nn.Module, dataset: Dataset, batch_size: int, env: Any, options: DictConfig
    ) -> dict[str, Any]:
        """Entity F1 on raw text (each sentence's words joined by spaces; an entity counts when its type and
        character span are exact): of `distrain predict` (predict_f1) and of transformers.pipeline with the
        aggregation options.aggregation (pipeline_f1; default: the documented one). Beside the word-level scores,
        so a gap between what evaluation measures and what a deployed tagger does is visible."""
        from seqeval.metrics.sequence_labeling import get_entities
        from transformers import pipeline

        aggregation = options.aggregation or self.pipeline_aggregation
        names = dataset.features["tags"].feature.names
        texts, gold = [], []
        for example in dataset:
            starts = [0]
            for token in example["tokens"]:
                starts.append(starts[-1] + len(token) + 1)
            texts.append(" ".join(example["tokens"]))
            tags = [names[t] for t in example["tags"]]
            gold.append({(kind, starts[a], starts[b + 1] - 1) for kind, a, b in get_entities(tags)})
        tagged = self.text_tagger(model, env)(texts, batch_size)
        runner = pipeline(self.pipeline_task, model=model, tokenizer=self.tokenizer, device=env.device,
                          aggregation_strategy=aggregation)  # fmt: skip
        piped = runner(texts, batch_size=batch_size)
        spans = [{(e["type"], e["start"], e["end"]) for e in line["entities"]} for line in tagged]
        return {
            "predict_f1": span_f1(gold, spans),
            "pipeline_f1": span_f1(
                gold, [{(e["entity_group"], int(e["start"]), int(e["end"])) for e in line} for line in piped]
            ),
            "pipeline_aggregation": aggregation,
        }


CARD_USAGE = """Trained with `data.label_subwords={subwords}`: {trained}.

```python
from transformers import pipeline

tagger = pipeline("token-classification", model="<this folder>", aggregation_strategy="{aggregation}")
tagger("Peter Blackburn flew from AL-AIN to Brussels")
```

Use `aggregation_strategy="{aggregation}"`: it labels each word by its first sub-word, which is how the model was
evaluated (`distrain eval`'s word-level F1). `"simple"` groups sub-words by their own labels and, for WordPiece
tokenizers, treats pieces split at punctuation as separate words (`AL-AIN` -> `AL`, `-`, `AIN`), so its entities can
differ from the evaluated ones; `distrain eval` reports the raw-text F1 of this pipeline (`pipeline_f1`) beside the
word-level F1. `distrain predict ckpt=<this folder>` returns exactly the evaluated entities, with character offsets:
a line's words are its whitespace-separated tokens, so punctuation written against a word (`Paris,`) belongs to it.
"""

WORD = re.compile(r"\S+")  # a word of raw text for `distrain predict`: a run of non-whitespace characters


def continuation_ids(labels: list[str]) -> dict[int, int]:
    """The target of a word's continuation sub-words (label_subwords=all): I-X after B-X, else the word's own."""
    ids = {label: i for i, label in enumerate(labels)}
    return {i: ids.get(f"I-{label[2:]}", i) if label.startswith("B-") else i for i, label in enumerate(labels)}


def token_report(gold: list[list[str]], pred: list[list[str]]) -> dict[str, dict[str, float]]:
    """The token-level report of the seeds' experiment (scikit-learn's classification_report layout): per BIO tag
    over every gold word (O included) precision, recall, F1 and support, then micro, macro and weighted averages.
    Tags are those in the gold or the predictions, sorted; a zero division counts 0. Every word has one gold and
    one predicted tag, so micro precision = recall = F1 = the token accuracy."""
    from collections import Counter

    pairs = [(g, p) for gs, ps in zip(gold, pred, strict=True) for g, p in zip(gs, ps, strict=True)]
    hits = Counter(g for g, p in pairs if g == p)
    support, predicted = Counter(g for g, _ in pairs), Counter(p for _, p in pairs)

    def row(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
        precision, recall = (tp / n_pred if n_pred else 0.0), (tp / n_gold if n_gold else 0.0)
        f1 = 2 * tp / (n_pred + n_gold) if tp else 0.0  # = 2PR/(P+R), computed as scikit-learn does
        return {"precision": precision, "recall": recall, "f1-score": f1, "support": float(n_gold)}

    rows = {tag: row(hits[tag], predicted[tag], support[tag]) for tag in sorted(support | predicted)}
    total = len(pairs)
    averages = {"micro avg": row(sum(hits.values()), total, total)}
    for name, weight in (("macro avg", lambda tag: 1.0), ("weighted avg", lambda tag: support[tag])):
        norm = sum(weight(tag) for tag in rows)
        averages[name] = {key: sum(weight(tag) * r[key] for tag, r in rows.items()) / norm if norm else 0.0
                          for key in ("precision", "recall", "f1-score")}  # fmt: skip
        averages[name]["support"] = float(total)
    return {**rows, **averages}


def span_f1(gold: list[set], predicted: list[set]) -> float:
    """Micro entity F1 over sentences of (type, start, end) sets: exact type and span, as seqeval counts."""
    hits = sum(len(g & p) for g, p in zip(gold, predicted, strict=True))
    found, expected = sum(map(len, predicted)), sum(map(len, gold))
    return 2 * hits / (found + expected) if found + expected else 0.0
