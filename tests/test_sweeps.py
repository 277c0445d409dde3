"""Sweeps from the shell: a grid multirun and Optuna studies (trainer/search), each trial a run dir of its own, ranked
and plotted by `distrain report`. A study killed with SIGKILL and rerun ends with n_trials finished trials and no
repeated parameters; the median pruner stops a hopeless trial, whose run dir keeps a loadable checkpoint; two
trials run at once. Second CI stage (single-process runs of a few seconds each)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import optuna
import pytest
import yaml
from conftest import DISTRAIN, TINY, run_distrain
from optuna.trial import TrialState

from distrain.trainer.search.study import open_storage

pytestmark = pytest.mark.slow
# Token accuracy moves in a few steps where entity F1 is still 0: it gives the ranking something to rank.
SWEEP = [*TINY, "train.max_steps=3", "task.metric=accuracy", "data.max_eval_samples=32"]


def report_rows(folder):
    with open(folder / "report.csv") as f:
        return list(csv.DictReader(f))


def test_a_grid_sweep_makes_a_run_per_combination_and_the_report_ranks_them(tmp_path, cache_dir):
    result = run_distrain("train", "-m", *SWEEP, f"data.cache_dir={cache_dir}", "optim.lr=1e-3,1e-2",
                          "train.micro_batch_size=4,8", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert result.stdout.count("distrain run summary") == 4
    combos = {tuple(sorted(o for o in yaml.safe_load((tmp_path / str(j) / "overrides.yaml").read_text())
                           if o.startswith(("optim.lr", "train.micro_batch_size")))) for j in range(4)}  # fmt: skip
    assert len(combos) == 4
    report = run_distrain("report", str(tmp_path))
    rows = report_rows(tmp_path)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    values = [float(r["accuracy"]) for r in rows]
    assert values == sorted(values, reverse=True)  # higher is better
    assert {"optim.lr", "train.micro_batch_size"} <= set(rows[0])
    best = json.loads((tmp_path / rows[0]["run"].rsplit("/", 1)[-1] / "summary.json").read_text())["best_metric"]
    assert best == pytest.approx(values[0])
    assert "ranked by dev accuracy (higher is better)" in report.stdout


# A study over the tiny run: its space (ner_optuna's) with a batch-size choice the tiny data fits.
STUDY = [*[o for o in SWEEP if not o.startswith("optim.lr=")], "hparams_search=ner_optuna",
         "train.micro_batch_size=choice(4,8)"]  # fmt: skip
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def load(sweep_dir, name="ner_optuna"):
    """The study as Optuna itself reads it from the sweep's storage."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # distrain's own opener: the sweep may be writing the new file's schema at this moment (it retries that race)
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{sweep_dir}/study.db"))


def wait(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_study_killed_after_three_trials_and_rerun_ends_with_n_trials_none_repeated(tmp_path, cache_dir):
    command = [*STUDY, f"data.cache_dir={cache_dir}", "sweep.n_trials=4", f"hydra.sweep.dir={tmp_path}"]
    with open(tmp_path.parent / f"{tmp_path.name}-first.log", "w") as log:
        first = subprocess.Popen([DISTRAIN, "train", *command], stdout=log, stderr=subprocess.STDOUT)
        states = []

        def three_done_one_running() -> bool:
            nonlocal states
            if first.poll() is not None or not (tmp_path / "study.db").exists():
                return first.poll() is not None
            try:
                states = [t.state for t in load(tmp_path).trials]
            except (KeyError, optuna.exceptions.StorageInternalError):  # the study is being created
                return False
            return sum(s in FINISHED for s in states) == 3 and TrialState.RUNNING in states

        wait(three_done_one_running, "three finished trials and a fourth running")
        assert first.poll() is None, (tmp_path.parent / f"{tmp_path.name}-first.log").read_text()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    before = [(t.number, t.state.name) for t in load(tmp_path).trials]
    (killed,) = [n for n, state in before if state == "RUNNING"]
    rerun = run_distrain("train", *command)
    study = load(tmp_path)
    after = [(t.number, t.state.name, t.user_attrs.get("retry_of")) for t in study.trials]
    print(f"before the rerun: {before}\nafter it: {after}")
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == 4 and len({tuple(sorted(t.params.items())) for t in finished}) == 4
    assert study.trials[killed].state == TrialState.FAIL
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == killed]
    assert retry.params == study.trials[killed].params and retry.state in FINISHED
    assert f"trial {killed} was running when its sweep died: marked failed" in rerun.stdout
    assert "1 of 4 trials" not in rerun.stdout and "3 of 4 trials finished" in rerun.stdout
    # the objective is each trial's own best dev metric, from its run dir's summary
    for trial in finished:
        summary = json.loads((tmp_path / str(trial.number) / "summary.json").read_text())
        assert trial.value == pytest.approx(summary["best_metric"])
        # no pruner, and still each dev evaluation is the study's intermediate value (its plot, the dashboard's)
        assert trial.intermediate_values == {3: pytest.approx(summary["best_metric"])}, trial.intermediate_values


