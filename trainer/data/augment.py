"""Data augmentation of the training samples (data.augment, data.augment_p), drawn anew every epoch.

NER: the label-preserving operations of Dai & Adel (2020), "An Analysis of Simple Data Augmentation for Named
Entity Recognition", each applied with probability data.augment_p per token, mention or segment:
  label_replace    a token becomes a training token of the same tag (drawn by frequency)
  synonym_replace  a token becomes one of its synonyms (one word; its tag stays)
  mention_replace  an entity becomes another training entity of the same type (its tags follow: B-X I-X ...)
  segment_shuffle  the tokens of a same-label segment (an entity, or a run of O) are shuffled
Classification (EDA, Wei & Zou 2019), on the words of the text: synonym_replace (per word), random_swap
(round(p x words) swaps, at least one), random_delete (per word; one word always stays).

The augmented words are tokenized again by the task, so sub-words and targets are those of the new words. A
sample's draw is seeded by (train.seed, epoch, its token ids), as MLM masking is: a sample is augmented the same way
whichever rank or batch it lands in, so 1 or N processes train on the same batches and a resumed run on the same
samples. Only training batches pass here; dev and test are never augmented.

Synonyms come from the `synonymset` package (English WordNet lemmas grouped under a head word, inside its wheel:
no download); its groups are coarse (senses are merged), which is why it is measured, not assumed, to help.
"""

from __future__ import annotations

import random
import zlib
from array import array
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from typing import Any

NER_OPS = ("label_replace", "synonym_replace", "mention_replace", "segment_shuffle")
TEXT_OPS = ("synonym_replace", "random_swap", "random_delete")


@cache
def synonym_table() -> dict[str, list[str]]:
    """Lower-cased word -> its one-word synonyms (the other words of its synonymset group)."""
    import warnings

    from synonymset import get_main_synonym

    with warnings.catch_warnings():  # its loader uses importlib.resources.open_binary, deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        heads = get_main_synonym("en")
    groups: dict[str, set[str]] = defaultdict(set)
    for word, head in heads.items():
        groups[head].update((word, head))
    table: dict[str, set[str]] = defaultdict(set)
    for members in groups.values():  # a word can be in two groups (a head, and a member of another)
        words = {w for w in members if w.isalpha()}
        for word in words:
            table[word] |= words - {word}
    return {word: sorted(others) for word, others in table.items()}


def synonym(word: str, rng: random.Random) -> str | None:
    """A synonym of `word` in its case pattern (UPPER, Capitalised, lower), or None when it has none."""
    choices = synonym_table().get(word.lower())
    if not choices:
        return None
    new = rng.choice(choices)
    if word.isupper() and len(word) > 1:
        return new.upper()
    return new.capitalize() if word[:1].isupper() else new


