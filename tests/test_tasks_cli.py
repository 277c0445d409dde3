"""Every task end to end through the CLI on tiny models: train -> eval -> export -> pipeline -> predict."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_distrain, train_losses

STEPS = 4
# The language models train in the slow stage (their ONNX exports are tested there too); the default suite keeps
# ner and classify (encoders, 1 and 2 processes), and test_chat trains, evaluates and predicts with a decoder.
SLOW_TASKS = {"mlm", "clm"}
TASKS = {
    # task: (overrides, pipeline task, a predict input, the keys of a predict output)
    "ner": (["model=bert_tiny", "data.max_train_samples=128", "data.max_eval_samples=32"],
            "token-classification", "Barack Obama visited Paris", {"entities"}),
    "classify": (["+experiment=bbc_classify", "model=bert_tiny", "parallel=single", "launcher.nproc_per_node=1",
                  "data.max_train_samples=128", "data.max_eval_samples=32"],
                 "text-classification", "Shares in the bank rose after profits beat forecasts", {"label", "score"}),
    "mlm": (["+experiment=minilm_mlm", "model=bert_tiny", "parallel=single", "launcher.nproc_per_node=1",
             "data.max_train_samples=128", "data.max_eval_samples=32"],
            "fill-mask", "to be or not to [MASK]", {"fills"}),
    "clm": (["+experiment=shakespeare_clm", "model=llama_tiny", "data.max_length=64", "data.max_train_samples=256",
             "data.max_eval_samples=32"],
            "text-generation", "To be, or not", {"continuation"}),
}  # fmt: skip


ALL_TASKS = [pytest.param(t, marks=[pytest.mark.slow] if t in SLOW_TASKS else []) for t in TASKS]


class TaskRuns(dict):
    """Each task's run dir, trained the first time a test asks for it: a test of one task trains only that task."""

    def __init__(self, root: Path, cache_dir: str):
        super().__init__()
        self.root, self.cache_dir = root, cache_dir

    def __missing__(self, task: str) -> Path:
        run = self[task] = self.root / task
        # clm runs 2 processes with a cache of its own, to show that one rank per node builds it.
        cache = self.root / "clm-cache" if task == "clm" else self.cache_dir
        run_distrain("train", *TASKS[task][0], f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_every=0",
                     "optim.lr=1e-3", f"data.cache_dir={cache}", f"run.dir={run}")  # fmt: skip
        return run


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    return TaskRuns(tmp_path_factory.mktemp("tasks"), cache_dir)


# The dev metrics each task reports (in the eval records of metrics.jsonl and in `distrain eval`'s report).
METRICS = {
    "ner": ("f1", "precision", "recall", "accuracy", "token_micro_f1"),
    "classify": ("accuracy", "macro_f1"),
    "mlm": ("perplexity", "loss", "tokens"),
    "clm": ("perplexity", "loss", "tokens"),
}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_training_records_losses_and_the_task_metric(task_runs, task):
    run = task_runs[task]
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    train = [r for r in records(run) if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train), train
    (evaluation,) = [r for r in records(run) if r["kind"] == "eval"]
    assert evaluation["step"] == STEPS and evaluation["split"] == "dev"
    metric = {"ner": "f1", "classify": "macro_f1", "mlm": "perplexity", "clm": "perplexity"}[task]
    assert metric in evaluation
    assert set(METRICS[task]) <= set(evaluation)
    if metric == "perplexity":
        assert 1 < evaluation["perplexity"] < 1e6
        assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["loss"]), rel=1e-9)
    else:
        assert all(0 <= evaluation[m] <= 1 for m in METRICS[task]), evaluation


