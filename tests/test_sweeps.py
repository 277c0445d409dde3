"""Sweeps from the shell: a grid multirun and an Optuna (TPE) study, each job a run dir of its own, ranked by
`distrain report`. Second CI stage (seven single-process runs)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import TINY, run_distrain

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


def test_an_optuna_study_runs_its_trials_and_the_report_ranks_them(tmp_path, cache_dir):
    searched = [o for o in SWEEP if not o.startswith("optim.lr=")]  # a fixed value would replace the search
    run_distrain("train", *searched, f"data.cache_dir={cache_dir}", "hparams_search=ner_optuna",
                 "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
                 "train.micro_batch_size=choice(4,8)", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and set(results["best_params"]) == {
        "optim.lr", "optim.weight_decay", "train.micro_batch_size"}  # fmt: skip
    run_distrain("report", str(tmp_path))
    rows = report_rows(tmp_path)
    assert len(rows) == 3
    values = [float(r["accuracy"]) for r in rows]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(results["best_value"])
    assert {"optim.lr", "optim.weight_decay"} <= set(rows[0])
