"""NER data: first- and all-sub-word label alignment, the tokenized cache, and metrics that agree with seqeval."""

from __future__ import annotations

import random

import pytest
from conftest import compose_train
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

from distrain.trainer.model.tokenizer import load_tokenizer
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks import build_task
from distrain.trainer.tasks.ner import IGNORE


def ner_task(cache_dir, *overrides):
    cfg = compose_train(["model=bert_tiny", f"data.cache_dir={cache_dir}", *overrides])
    return build_task(cfg, load_tokenizer(cfg.model, DistEnv()))


def test_first_sub_word_carries_the_label_and_the_rest_are_ignored(cache_dir, conll_dir):
    task = ner_task(cache_dir, "data=conll2003", f"data.dir={conll_dir}", "data.label_subwords=first")
    data = task.prepare(DistEnv())
    example = data.splits["train"][1]  # Peter Blackburn -> [CLS] peter blackburn [SEP]
    names = data.labels
    tokens = task.tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert example["labels"][0] == IGNORE and example["labels"][-1] == IGNORE
    labeled = [(tok, names[lab]) for tok, lab in zip(tokens, example["labels"], strict=True) if lab != IGNORE]
    assert labeled == [("peter", "B-PER"), ("blackburn", "I-PER")]
    # "1996-08-22" splits into several sub-words: only the first is labeled.
    date = data.splits["train"][2]
    pieces = task.tokenizer.convert_ids_to_tokens(date["input_ids"])
    assert len(pieces) > 4
    assert [lab for lab in date["labels"] if lab != IGNORE] == [names.index("B-LOC"), names.index("O")]
    assert date["word_index"] == [0, 1]
    assert date["length"] == len(date["input_ids"])


def test_label_subwords_all_gives_continuation_pieces_the_inside_tag(cache_dir, tmp_path):
    sentence = "AL-AIN B-LOC\nKuala B-LOC\nLumpur I-LOC\n1996-08-22 O\n"
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.txt").write_text(sentence)
    task = ner_task(cache_dir, "data=conll2003", f"data.dir={tmp_path}", "data.label_subwords=all")
    data = task.prepare(DistEnv())
    example, names = data.splits["dev"][0], data.labels
    pieces = task.tokenizer.convert_ids_to_tokens(example["input_ids"])
    labeled = [(tok, names[lab]) for tok, lab in zip(pieces, example["labels"], strict=True) if lab != IGNORE]
    assert labeled[:3] == [("al", "B-LOC"), ("-", "I-LOC"), ("ain", "I-LOC")]  # one word, three pieces
    assert [tag for _, tag in labeled[3:]] == ["B-LOC", "I-LOC"] + ["O"] * (len(labeled) - 5)
    assert example["word_index"][:5] == [0, 0, 0, 1, 2] and len(example["word_index"]) == len(labeled)
    # Word-level evaluation reads each word's first piece: wrong continuation pieces change nothing.
    words, targets = example["word_index"], [lab for lab in example["labels"] if lab != IGNORE]
    first_right = [
        lab if i == 0 or words[i - 1] != word else names.index("O")
        for i, (word, lab) in enumerate(zip(words, targets, strict=True))
    ]
    assert task.metrics({0: first_right}, data.splits["dev"])["f1"] == 1.0
    first = ner_task(cache_dir, "data=conll2003", f"data.dir={tmp_path}", "data.label_subwords=first")
    first = first.prepare(DistEnv())
    assert first.splits["dev"][0]["word_index"] == [0, 1, 2, 3]  # a separate cache entry, first pieces only


def test_words_cut_by_max_length_are_predicted_o_not_dropped(cache_dir, tmp_path):
    sentence = "w O\n" * 20 + "Paris B-LOC\n"
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.txt").write_text(sentence)
    task = ner_task(
        cache_dir, "data=conll2003", f"data.dir={tmp_path}", "data.max_length=10", "data.label_subwords=first"
    )
    data = task.prepare(DistEnv())
    dev = data.splits["dev"]
    assert len(dev[0]["tokens"]) == 21 and len(dev[0]["word_index"]) == 8  # [CLS] + 8 words + [SEP]
    perfect = {0: [data.labels.index("O")] * 8}
    metrics = task.metrics(perfect, dev)
    assert metrics["recall"] == 0.0  # the entity at the end was never seen: a miss, not an omission
    assert metrics["accuracy"] == pytest.approx(20 / 21)