@pytest.mark.parametrize("task", ALL_TASKS)
def test_eval_reports_the_task_metrics(task_runs, task):
    run = task_runs[task]
    # max_samples: the first 32, as the run's data.max_eval_samples=32 evaluated (eval takes the whole split)
    result = run_distrain("eval", f"ckpt={run / 'checkpoints' / f'step_{STEPS}'}", "split=dev", "max_samples=32")
    report = json.loads((run / "checkpoints" / f"step_{STEPS}_eval" / "eval_dev.json").read_text())
    # The same weights on the same dev samples (LM: the same masks): the numbers recorded in training at that step.
    (dev,) = [r for r in records(run) if r["kind"] == "eval" and r["step"] == STEPS]
    assert report["examples"] == 32 and "Warning" not in result.stderr, result.stderr  # DCP's single-process note
    if task in ("mlm", "clm"):
        assert "perplexity" in result.stdout and report["perplexity"] > 1
        assert report["tokens"] == dev["tokens"] > 0
        assert f"tokens {report['tokens']:,.0f}\n" in result.stdout, result.stdout  # a count, not 8015.0000
        for metric in ("perplexity", "loss"):
            assert report[metric] == pytest.approx(dev[metric], rel=1e-5), metric  # sums in another order
    else:
        assert "macro avg" in result.stdout and report["classes"]
        for metric in METRICS[task]:
            assert report[metric] == pytest.approx(dev[metric], rel=1e-6), (metric, report[metric], dev[metric])
    if task == "classify":
        assert {"accuracy", "macro_f1"} <= set(report)


def test_eval_headlines_the_runs_task_metric(task_runs):
    """A classify run picks its best checkpoint by macro_f1 (task.metric): eval's headline is that, not accuracy."""
    run = task_runs["classify"]
    assert yaml.safe_load((run / "config.yaml").read_text())["task"]["metric"] == "macro_f1"
    result = run_distrain("eval", f"ckpt={run / 'checkpoints' / f'step_{STEPS}'}", "split=dev", "max_samples=32")
    report = json.loads((run / "checkpoints" / f"step_{STEPS}_eval" / "eval_dev.json").read_text())
    (dev,) = [r for r in records(run) if r["kind"] == "eval" and r["step"] == STEPS]
    assert report.get("metric") == "macro_f1", report
    assert report["macro_f1"] == pytest.approx(dev["macro_f1"], rel=1e-6)
    headline = re.search(r"^dev (\S+) ([0-9.]+) \(task\.metric\)$", result.stdout, re.MULTILINE)
    assert headline and headline.group(1) == "macro_f1", result.stdout
    assert float(headline.group(2)) == pytest.approx(dev["macro_f1"], abs=1e-4)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_the_export_loads_into_its_pipeline(task_runs, task):
    from transformers import pipeline

    _, pipeline_task, text, _ = TASKS[task]
    runner = pipeline(pipeline_task, model=str(task_runs[task] / "export"))
    labels = export_labels(task_runs[task])
    if task == "ner":  # entities of the export's types at their places in the text (maybe none after 4 steps)
        for entity in runner(text, aggregation_strategy="first"):
            assert f"B-{entity['entity_group']}" in labels and text[entity["start"] : entity["end"]], entity
    elif task == "classify":
        (best,) = runner(text)
        assert best["label"] in labels and 0 < best["score"] <= 1, best
    elif task == "mlm":
        fills = runner(text)
        assert len(fills) == 5 and all(f["sequence"] and f["token_str"] for f in fills), fills
        assert [f["score"] for f in fills] == sorted((f["score"] for f in fills), reverse=True), fills
    else:
        (generated,) = runner(text, max_new_tokens=5, do_sample=False)
        assert generated["generated_text"].startswith(text) and len(generated["generated_text"]) > len(text)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_the_export_has_a_model_card_with_front_matter_metrics_and_config(task_runs, task):
    run = task_runs[task]
    card = (run / "export" / "README.md").read_text()
    _, front_matter, body = card.split("---\n", 2)
    front = yaml.safe_load(front_matter)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == TASKS[task][1], front
    assert {"distrain", task} <= set(front["tags"]) and "base_model" not in front  # random init: no base model
    (dev,) = [r for r in records(run) if r["kind"] == "eval" and r["step"] == STEPS]
    for metric in METRICS[task]:
        assert f"| {metric} | {dev[metric]:.6g} |" in body
    config = yaml.safe_load(body.split("```yaml\n")[-1].split("```")[0])
    assert config == yaml.safe_load((run / "config.yaml").read_text())
    if task == "ner":  # the task's own advice
        assert 'aggregation_strategy="first"' in body