def segments(tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, end exclusive, type) of each same-label segment: an entity (type X: B-X, or an I-X that does not
    continue an X) or a run of O (type "O")."""
    out: list[list[Any]] = []
    for i, tag in enumerate(tags):
        kind = "O" if tag == "O" else tag[2:]
        if out and out[-1][2] == kind and (kind == "O" or tag.startswith("I-")):
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1, kind])
    return [(a, b, kind) for a, b, kind in out]


class NerAugmenter:
    """Dai & Adel's operations over (tokens, tag ids), with the training set's tokens per tag and entities per type."""

    def __init__(self, ops: list[str], p: float, names: list[str], tokens: list[list[str]], tags: list[list[int]]):
        self.ops, self.p, self.names = ops, p, names
        self.ids = {name: i for i, name in enumerate(names)}
        self.by_tag: dict[int, list[str]] = defaultdict(list)  # with repeats: a draw follows the frequencies
        self.mentions: dict[str, list[list[str]]] = defaultdict(list)
        for words, row in zip(tokens, tags, strict=True):
            for word, tag in zip(words, row, strict=True):
                self.by_tag[tag].append(word)
            for a, b, kind in segments([names[t] for t in row]):
                if kind != "O":
                    self.mentions[kind].append(words[a:b])

    def __call__(self, tokens: list[str], tags: list[int], rng: random.Random) -> tuple[list[str], list[int]]:
        tokens, tags = list(tokens), list(tags)
        for op in self.ops:
            tokens, tags = getattr(self, op)(tokens, tags, rng)
        return tokens, tags

    def label_replace(self, tokens: list[str], tags: list[int], rng: random.Random) -> tuple[list[str], list[int]]:
        new = [rng.choice(self.by_tag[t]) if rng.random() < self.p else w for w, t in zip(tokens, tags, strict=True)]
        return new, tags

    def synonym_replace(self, tokens: list[str], tags: list[int], rng: random.Random) -> tuple[list[str], list[int]]:
        return [(synonym(w, rng) or w) if rng.random() < self.p else w for w in tokens], tags

    def mention_replace(self, tokens: list[str], tags: list[int], rng: random.Random) -> tuple[list[str], list[int]]:
        new_tokens, new_tags = [], []
        for a, b, kind in segments([self.names[t] for t in tags]):
            if kind != "O" and rng.random() < self.p:
                words = rng.choice(self.mentions[kind])
                new_tokens += words
                # a training mention of several words: I-X is a known tag (a type of one-word mentions may have none)
                new_tags += [self.ids[f"B-{kind}"]] + (
                    [self.ids[f"I-{kind}"]] * (len(words) - 1) if len(words) > 1 else []
                )
            else:
                new_tokens += tokens[a:b]
                new_tags += tags[a:b]
        return new_tokens, new_tags

    def segment_shuffle(self, tokens: list[str], tags: list[int], rng: random.Random) -> tuple[list[str], list[int]]:
        out = list(tokens)
        for a, b, _ in segments([self.names[t] for t in tags]):
            if b - a > 1 and rng.random() < self.p:
                piece = out[a:b]
                rng.shuffle(piece)
                out[a:b] = piece
        return out, tags  # each position keeps its tag: B-X stays first


class TextAugmenter:
    """EDA's operations over the words of a text."""

    def __init__(self, ops: list[str], p: float):
        self.ops, self.p = ops, p

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        for op in self.ops:
            if words:
                words = getattr(self, op)(words, rng)
        return " ".join(words) if words else text

    def synonym_replace(self, words: list[str], rng: random.Random) -> list[str]:
        return [(synonym(w, rng) or w) if rng.random() < self.p else w for w in words]

    def random_swap(self, words: list[str], rng: random.Random) -> list[str]:
        words = list(words)
        for _ in range(max(1, round(self.p * len(words))) if len(words) > 1 else 0):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        return words

    def random_delete(self, words: list[str], rng: random.Random) -> list[str]:
        kept = [w for w in words if rng.random() >= self.p]
        return kept or [rng.choice(words)]


class AugmentingCollator:
    """Wraps the task's training collator: each sample is augmented (`augment`: the sample's raw columns and a
    seeded Random -> raw columns of a batch of one), tokenized again by the task, then collated as usual."""

    def __init__(self, task: Any, collate: Any, augment: Callable[[dict, random.Random], dict], seed: int):
        self.task, self.collate, self.augment, self.seed = task, collate, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.collate, "set_epoch"):
            self.collate.set_epoch(epoch)

    def rng(self, input_ids: list[int]) -> random.Random:
        """The sample's draw: seeded by (seed, epoch, its token ids) — a string seed hashes the same everywhere."""
        return random.Random(f"{self.seed}:{self.epoch}:{zlib.crc32(array('q', input_ids).tobytes())}")

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        keep = self.task.loader_columns
        out = []
        for feature in features:
            encoded = self.task.tokenize(self.augment(feature, self.rng(list(feature["input_ids"]))))
            out.append({key: encoded[key][0] for key in keep})
        return self.collate(out)