def test_metrics_agree_with_seqeval(cache_dir):
    task = ner_task(cache_dir, "data.max_eval_samples=100", "data.label_subwords=first")
    data = task.prepare(DistEnv())
    dev = data.splits["dev"]
    rng = random.Random(0)
    predictions = {}
    gold, pred = [], []
    for i in range(len(dev)):
        row = dev[i]
        # Mostly right, sometimes a random tag: a realistic mix of hits and misses.
        gold_ids = [row["tags"][w] for w in row["word_index"]]
        ids = [tag if rng.random() < 0.95 else rng.randrange(len(data.labels)) for tag in gold_ids]
        predictions[i] = ids
        tags = ["O"] * len(row["tokens"])
        for word, label in zip(row["word_index"], ids, strict=True):
            tags[word] = data.labels[label]
        gold.append([data.labels[t] for t in row["tags"]])
        pred.append(tags)
    metrics = task.metrics(predictions, dev)
    assert metrics["f1"] == pytest.approx(f1_score(gold, pred))
    assert metrics["precision"] == pytest.approx(precision_score(gold, pred))
    assert metrics["recall"] == pytest.approx(recall_score(gold, pred))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert 0.2 < metrics["f1"] < 0.95


def test_wnut_split_is_fixed_80_10_10_and_labels_cover_all_21_tags(cache_dir):
    data = ner_task(cache_dir).prepare(DistEnv())
    sizes = {split: len(ds) for split, ds in data.splits.items()}
    assert sizes == {"train": 1915, "dev": 239, "test": 240}
    assert len(data.labels) == 21 and data.labels[0] == "O"
    again = ner_task(cache_dir, "data.split_seed=1").prepare(DistEnv())
    assert again.splits["dev"]["tokens"] != data.splits["dev"]["tokens"]


def test_tokenized_splits_are_cached_by_content(cache_dir, conll_dir, tmp_path):
    from pathlib import Path

    cache = Path(cache_dir) / "ner"
    task = ner_task(cache_dir, "data=conll2003", f"data.dir={conll_dir}")
    task.prepare(DistEnv())
    before = set(cache.iterdir())
    task.prepare(DistEnv())  # same files, same settings: nothing new is built
    assert set(cache.iterdir()) == before
    for name in ("train.txt", "dev.txt", "test.txt"):
        (tmp_path / name).write_text((conll_dir / name).read_text() + "\nextra NN B-NP O\n")
    ner_task(cache_dir, "data=conll2003", f"data.dir={tmp_path}").prepare(DistEnv())
    after = set(cache.iterdir())
    assert len(after - before) == 1
    (new,) = after - before
    assert sorted(p.name for p in new.glob("*.arrow")) == ["dev.arrow", "test.arrow", "train.arrow"]


def test_a_map_mode_mixture_of_two_conll_sources_keeps_every_sentence_with_its_source(cache_dir, conll_dir, tmp_path):
    """A labelled task mixes in map mode when data.labels fixes the ids (refused without, naming the key); both
    sources are used whole (all_exhausted) and each sentence keeps its source's index."""
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    (tmp_path / "other.txt").write_text((conll_dir / "train.txt").read_text().replace("EU", "UN"))
    mixture = (f"data.mixture=[{{name: a, weight: 0.5, dir: {conll_dir}, files: train.txt}},"
               f"{{name: b, weight: 0.5, dir: {tmp_path}, files: other.txt}}]")  # fmt: skip
    data = ["data=conll2003", f"data.dir={conll_dir}", mixture]
    with pytest.raises(ConfigError, match="data.labels: expected the label list with data.mixture for task ner"):
        validate(compose_train(["model=bert_tiny", *data]))
    labels = "data.labels=[O,B-ORG,I-ORG,B-MISC,I-MISC,B-PER,I-PER,B-LOC,I-LOC]"
    train = ner_task(cache_dir, *data, labels).prepare(DistEnv()).splits["train"]
    firsts = {(row["source"], row["tokens"][0]) for row in train}
    assert firsts == {(0, "EU"), (0, "Peter"), (0, "BRUSSELS"), (1, "UN"), (1, "Peter"), (1, "BRUSSELS")}
