"""Streaming training data (data.streaming=true) and weighted mixtures (data.mixture, streaming and map mode), end
to end through the CLI: a tiny Llama on a generated two-source jsonl corpus. One uninterrupted run per mode is
shared by the tests; a run stopped on 2 processes and resumed on 1 must give its losses (the stream's position and
shuffle buffer are in the checkpoint, map mode's position is the step; the samples of a step do not depend on the
number of processes)."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, compose_train, run_distrain, train_losses

STEPS = 8
WORDS = ["the", "king", "queen", "sword", "crown", "castle", "night", "day", "love", "death", "river", "storm"]


def write_corpus(folder: Path, seed: int = 0) -> Path:
    """Source a (column `text`), source b (column `body`, upper case) and a dev file."""
    rng = random.Random(seed)

    def doc() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "."

    folder.mkdir(parents=True, exist_ok=True)
    for name, column, count, upper in (("a.jsonl", "text", 300, False), ("b.jsonl", "body", 200, True),
                                       ("dev.jsonl", "text", 20, False)):  # fmt: skip
        lines = [json.dumps({column: doc().upper() if upper else doc()}) for _ in range(count)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def mixture_overrides(corpus: Path, cache: Path, weight_a: float = 0.7) -> list[str]:
    """Sources a and b of `write_corpus` mixed weight_a / 0.3, in map mode (the default)."""
    return [*TINY, "model=llama_tiny", "task=clm", "task.metric=perplexity", "data=custom", f"data.dir={corpus}",
            "~data.files.test", "~data.files.train", "data.files.dev=dev.jsonl", "data.max_train_samples=null",
            "data.max_eval_samples=null", "data.packing=true", "data.max_length=32", f"data.cache_dir={cache}",
            f"data.mixture=[{{name: a, weight: {weight_a}, dir: {corpus}, files: a.jsonl}},"
            f"{{name: b, weight: 0.3, dir: {corpus}, files: b.jsonl, text_column: body}}]",
            "logger=[]"]  # fmt: skip


def stream_overrides(corpus: Path, cache: Path, weight_a: float = 0.7) -> list[str]:
    return [*mixture_overrides(corpus, cache, weight_a), "data.streaming=true", "data.shuffle_buffer=64",
            "data.num_workers=1", f"train.max_steps={STEPS}"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("stream-corpus"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stream-run")
    run, cache = root / "run", root / "cache"
    run_distrain("train", *stream_overrides(corpus, cache), "train.micro_batch_size=8", f"run.dir={run}")
    return run, cache


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == "train"]


@pytest.mark.slow
def test_a_streaming_run_trains_and_writes_no_cache(uninterrupted):
    run, cache = uninterrupted
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) and loss > 0 for loss in losses.values()), losses
    assert losses[STEPS] < losses[1], losses
    assert not cache.exists()  # nothing tokenized ahead
    assert (run / "export" / "model.safetensors").is_file()
    state = json.loads((run / "checkpoints" / f"step_{STEPS}" / "trainer_state.json").read_text())
    assert len(state["data"]["buffer"]) == 64 and len(state["data"]["sources"]) == 2


@pytest.mark.slow
def test_the_mixture_counts_are_recorded_and_near_the_weights(uninterrupted):
    run, _ = uninterrupted
    records = train_records(run)
    counts = [r["samples_by_source"] for r in records]
    assert all(sum(c.values()) == 8 * r["step"] for c, r in zip(counts, records, strict=True)), counts
    share = counts[-1]["a"] / (counts[-1]["a"] + counts[-1]["b"])
    # 64 samples drawn with p = 0.7: a standard deviation of 0.057
    assert 0.55 < share < 0.85, counts[-1]


@pytest.mark.slow
def test_a_run_stopped_on_2_processes_and_resumed_on_1_gives_the_uninterrupted_losses(uninterrupted, corpus, tmp_path):
    reference, cache = uninterrupted
    run = tmp_path / "resumed"
    overrides = stream_overrides(corpus, cache)
    run_distrain("train", *overrides, "parallel=ddp", "launcher.nproc_per_node=2", "train.micro_batch_size=4",
                 "train.stop_at_step=3", f"run.dir={run}")  # fmt: skip
    assert sorted(train_losses(run)) == [1, 2, 3]
    rerun = run_distrain("train", *overrides, "train.micro_batch_size=8", f"run.dir={run}")
    assert "at step 3" in rerun.stdout
    expected, resumed = train_losses(reference), train_losses(run)
    assert sorted(resumed) == sorted(expected)
    assert max(abs(resumed[s] - expected[s]) for s in expected) < 1e-5, (resumed, expected)
    assert train_records(run)[-1]["samples_by_source"] == train_records(reference)[-1]["samples_by_source"]
    assert not cache.exists()


def test_a_stream_without_max_steps_is_refused_before_any_worker(corpus, tmp_path):
    run = tmp_path / "never"
    overrides = stream_overrides(corpus, tmp_path / "cache", weight_a=0)
    result = run_distrain("train", *overrides, "train.max_steps=null", f"run.dir={run}", check=False)
    assert result.returncode == 2, result.stderr
    assert "train.max_steps: expected a number of steps with data.streaming=true" in result.stderr
    assert "data.mixture[0].weight: expected a number > 0, got 0.0" in result.stderr
    assert not run.exists()


@pytest.mark.slow  # a benchmark's smoke run: second stage, like the other scripts'
def test_bench_streaming_smoke(tmp_path):
    """scripts/bench_streaming.py on tiny corpora (the RSS part only): it runs, and a 8x bigger corpus streams in
    the same memory without a cache."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_streaming.py"
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(script), f"--out={out}", "--smoke", "--parts="], capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    bench = json.loads((out / "bench.json").read_text())
    assert bench["big_bytes"] > 6 * bench["small_bytes"] and not bench["cache_written"], bench
    assert bench["rss_ratio_big_over_small"] < 1.1, bench
    for run in ("stream_big", "stream_small"):
        assert 0 < bench[run]["seconds_to_first_step"] < bench[run]["wall_seconds"], bench


