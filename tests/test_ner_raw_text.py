"""NER on raw text: `distrain predict` returns the entities `distrain eval` scores, and eval reports raw-text F1.

One tiny BERT is trained (label_subwords=all) on generated sentences full of words that WordPiece splits at
punctuation or that carry accents (AL-AIN, U.S., O'Neil, Zürich), then evaluated and run through predict once.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from conftest import DISTRAIN, run_distrain
from seqeval.metrics.sequence_labeling import get_entities

NAMES = {
    "PER": ["Zoë Müller", "Jean-Luc Picard", "O'Neil", "José Álvarez", "Anne-Marie Dubois", "Björk", "Smith"],
    "LOC": ["AL-AIN", "São Paulo", "Zürich", "U.S.", "Kuala Lumpur", "Île-de-France", "Rio"],
    "ORG": ["AT&T", "Coca-Cola", "Société Générale", "3M", "E.ON", "Reuters"],
}
TEMPLATES = [
    "{PER} visited {LOC} .",
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} opened an office in {LOC} , said {PER} .",
    "the weather in {LOC} was fine today .",
    "shares of {ORG} rose 3.5 % on Monday .",
    "nothing happened here today .",
]


def conll_sentences(count: int, seed: int) -> str:
    """`count` generated sentences in CoNLL `token tag` lines."""
    rng, blocks = random.Random(seed), []
    for _ in range(count):
        lines = []
        for part in rng.choice(TEMPLATES).split():
            if part.startswith("{"):
                kind = part[1:-1]
                words = rng.choice(NAMES[kind]).split()
                lines += [f"{w} {'B' if i == 0 else 'I'}-{kind}" for i, w in enumerate(words)]
            else:
                lines.append(f"{part} O")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, cache_dir) -> dict:
    """One run, its `distrain eval` on test and `distrain predict` on the test sentences joined by spaces."""
    root = tmp_path_factory.mktemp("raw-text")
    data, run = root / "data", root / "run"
    data.mkdir()
    for split, (count, seed) in {"train": (400, 0), "dev": (40, 1), "test": (80, 2)}.items():
        (data / f"{split}.txt").write_text(conll_sentences(count, seed), encoding="utf-8")
    run_distrain("train", "model=bert_tiny", "data=conll2003", f"data.dir={data}", "data.label_subwords=all",
                 f"data.cache_dir={cache_dir}", "train.max_steps=80", "train.log_every=20", "optim.lr=5e-3",
                 f"run.dir={run}")  # fmt: skip
    run_distrain("eval", f"ckpt={run}", "split=test")
    sentences = [[line.split()[0] for line in block.splitlines()] for block in
                 (data / "test.txt").read_text(encoding="utf-8").strip().split("\n\n")]  # fmt: skip
    lines = [" ".join(words) for words in sentences]
    # The first sentences again, spaced as raw text may be: tabs, runs of spaces, leading and trailing blanks.
    spaced = ["  " + "\t ".join(words) + " " for words in sentences[:10]]
    long = " ".join(" ".join(words) for words in sentences)  # every test sentence on one line: beyond max_length
    (root / "in.txt").write_text("\n".join([*lines, *spaced, long]) + "\n", encoding="utf-8")
    said = run_distrain("predict", f"ckpt={run}", f"input={root / 'in.txt'}", f"output={root / 'out.jsonl'}").stderr
    out = [json.loads(line) for line in (root / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"run": run, "sentences": sentences, "lines": lines, "out": out, "spaced": spaced, "long": long,
            "stderr": said}  # fmt: skip


def eval_entities(run: Path) -> list[set]:
    """Each test sentence's predicted entities as `distrain eval` scored them, as (type, text, start, end) in the
    sentence's words joined by spaces, from its predictions_test.txt (`token gold predicted` lines)."""
    blocks = (run / "export_eval" / "predictions_test.txt").read_text(encoding="utf-8").strip().split("\n\n")
    out = []
    for block in blocks:
        tokens, predicted = zip(*((row.split()[0], row.split()[2]) for row in block.splitlines()), strict=True)
        starts = [sum(len(t) + 1 for t in tokens[:i]) for i in range(len(tokens) + 1)]
        text = " ".join(tokens)
        out.append(
            {(kind, text[starts[a] : starts[b + 1] - 1], starts[a], starts[b + 1] - 1)
             for kind, a, b in get_entities(list(predicted))}
        )  # fmt: skip
    return out


