"""data.pack_examples (trainer/data/packing.py): a packed batch computes what the same examples padded compute.

In-process: the loss, the number of targets and every real token's logits of a packed micro-batch equal those of
the padded one (1e-5), for ner (bert_tiny, MiniLM) and clm (llama_tiny, with the chat examples' own labels), with
the sdpa and eager attention. Slow: the same for the pretrained SmolLM2-135M, and `distrain parity
variant=data.pack_examples=true` under ddp and fsdp."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import LLAMA_PARITY, TINY, compose_train, run_parity

from distrain.cli.validate import validate
from distrain.trainer.data.packing import examples_in, is_packed, rows_of
from distrain.trainer.errors import ConfigError
from distrain.trainer.model.build import build_model, model_source
from distrain.trainer.model.families import packing_problems
from distrain.trainer.model.tokenizer import load_tokenizer
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks import IGNORE, build_task


def compare(task, model, features, attention: str, logits_tolerance: float = 1e-5) -> tuple[dict, dict]:
    """(padded batch, packed batch) of `features`, after checking they give the same loss, targets and logits."""
    model.set_attn_implementation(attention)
    padded, packed = task.collator(train=False)(features), task.collator(train=True)(features)
    assert is_packed(packed) and not is_packed(padded)
    with torch.no_grad():
        logits = {name: model(**task.model_batch(b)).logits for name, b in (("padded", padded), ("packed", packed))}
    targets = task.num_targets(padded)
    assert task.num_targets(packed) == targets > 0  # the loss's divisor is unchanged
    losses = [float(task.loss_sum(logits[n], b)) / targets for n, b in (("padded", padded), ("packed", packed))]
    assert abs(losses[0] - losses[1]) <= 1e-5, losses
    # Every real token sees exactly its own example: row by row, the packed logits are the padded ones.
    real = {n: b["attention_mask"].bool() for n, b in (("padded", padded), ("packed", packed))}
    padded_rows = [logits["padded"][r][real["padded"][r]] for r in range(len(features))]
    by_tokens = {tuple(padded["input_ids"][r][real["padded"][r]].tolist()): rows for r, rows in enumerate(padded_rows)}
    for r in range(len(packed["input_ids"])):
        ids, positions = packed["input_ids"][r], packed["position_ids"][r]
        starts = [i for i in range(len(ids)) if positions[i] == 0 and real["packed"][r][i]]
        for a, b in zip(starts, [*starts[1:], int(real["packed"][r].sum())], strict=True):
            alone = by_tokens[tuple(ids[a:b].tolist())]
            torch.testing.assert_close(logits["packed"][r][a:b], alone, atol=logits_tolerance, rtol=1e-5)
    # The accounting: the same real tokens and examples, fewer padding positions.
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    assert examples_in(packed) == examples_in(padded) == len(features)
    assert packed["attention_mask"].numel() < padded["attention_mask"].numel()
    return padded, packed


def ner_setup(cache_dir, *overrides):
    cfg = compose_train([*TINY, f"data.cache_dir={cache_dir}", "data.pack_examples=true", *overrides])
    tokenizer = load_tokenizer(cfg.model, DistEnv())
    task = build_task(cfg, tokenizer)
    data = task.prepare(DistEnv())
    source = model_source(cfg.model, DistEnv())
    model = build_model(cfg.model, task.auto_model_class(), 0, source, tokenizer, **task.head(data)).eval()
    features = [{k: data.splits["train"][i][k] for k in task.loader_columns} for i in range(16)]
    return task, model, features


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_ner_batch_equals_the_padded_one(cache_dir, attention):
    task, model, features = ner_setup(cache_dir)
    _, packed = compare(task, model, features, attention)
    assert len(packed["input_ids"]) < len(features)  # several sentences share a row
    assert packed["input_ids"].shape[1] <= task.cfg.data.max_length  # rows hold at most max_length tokens


def test_packed_ner_batch_equals_the_padded_one_with_minilm(cache_dir):
    task, model, features = ner_setup(cache_dir, "model=minilm")  # the bundled pretrained MiniLM (BERT, 6 layers)
    assert model.config.num_hidden_layers == 6
    compare(task, model, features, "sdpa")


LINES = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
         "And by opposing end them. To die, to sleep;", "No more; and by a sleep to say we end"]  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """llama_tiny, its byte-level BPE tokenizer, and 16 one-document pieces of 3 to 48 tokens (data.packing=false)."""
    from transformers import AutoTokenizer

    from distrain.trainer.model.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    train_tokenizer(LINES * 50, 300, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = compose_train(["model=llama_tiny", "task=clm", "data=shakespeare", "data.packing=false",
                         "data.max_length=48", "data.pack_examples=true"])  # fmt: skip
    task = build_task(cfg, tokenizer)
    model = build_model(cfg.model, task.auto_model_class(), 0, None, tokenizer).eval()
    docs = [" ".join(LINES[i % 6 : i % 6 + 1 + i % 4]) if i % 3 else LINES[i % 6][: 5 + i] for i in range(16)]
    pieces = task.tokenize({"text": docs})["input_ids"]
    return task, model, [{"input_ids": p} for p in pieces]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_clm_pieces_equal_the_padded_ones(llama, attention):
    task, model, features = llama
    _, packed = compare(task, model, features, attention)
    for row, positions in zip(packed["labels"], packed["position_ids"], strict=True):
        # no position is trained to predict the first token of the next example
        assert (row[:-1][positions[1:] == 0] == IGNORE).all()


@pytest.mark.slow
def test_packed_smollm2_pieces_equal_the_padded_ones():
    """The bundled SmolLM2-135M (llama family, pretrained: the chat experiments' model), sdpa and eager."""
    cfg = compose_train(["model=smollm2", "task=clm", "data=shakespeare", "data.packing=false", "data.max_length=64",
                         "data.pack_examples=true"])  # fmt: skip
    tokenizer = load_tokenizer(cfg.model, DistEnv())
    task = build_task(cfg, tokenizer)
    model = build_model(cfg.model, task.auto_model_class(), 0, model_source(cfg.model, DistEnv()), tokenizer).eval()
    features = [{"input_ids": ids} for ids in task.tokenize({"text": LINES + [" ".join(LINES[:3])]})["input_ids"]]
    for attention in ("sdpa", "eager"):
        # 30 layers of fp32 rounding in other GEMM shapes move logits of about 20 by up to 1e-4 (seen: 8.6e-5); an
        # example seeing another would move them by whole units. The loss still agrees to 1e-5.
        compare(task, model, features, attention, logits_tolerance=1e-3)


def test_chat_examples_with_their_own_labels_pack_per_example(llama):
    """Examples carrying unshifted labels with masked prompts (what chat data gives the clm collation)."""
    task, model, pieces = llama
    features = []
    for n, piece in enumerate(pieces):
        ids = piece["input_ids"]
        prompt = 1 + n % (len(ids) - 1) if len(ids) > 1 else 0
        features.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    padded, packed = compare(task, model, features, "sdpa")
    # Each example's targets are its own labels shifted by one inside it: the answer tokens after the first.
    expected = sorted(t for f in features for t in f["labels"][1:] if t != IGNORE)
    for batch in (padded, packed):
        assert sorted(batch["labels"][batch["labels"] != IGNORE].tolist()) == expected


def test_rows_hold_each_example_once_within_the_budget_and_never_more_positions_than_padding():
    rng = random.Random(0)
    for _ in range(300):
        budget = rng.randint(8, 128)
        lengths = [rng.randint(1, budget) for _ in range(rng.randint(1, 24))]
        rows = rows_of(lengths, budget)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        widths = [sum(lengths[i] for i in row) for row in rows]
        assert max(widths) <= budget
        assert len(rows) * max(widths) <= len(lengths) * max(lengths)
    assert rows_of([3, 5, 4, 4], 8) == [[1, 0], [2, 3]]  # 16 tokens in 2 full rows of 8: no padding


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.pack_examples=true", "task=classify", "data=bbc_news"],
         "data.pack_examples: packs the examples of tasks"),
        (["data.pack_examples=true", "model=llama_tiny", "task=clm", "data=shakespeare", "data.packing=true"],
         "data.pack_examples: data.packing=true already fills every row"),
        (["data.packing=true"], "data.pack_examples=true packs whole examples"),
    ],
)  # fmt: skip
def test_pack_examples_settings_are_validated_with_their_key(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose_train(overrides))
    assert any(expected in problem for problem in error.value.problems), error.value.problems