def test_the_model_card_has_the_adapter_settings_when_an_adapter_is_used():
    """The `adapter` group: with `none` (the default) the card has no adapter section, with `lora` its settings."""
    from distrain.trainer.export.model_card import model_card
    from distrain.trainer.tasks import task_class

    cfg = compose_train(TINY)
    task = task_class(cfg.task.name)(cfg, tokenizer=None)
    without = model_card(cfg, task, None)
    assert "## Adapter" not in without and "peft" not in without
    cfg = compose_train([*TINY, "adapter=lora", "adapter.dropout=0.05", "adapter.target_modules=[query,value]"])
    card = model_card(cfg, task, {"step": 3, "f1": 0.5})
    front = yaml.safe_load(card.split("---\n")[1])
    assert {"peft", "lora"} <= set(front["tags"])
    adapter = yaml.safe_load(card.split("## Adapter\n\n```yaml\n")[1].split("```")[0])
    assert adapter == {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query", "value"],
                       "merge_on_export": True}  # fmt: skip
    assert "| f1 | 0.5 |" in card and "(step 3, on the first 64 dev examples (data.max_eval_samples))" in card


# Map mode: 100 steps of global batches of 10 = 1,000 samples; a record every 10 steps.
MAP_STEPS, MAP_BATCH = 100, 10


def share_bound(p: float, n: int) -> float:
    """4 standard deviations of the share of n draws with probability p."""
    return 4 * math.sqrt(p * (1 - p) / n)


def test_a_map_mode_mixture_tags_each_block_with_its_source_and_draws_by_weight(corpus, tmp_path):
    """In process, the worker's own data path: each source tokenized and packed on its own, then mixed 0.7/0.3;
    over the 1,000 samples of 100 global batches of 10 each source's share is within 4 sigma of its weight."""
    from distrain.trainer.data.mixture import SourceCounts
    from distrain.trainer.data.sampler import GlobalBatchSampler
    from distrain.trainer.model.tokenizer import ensure_run_tokenizer, load_tokenizer
    from distrain.trainer.parallel.distributed import DistEnv
    from distrain.trainer.tasks import build_task

    cfg = compose_train(mixture_overrides(corpus, tmp_path / "cache"))
    env = DistEnv()
    ensure_run_tokenizer(cfg, tmp_path, env)
    task = build_task(cfg, load_tokenizer(cfg.model, env, tmp_path))
    train = task.prepare(env).splits["train"]
    # b is upper case, a lower case: a block holds the text of its tagged source only (packed per source)
    for row in train.select(range(200)):
        text = task.tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        letters = [c for c in text if c.isalpha()]
        assert all(c.isupper() for c in letters) if row["source"] == 1 else all(c.islower() for c in letters), row
    sampler = GlobalBatchSampler(train["length"], MAP_BATCH, 1, 0, 1, seed=cfg.train.seed)
    counts = SourceCounts(["a", "b"], train["source"], sampler).at(MAP_STEPS)
    n = MAP_STEPS * MAP_BATCH
    assert sum(counts.values()) == n and len(train) < n  # the 1,000 samples span more than one epoch
    assert abs(counts["a"] / n - 0.7) < share_bound(0.7, n), counts