def test_predict_returns_the_entities_eval_scores_sentence_by_sentence(tagged):
    expected = eval_entities(tagged["run"])
    lines = tagged["lines"]
    assert len(expected) == len(lines) == 80
    got = [{(e["type"], e["text"], e["start"], e["end"]) for e in line["entities"]} for line in tagged["out"][:80]]
    mismatches = [(line, e, g) for line, e, g in zip(lines, expected, got, strict=True) if e != g]
    found = sum(map(len, expected))
    print(f"predict vs eval: {len(lines)} sentences, {found} entities, {len(mismatches)} mismatches")
    assert found >= 80, "the tiny model should tag entities, or this comparison proves nothing"
    assert {text for line in expected for _, text, _, _ in line} & {"AL-AIN", "U.S.", "O'Neil", "Zürich", "AT&T"}
    assert mismatches == []


def test_a_line_beyond_max_length_is_tagged_as_far_as_it_fits_and_says_so(tagged):
    """As in evaluation, the words past data.max_length tokens are not tagged: the record and a warning say so."""
    record, words = tagged["out"][-1], len(tagged["long"].split())
    assert record["input"] == tagged["long"] and not any("truncated" in r for r in tagged["out"][:-1])
    cut = record["truncated"]
    assert cut["words"] == words and 0 < cut["tagged"] < words and cut["max_length"] == 256, cut
    assert all(e["end"] <= len(" ".join(tagged["long"].split()[: cut["tagged"]])) for e in record["entities"])
    said = " ".join(tagged["stderr"].split())
    assert f"1 line(s) longer than the model's data.max_length tokens (line {len(tagged['out'])})" in said, said


def test_predict_offsets_point_into_the_raw_line(tagged):
    """Tabs, runs of spaces and accents: the same words give the same entities, at offsets into the line as given."""
    for spaced, plain, result in zip(tagged["spaced"], tagged["out"][:10], tagged["out"][80:90], strict=True):
        assert result["input"] == spaced
        for entity in result["entities"]:
            assert spaced[entity["start"] : entity["end"]] == entity["text"], entity
            assert 0 < entity["score"] <= 1
        assert [(e["type"], e["text"].split()) for e in result["entities"]] == [
            (e["type"], e["text"].split()) for e in plain["entities"]
        ]


def test_eval_reports_the_raw_text_f1_beside_the_word_level_f1(tagged):
    report = json.loads((tagged["run"] / "export_eval" / "eval_test.json").read_text())
    # predict's entities are eval's (the test above), so their F1 over exact spans is seqeval's F1.
    assert report["predict_f1"] == pytest.approx(report["f1"], abs=1e-12) and report["f1"] > 0.3
    assert report["pipeline_aggregation"] == "first"
    assert 0 < report["pipeline_f1"] <= 1


def test_the_export_says_which_aggregation_to_use(tagged):
    card = (tagged["run"] / "export" / "README.md").read_text()
    assert 'aggregation_strategy="first"' in card and "label_subwords" in card


def test_input_that_is_not_utf8_and_an_output_that_cannot_be_written_are_named_before_any_work(tagged, tmp_path):
    """Exit 2 with the file:line of a Latin-1 byte (from a file and from standard input), and with the output key
    when its folder is missing or is a file, before the model runs; nothing is written."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"Paris is nice\nCaf\xe9 de Flore\n")
    for source, stdin, name in ((f"input={latin1}", None, str(latin1)), ("input=-", latin1.read_bytes(), "-")):
        result = subprocess.run([DISTRAIN, "predict", f"ckpt={tagged['run']}", source], input=stdin,
                                capture_output=True, timeout=300)  # fmt: skip
        said = " ".join(result.stderr.decode().split())
        assert result.returncode == 2 and f"{name}:2: not UTF-8 (byte 0xe9)" in said, said
    result = run_distrain("predict", f"ckpt={tagged['run']}", f"input={latin1}",
                          f"output={tmp_path / 'missing' / 'out.jsonl'}", check=False)  # fmt: skip
    assert result.returncode == 2 and f"output: the folder {tmp_path / 'missing'} does not exist" in result.stderr
    # a folder where even root cannot create a file (os.access says yes to root there)
    result = run_distrain("predict", f"ckpt={tagged['run']}", f"input={latin1}", "output=/proc/out.jsonl", check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and "output: /proc/out.jsonl cannot be written by this user" in said, said
    result = run_distrain("eval", f"ckpt={tagged['run']}", "split=dev", f"output={latin1}", check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and f"output: expected a folder, {latin1} is a file" in said, said
    assert "predicting" not in result.stdout and not (tmp_path / "missing").exists()