def test_a_study_started_as_a_background_job_stops_on_sigint_and_queues_its_trial_again(tmp_path, cache_dir):
    """A shell starts a background job with SIGINT ignored; SIGINT to the sweeper alone (not its trial) still
    stops the study: the trial checkpoints and stops (its stop file), is told FAIL and queued again, exit 130."""
    command = [*STUDY, f"data.cache_dir={cache_dir}", "sweep.n_trials=2", "train.max_steps=5000",
               "train.eval_every=0", "train.log_every=1", f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    log = tmp_path.parent / f"{tmp_path.name}-sigint.log"
    with open(log, "w") as out:
        sweeper = subprocess.Popen([DISTRAIN, "train", *command], stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
        metrics = tmp_path / "0" / "metrics.jsonl"
        wait(lambda: sweeper.poll() is not None or metrics.exists() and metrics.stat().st_size > 0, "trial 0 training")
        assert sweeper.poll() is None, log.read_text()
        sweeper.send_signal(signal.SIGINT)
        assert sweeper.wait(timeout=120) == 130, log.read_text()
    study = load(tmp_path)
    first, queued = study.trials
    assert first.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.user_attrs.get("retry_of") == 0  # its parameters are the failed trial's (the kill test reruns one)
    summary = json.loads((tmp_path / "0" / "summary.json").read_text())
    assert summary["status"] == f"preempted at step {summary['step']}" and summary["step"] < 5000, summary
    assert list((tmp_path / "0" / "checkpoints").glob("step_*/COMPLETE"))


def test_the_median_pruner_stops_a_hopeless_trial_whose_run_dir_stays_usable(tmp_path, cache_dir):
    # A grid of a learning rate that trains and one that cannot move the weights: with seed 1 the grid tries
    # 5e-3 first; 1e-7 is then below the median at its first evaluation.
    run_distrain("train", *STUDY, f"data.cache_dir={cache_dir}", "sweep.sampler=grid", "sweep.pruner=median",
                 "sweep.seed=1", "sweep.n_startup_trials=1", "optim.lr=choice(5e-3,1e-7)", "optim.weight_decay=0.0",
                 "train.micro_batch_size=8", "train.max_steps=6", "train.eval_every=2", "train.log_every=5",
                 f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    study = load(tmp_path)
    assert [t.params["optim.lr"] for t in study.trials] == [5e-3, 1e-7]
    good, bad = study.trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [2, 4, 6]  # the last too
    assert bad.state == TrialState.PRUNED and list(bad.intermediate_values) == [2]
    assert bad.intermediate_values[2] < good.intermediate_values[2]
    run = tmp_path / str(bad.number)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["step"] == 2
    # its 2 steps, before the first train record was due (log_every 5), are logged and counted
    train = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2] and summary["real_tokens"] > 0 and summary["step_seconds"] > 0
    assert "sweep.pruner=median stopped trial 1 at step 2: dev accuracy" in summary["pruned"]
    assert (run / "checkpoints" / "step_2" / "COMPLETE").exists()
    # its checkpoint loads (resumable and exportable) and scores what the trial reported on the same 32 dev samples
    evaluated = run_distrain("eval", f"ckpt={run}", "split=dev", "max_samples=32")
    assert f"{bad.intermediate_values[2]:.4f}" in evaluated.stdout
    report = run_distrain("report", str(tmp_path))
    assert "pruned" in report.stdout and "1 complete, 1 pruned" in report.stdout
    assert (tmp_path / "report" / "study_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same study with another grid: its finished trials are not this grid's, so it is refused, not "done"
    changed = run_distrain("train", *STUDY, f"data.cache_dir={cache_dir}", "sweep.sampler=grid", "sweep.seed=1",
                           "optim.lr=choice(5e-3,1e-2)", "optim.weight_decay=0.0", "train.micro_batch_size=8",
                           "train.max_steps=6", f"hydra.sweep.dir={tmp_path}", check=False)  # fmt: skip
    said = " ".join(changed.stderr.split())
    assert changed.returncode == 2 and "has trials outside this grid (e.g. trial 1: optim.lr=1e-07)" in said, said
    assert len(load(tmp_path).trials) == 2


def test_two_trials_run_at_once_splitting_the_cores_and_the_report_reads_the_study(tmp_path, cache_dir):
    run_distrain("train", *STUDY, f"data.cache_dir={cache_dir}", "sweep.sampler=random", "sweep.n_trials=2",
                 "sweep.n_jobs=2", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    study = load(tmp_path)
    a, b = study.trials
    assert a.state == b.state == TrialState.COMPLETE
    print(f"trial 0 {a.datetime_start} .. {a.datetime_complete}; trial 1 {b.datetime_start} .. {b.datetime_complete}")
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete  # overlapping
    threads = max(1, (os.cpu_count() or 1) // 2)
    for trial in (a, b):
        assert yaml.safe_load((tmp_path / str(trial.number) / "config.yaml").read_text())["launcher"][
            "threads_per_process"] == threads  # fmt: skip
        assert "distrain run summary" in (tmp_path / f"trial_{trial.number}.log").read_text()
    report = run_distrain("report", str(tmp_path))
    rows = report_rows(tmp_path)
    values = [float(r["accuracy"]) for r in rows]
    assert len(rows) == 2 and values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(study.best_value) and "study ner_optuna" in report.stdout
    for key in ("optim.lr", "optim.weight_decay", "train.micro_batch_size"):
        png = tmp_path / "report" / f"{key}.png"
        assert f"wrote {png}" in report.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