def test_a_map_mode_mixture_names_its_bad_sources(corpus, tmp_path):
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    overrides = mixture_overrides(corpus, tmp_path / "cache", weight_a=0)
    with pytest.raises(ConfigError) as error:
        validate(compose_train([*overrides, "data.mixture.1.files=missing.jsonl", "data.mixture.1.format=conll"]))
    message = str(error.value)
    assert "data.mixture[0].weight: expected a number > 0, got 0.0" in message
    assert "data.mixture[1].format: expected one of ['text', 'jsonl', 'csv'], got 'conll'" in message
    assert "data.streaming" not in message  # map mode mixes
    validate(compose_train(mixture_overrides(corpus, tmp_path / "cache")))


def test_a_source_column_that_is_not_there_names_the_sources_key(corpus, tmp_path):
    """b.jsonl's column is `body`: a source that says `bodyy` is named by its own key, in map and streaming mode."""
    from distrain.trainer.data.mixture import train_sources
    from distrain.trainer.data.streaming import SourceReader
    from distrain.trainer.errors import DataError
    from distrain.trainer.model.tokenizer import ensure_run_tokenizer, load_tokenizer
    from distrain.trainer.parallel.distributed import DistEnv
    from distrain.trainer.tasks import build_task

    overrides = [o.replace("text_column: body", "text_column: bodyy") for o in mixture_overrides(corpus, tmp_path)]
    cfg = compose_train(overrides)
    expected = f"{corpus / 'b.jsonl'}:1: no column 'bodyy' (data.mixture[1].text_column); the record has ['body']"
    _, _, source_b = train_sources(cfg.data)[1]
    with pytest.raises(DataError, match=re.escape(expected)):
        next(SourceReader(source_b, 0, {"epoch": 0, "file": 0, "offset": 0, "line": 0}).records())
    env = DistEnv()
    with pytest.raises(DataError, match=re.escape(expected)):  # the run's tokenizer is trained on the sources
        ensure_run_tokenizer(cfg, tmp_path / "bad", env)
    ensure_run_tokenizer(compose_train(mixture_overrides(corpus, tmp_path)), tmp_path, env)  # with the right column
    with pytest.raises(DataError, match=re.escape(expected)):  # the map-mode data path
        build_task(cfg, load_tokenizer(cfg.model, env, tmp_path)).prepare(env)
    # ... and a misspelled key of a source, from the shell
    misspelled = [o.replace("text_column: body", "text_colum: body") for o in mixture_overrides(corpus, tmp_path)]
    result = run_distrain("train", *misspelled, f"run.dir={tmp_path / 'run'}", check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and "data.mixture: an entry has no key 'text_colum'; did you mean text_column" in said


@pytest.fixture(scope="module")
def map_uninterrupted(tmp_path_factory, corpus) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("map-run")
    run, cache = root / "run", root / "cache"
    run_distrain("train", *mixture_overrides(corpus, cache), f"train.max_steps={MAP_STEPS}",
                 f"train.micro_batch_size={MAP_BATCH}", "train.log_every=10", f"run.dir={run}")  # fmt: skip
    return run, cache


@pytest.mark.slow
def test_a_map_mode_mixture_records_samples_by_source_near_the_weights(map_uninterrupted):
    run, cache = map_uninterrupted
    records = train_records(run)
    assert [r["step"] for r in records] == list(range(10, MAP_STEPS + 1, 10))
    assert all(sum(r["samples_by_source"].values()) == MAP_BATCH * r["step"] for r in records), records
    last = records[-1]["samples_by_source"]
    n = MAP_STEPS * MAP_BATCH
    assert abs(last["a"] / n - 0.7) < share_bound(0.7, n), last
    assert records[-1]["epoch"] > 1  # the counts go on across epochs
    assert len(list((cache / "clm").iterdir())) == 3  # one cache entry per source, one for dev


@pytest.mark.slow
def test_a_map_mode_mixture_stopped_on_2_processes_and_resumed_on_1_gives_the_uninterrupted_run(
    map_uninterrupted, corpus, tmp_path
):
    reference, cache = map_uninterrupted
    run = tmp_path / "resumed"
    overrides = [*mixture_overrides(corpus, cache), f"train.max_steps={MAP_STEPS}", "train.log_every=10"]
    run_distrain("train", *overrides, "parallel=ddp", "launcher.nproc_per_node=2",
                 f"train.micro_batch_size={MAP_BATCH // 2}", "train.stop_at_step=40", f"run.dir={run}")  # fmt: skip
    assert sorted(train_losses(run)) == [10, 20, 30, 40]
    rerun = run_distrain("train", *overrides, f"train.micro_batch_size={MAP_BATCH}", f"run.dir={run}")
    assert "at step 40" in rerun.stdout
    expected, resumed = train_losses(reference), train_losses(run)
    assert sorted(resumed) == sorted(expected)
    assert max(abs(resumed[s] - expected[s]) for s in expected) < 1e-5, (resumed, expected)
    by_step = {r["step"]: r["samples_by_source"] for r in train_records(reference)}
    assert {r["step"]: r["samples_by_source"] for r in train_records(run)} == by_step