@pytest.mark.parametrize("task", ALL_TASKS)
def test_predict_writes_one_json_line_per_input_line(task_runs, task, tmp_path):
    _, _, text, keys = TASKS[task]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text(f"{text}\n\n{text}\n{text}\n")
    out = tmp_path / "out.jsonl"
    # batch_size=2: a batch of two, then a batch of one (which the pipelines return unwrapped)
    run_distrain("predict", f"ckpt={task_runs[task]}", f"input={inputs}", f"output={out}", "max_new_tokens=8",
                 "batch_size=2")  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and lines[1] == {"input": "", "skipped": "empty line"}
    assert keys <= set(lines[0]) and lines[0]["input"] == text
    assert lines[0] == lines[2] == lines[3]  # deterministic (greedy decoding for clm), whatever the batch
    check_prediction(task, lines[0], export_labels(task_runs[task]))


def export_labels(run: Path) -> list[str]:
    """The label names of the run's export (what `predict ckpt=<run dir>` loads), from its config.json."""
    config = json.loads((run / "export" / "config.json").read_text())
    return [config["id2label"][k] for k in sorted(config.get("id2label", {}), key=int)]


def check_prediction(task: str, line: dict, labels: list[str]) -> None:
    """One predict output line, checked by value against its input and the export's labels."""
    text = line["input"]
    if task == "ner":
        types = {label[2:] for label in labels if label.startswith("B-")}
        assert types, labels
        assert isinstance(line["entities"], list)
        for entity in line["entities"]:
            assert set(entity) == {"type", "text", "start", "end", "score"}, entity
            assert 0 <= entity["start"] < entity["end"] <= len(text), entity
            assert entity["text"] == text[entity["start"] : entity["end"]], entity
            assert entity["type"] in types, (entity, types)
            assert 0 < entity["score"] <= 1, entity
    elif task == "classify":
        assert line["label"] in labels and len(labels) == 5, (line, labels)
        assert 0 < line["score"] <= 1, line
    elif task == "mlm":
        fills = line["fills"]
        assert fills and all(isinstance(f["token"], str) and f["token"] for f in fills), fills
        scores = [f["score"] for f in fills]
        assert all(0 < s <= 1 for s in scores), fills
        assert scores == sorted(scores, reverse=True), fills
    else:
        assert isinstance(line["continuation"], str) and line["continuation"], line


@pytest.mark.parametrize("task", [t for t in ALL_TASKS if t.values[0] in ("ner", "mlm")])
def test_predict_reads_one_line_from_standard_input_and_uses_checkpoints_too(task_runs, task):
    import subprocess

    from conftest import DISTRAIN

    _, _, text, keys = TASKS[task]
    result = subprocess.run(
        [DISTRAIN, "predict", f"ckpt={task_runs[task] / 'checkpoints' / f'step_{STEPS}'}"],
        input=f"{text}\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    line = json.loads(line)
    assert line["input"] == text and keys <= set(line)
    check_prediction(task, line, export_labels(task_runs[task]))


@pytest.mark.slow
def test_preprocessing_runs_once_per_node(task_runs):
    """In the 2-process clm run, rank 0 built the tokenized cache; rank 1 waited and read it."""
    logs = task_runs["clm"] / "logs"
    rank0, rank1 = (logs / "rank_0.log").read_text(), (logs / "rank_1.log").read_text()
    assert "building the tokenized cache" in rank0 and "building the tokenized cache" not in rank1
    assert "reading the tokenized cache" in rank1
    caches = [p for p in (task_runs["clm"].parent / "clm-cache" / "clm").iterdir()]
    assert len(caches) == 1 and sorted(p.name for p in caches[0].glob("*.arrow")) == [
        "dev.arrow",
        "test.arrow",
        "train.arrow",
    ]


@pytest.mark.slow
def test_a_run_trains_its_own_tokenizer_and_exports_it(task_runs):
    run = task_runs["clm"]
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    vocab = json.loads((run / "export" / "config.json").read_text())["vocab_size"]
    assert vocab == 512


def test_report_does_not_rank_runs_that_score_different_metrics(task_runs):
    """An F1 and a classifier's metric in one ranking would mean nothing: exit 2 naming each group."""
    task_runs["ner"], task_runs["classify"]  # noqa: B018 (both trained)
    result = run_distrain("report", str(task_runs.root), check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and f"the runs of {task_runs.root} score different metrics" in said, said
    assert f"task ner, dev f1: 1 runs, e.g. {task_runs['ner']}" in said and "task classify, dev " in said, said
    assert not (task_runs.root / "report.csv").exists()