def test_a_family_not_known_to_pack_is_refused_naming_the_key():
    assert packing_problems("bert", True) == packing_problems("gpt2", False) == []
    (problem,) = packing_problems("gpt2", True)
    assert problem.startswith("data.pack_examples: a 'gpt2' model is not known") and "expected false" in problem


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["ner", "clm"])
def test_packing_keeps_the_losses_under_ddp_and_fsdp(tmp_path, cache_dir, setup):
    """`distrain parity variant=data.pack_examples=true`: ddp without packing is the reference; ddp and fsdp with
    packing train the same losses (1e-5) on fewer padding positions."""
    overrides = [*TINY, "train.micro_batch_size=8"] if setup == "ner" else [*LLAMA_PARITY, "data.packing=false"]
    result = run_parity(tmp_path, cache_dir, "[ddp,fsdp]", *overrides, "variant=data.pack_examples=true")
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["reference"] == "ddp (reference)"
    assert set(report["strategies"]) == {"ddp (reference)", "ddp data.pack_examples=true",
                                         "fsdp data.pack_examples=true"}, result.stdout  # fmt: skip
    for name, row in report["strategies"].items():
        assert row["max_abs_diff"] <= 1e-5, (name, row)
    padded = records(tmp_path / "ddp_reference")
    packed = records(tmp_path / "ddp_data.pack_examples_true")
    # the same real tokens, on no more positions in any step, and fewer in all
    assert all(p["padding"] <= q["padding"] for p, q in zip(packed, padded, strict=True))
    assert sum(r["padding"] for r in packed) < sum(r["padding"] for r in padded)
