"""Tasks, in-process: packing, masking, data sources and their errors, and what scoring imports (no workers started)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train

from distrain.cli.validate import validate
from distrain.trainer.config.paths import resolve_path
from distrain.trainer.data.sources import read_splits
from distrain.trainer.errors import ConfigError, DataError
from distrain.trainer.model.build import build_model
from distrain.trainer.model.tokenizer import load_tokenizer, train_tokenizer
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks import IGNORE, build_task
from distrain.trainer.tasks.lm import MaskingCollator


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE tokenizer, trained the way model.train_tokenizer_vocab does."""
    folder = tmp_path_factory.mktemp("tokenizer")
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"] * 50
    train_tokenizer(texts, 300, folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def clm_task(tokenizer, *overrides):
    cfg = compose_train(["model=llama_tiny", "task=clm", "data=shakespeare", "data.max_length=16", *overrides])
    return build_task(cfg, tokenizer)


DOCS = ["To be, or not to be", "that is the question", "Whether 'tis nobler in the mind to suffer the slings"]


def test_packed_blocks_are_full_and_positions_restart_at_each_document(bpe):
    task = clm_task(bpe)
    docs = task.document_ids(DOCS)
    out = task.tokenize({"text": DOCS})
    stream = [t for d in docs for t in d]
    assert all(len(block) == 16 for block in out["input_ids"])  # no padding anywhere
    assert len(out["input_ids"]) == len(stream) // 16
    assert [t for block in out["input_ids"] for t in block] == stream[: 16 * len(out["input_ids"])]
    starts = {0, len(docs[0]), len(docs[0]) + len(docs[1])}
    for b, positions in enumerate(out["position_ids"]):
        for i, position in enumerate(positions):
            assert (position == 0) == (i == 0 or (16 * b + i) in starts)


def test_targets_never_cross_a_document_boundary(bpe):
    task = clm_task(bpe)
    out = task.tokenize({"text": DOCS})
    batch = task.collate(
        [{"input_ids": i, "position_ids": p} for i, p in zip(out["input_ids"], out["position_ids"], strict=True)]
    )
    eos = bpe.eos_token_id
    for ids, positions, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"], strict=True):
        for t in range(len(ids) - 1):
            if positions[t + 1] == 0:
                assert labels[t] == IGNORE  # the next document's first token is not predicted from this one
            else:
                assert labels[t] == ids[t + 1]
        assert labels[-1] == IGNORE
    assert eos in batch["input_ids"]  # documents end with EOS, which is a target like any other token


@pytest.mark.parametrize("boundaries", [True, False])
def test_attention_stays_inside_a_document_only_when_configured(bpe, boundaries):
    task = clm_task(bpe, f"data.document_boundaries={boundaries}")
    cfg = task.cfg
    model = build_model(cfg.model, task.auto_model_class(), 0, None, bpe).eval()
    # Two documents packed in one block, fed as the loop feeds them (the task's model inputs).
    a, b = task.document_ids(DOCS[:2])
    task.cfg.data.max_length = len(a) + len(b)
    block = task.tokenize({"text": DOCS[:2]})
    batch = task.collate([{"input_ids": block["input_ids"][0], "position_ids": block["position_ids"][0]}])
    with torch.no_grad():
        together = model(**task.model_batch(batch)).logits[0, len(a) :]
        alone = model(input_ids=torch.tensor([b])).logits[0]
    # With boundaries, the second document is computed exactly as if it were alone; without, it sees the first.
    assert torch.allclose(together, alone, atol=1e-5) == boundaries


def test_unpacked_clm_pads_and_ignores_padding(bpe):
    task = clm_task(bpe, "data.packing=false")
    out = task.tokenize({"text": DOCS})
    assert "position_ids" not in out and max(map(len, out["input_ids"])) <= 16
    batch = task.collate([{"input_ids": ids} for ids in out["input_ids"]])
    real = batch["attention_mask"].bool()
    assert (~real).any()  # padded
    assert (batch["labels"][:, :-1][~real[:, 1:]] == IGNORE).all()


def test_masking_follows_the_80_10_10_rule_and_depends_only_on_the_example():
    cfg = compose_train(["model=bert_tiny", "task=mlm", "data=shakespeare", "data.document_boundaries=false"])
    tokenizer = load_tokenizer(cfg.model, DistEnv())
    collate = MaskingCollator(tokenizer, 0.15, seed=0, train=True)
    examples = []
    for i in range(400):
        ids = [tokenizer.cls_token_id] + [1000 + (i * 7 + j) % 5000 for j in range(60)] + [tokenizer.sep_token_id]
        examples.append({"input_ids": ids, "special_tokens_mask": [1] + [0] * 60 + [1]})
    batch = collate(examples)
    chosen = batch["labels"] != IGNORE
    original = torch.tensor([e["input_ids"] for e in examples])
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # special tokens are never chosen
    assert 0.13 < chosen.float().mean() * 62 / 60 < 0.17
    masked = (batch["input_ids"] == tokenizer.mask_token_id) & chosen
    kept = (batch["input_ids"] == original) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    assert 0.06 < kept.sum() / chosen.sum() < 0.16  # 10% kept, plus random draws of the same token
    # The same example is masked the same way in another batch (another rank, another world size) ...
    again = collate(examples[5:7] + examples[:1])
    assert torch.equal(again["input_ids"][2], batch["input_ids"][0])
    # ... and differently in the next epoch.
    collate.set_epoch(1)
    assert not torch.equal(collate(examples[:1])["input_ids"][0], batch["input_ids"][0])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classify_task(cache_dir, folder, *overrides):
    cfg = compose_train(
        ["model=bert_tiny", "task=classify", "data=custom", f"data.dir={folder}", f"data.cache_dir={cache_dir}",
         "data.files.test=dev.jsonl", *overrides]
    )  # fmt: skip
    return build_task(cfg, load_tokenizer(cfg.model, DistEnv()))


def test_classify_reads_jsonl_with_mapped_columns(cache_dir, tmp_path):
    rows = [{"body": f"text number {i}", "topic": "a" if i % 2 else "b"} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", rows[:6])
    task = classify_task(cache_dir, tmp_path, "data.text_column=body", "data.label_column=topic")
    data = task.prepare(DistEnv())
    assert data.labels == ["a", "b"]
    assert len(data.splits["train"]) == 20 and data.splits["dev"][1]["labels"] == 0


def test_custom_split_cuts_one_file_by_the_fractions_set_on_the_command_line(cache_dir, tmp_path):
    rows = [{"text": f"text number {i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    write_jsonl(tmp_path / "all.jsonl", rows)
    cfg = compose_train(["model=bert_tiny", "task=classify", "data=custom_split", f"data.dir={tmp_path}",
                         f"data.cache_dir={cache_dir}", "data.files.all=all.jsonl", "data.split.train=0.5",
                         "data.split.dev=0.25", "data.split.test=0.25"])  # fmt: skip
    validate(cfg)
    data = build_task(cfg, load_tokenizer(cfg.model, DistEnv())).prepare(DistEnv())
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 20, "dev": 10, "test": 10}


@pytest.mark.parametrize(
    ("train_rows", "overrides", "expected"),
    [
        ([{"text": "x", "label": "a"}, {"text": "y"}], [], "train.jsonl:2: no column 'label' (data.label_column)"),
        ([{"text": "x", "label": "a"}, {"txt": "y", "label": "a"}], [],
         "train.jsonl:2: no column 'text' (data.text_column)"),
        ([{"text": "x", "label": "a"}, {"text": "y", "label": "z"}], ["data.labels=[a,b]"],
         "train.jsonl:2: label 'z' is not one of ['a', 'b']"),
        ([], [], "train.jsonl: no records (empty file?)"),
        # not a class called "None"
        ([{"text": "x", "label": "a"}, {"text": "y", "label": None}], [],
         "train.jsonl:2: column 'label' (data.label_column) has no value"),
    ],
)  # fmt: skip
def test_bad_classification_data_names_the_file_line_and_key(cache_dir, tmp_path, train_rows, overrides, expected):
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(DataError) as error:
        classify_task(cache_dir, tmp_path, *overrides).prepare(DistEnv())
    assert expected in str(error.value)


def test_broken_json_is_an_error_with_its_line(cache_dir, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": \n')
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(DataError, match=r"train.jsonl:2: not a JSON object"):
        classify_task(cache_dir, tmp_path).prepare(DistEnv())


@pytest.mark.slow  # reads and tokenizes the whole bundled corpus
def test_bbc_folders_give_five_classes_and_survive_non_utf8_files(cache_dir, caplog):
    cfg = compose_train(["model=bert_tiny", "+experiment=bbc_classify", f"data.cache_dir={cache_dir}"])
    data = build_task(cfg, load_tokenizer(cfg.model, DistEnv())).prepare(DistEnv())
    assert data.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(len(s) for s in data.splits.values()) == 2225
    assert {split: len(s) for split, s in data.splits.items()} == {"train": 1780, "dev": 222, "test": 223}
    # prepare() may have read the tokenized cache (no file read, no warning): read the files themselves.
    corpus = resolve_path(cfg.data.dir).resolve()
    caplog.clear()  # what prepare() logged, if it built the cache
    with caplog.at_level(logging.WARNING):
        records = read_splits(cfg.data)
    suffix = " is not UTF-8; read as Windows-1252"
    logged = [r for r in caplog.records if r.name == "distrain.trainer.data.sources" and r.msg.endswith(suffix)]
    assert all(r.levelno == logging.WARNING for r in logged)
    warned = [Path(r.getMessage().removesuffix(suffix)) for r in logged]
    # The files that are not UTF-8, found independently of the reader: exactly those are named, each once.
    not_utf8 = set()
    for path in corpus.rglob("*.txt"):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8.add(path)
    assert not_utf8 and len(warned) == len(set(warned)) and {p.resolve() for p in warned} == not_utf8
    assert all(path.is_file() and path.resolve().is_relative_to(corpus) for path in warned)
    # ... and each was read, as Windows-1252, into its record (with its class from the folder name)
    by_file = {r.where: r.fields for split in records.values() for r in split}
    for path in warned:
        assert by_file[str(path)] == {"text": path.read_bytes().decode("cp1252", errors="replace"),
                                      "label": path.parent.name}  # fmt: skip


def test_ner_tags_unseen_in_training_are_errors_with_their_line(cache_dir, tmp_path):
    (tmp_path / "train.txt").write_text("a O\nb B-PER\n")
    (tmp_path / "dev.txt").write_text("a O\n\nb B-LOC\n")
    (tmp_path / "test.txt").write_text("a O\n")
    cfg = compose_train(["model=bert_tiny", "data=conll2003", f"data.dir={tmp_path}", f"data.cache_dir={cache_dir}"])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'dev.txt'}:3: tag 'B-LOC' does not occur in the training data"):
        build_task(cfg, load_tokenizer(cfg.model, DistEnv())).prepare(DistEnv())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.packing=true"], "data.packing: packing is for language modelling (mlm, clm), not ner"),
        (["task=mlm", "data=shakespeare"], "data.document_boundaries: packed mlm blocks attend across documents"),
        (["task=classify", "task.metric=f1"], "task.metric: expected one of ['accuracy', 'macro_f1'] for classify"),
        (["task=clm", "data=bbc_news"], "data.format: expected one of ['text', 'jsonl', 'csv'] for task clm"),
        (["model=smollm2", "model.gguf_file=nope.gguf"], "model.gguf_file: expected a file inside model.name_or_path"),
        (["model=llama_tiny", "model.train_tokenizer_vocab=100"],
         "model.train_tokenizer_vocab: expected null or an integer >= 300"),
    ],
)  # fmt: skip
def test_task_settings_are_validated_with_their_key(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose_train(overrides))
    assert any(expected in problem for problem in error.value.problems), error.value.problems


# Forked workers' scoring, after the launcher's import_worker: for each task's overrides (a JSON list), the modules
# it imported that were not loaded yet.
SCORING_IMPORTS = """
import json, sys
from distrain.cli.compose import compose_train
from distrain.cli.launch import import_worker
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.model.tokenizer import load_tokenizer
from distrain.trainer.tasks import build_task

new = {}
for overrides in json.loads(sys.argv[1]):
    cfg = compose_train(overrides)
    task = build_task(cfg, load_tokenizer(cfg.model, DistEnv()))
    dev = task.prepare(DistEnv()).splits["dev"]
    import_worker(cfg.task.name)
    loaded = set(sys.modules)
    if cfg.task.name == "ner":  # a label per sub-word
        predictions = {i: [0] * len(example["word_index"]) for i, example in enumerate(dev)}
    else:
        predictions = dict.fromkeys(range(len(dev)), 0)
    task.report(predictions, dev)  # every metric, and the per-class rows
    new[cfg.task.name] = sorted(set(sys.modules) - loaded)
print(json.dumps(new))
"""


@pytest.mark.slow
def test_forked_workers_score_with_what_the_launcher_imported(cache_dir, tmp_path):
    """The launcher imports each task's metric_modules before it forks the workers: a sweep's later jobs, forked
    from the same launcher, import nothing when they score (seqeval cost each of their workers 0.4 s)."""
    rows = [{"text": f"text number {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", rows[:6])
    tasks = [
        ["model=bert_tiny", "data=wnut16", "data.max_eval_samples=8", f"data.cache_dir={cache_dir}"],
        ["model=bert_tiny", "task=classify", "data=custom", f"data.dir={tmp_path}", "data.files.test=dev.jsonl",
         f"data.cache_dir={cache_dir}"],
    ]  # fmt: skip
    result = subprocess.run([sys.executable, "-c", SCORING_IMPORTS, json.dumps(tasks)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"ner": [], "classify": []}
