"""Sweeps from the shell: a grid multirun, an Optuna (TPE) study and random searches, each job a run dir of its own,
ranked and plotted by `distrain report`. Second CI stage (25 single-process runs of a few seconds)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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


# Random search and TPE over the same space with the same seed: six trials each.
SEARCHED = ["optim.lr", "optim.weight_decay", "train.micro_batch_size"]


def run_search(folder: Path, cache_dir: str, *sampler: str) -> Path:
    searched = [o for o in SWEEP if not o.startswith("optim.lr=")]  # a fixed value would replace the search
    run_distrain("train", *searched, f"data.cache_dir={cache_dir}", "hparams_search=ner_optuna", *sampler,
                 "hydra.sweeper.n_trials=6", "train.micro_batch_size=choice(4,8)",
                 f"hydra.sweep.dir={folder}")  # fmt: skip
    return folder


def drawn(sweep: Path) -> list[dict[str, str]]:
    """Each trial's searched values, in trial order, as the trial's run dir recorded them (overrides.yaml)."""
    values = []
    for trial in range(6):
        overrides = yaml.safe_load((sweep / str(trial) / "overrides.yaml").read_text())
        values.append(dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in SEARCHED))
    return values


@pytest.fixture(scope="module")
def random_search(tmp_path_factory, cache_dir) -> Path:
    return run_search(tmp_path_factory.mktemp("random"), cache_dir, "hydra/sweeper/sampler=random")


def test_a_random_search_rerun_with_its_seed_draws_the_same_values(random_search, tmp_path, cache_dir):
    first = drawn(random_search)
    assert all(set(trial) == set(SEARCHED) for trial in first) and len({t["optim.lr"] for t in first}) == 6
    assert drawn(run_search(tmp_path, cache_dir, "hydra/sweeper/sampler=random")) == first


def test_tpe_starts_with_the_random_draws_then_models_the_results(random_search, tmp_path, cache_dir):
    tpe = drawn(run_search(tmp_path, cache_dir, "hydra.sweeper.sampler.n_startup_trials=2"))
    random = drawn(random_search)
    assert tpe[:2] == random[:2]  # TPE's startup trials are the seed's random draws
    assert all(t["optim.lr"] != r["optim.lr"] for t, r in zip(tpe[2:], random[2:], strict=True))


def test_the_report_ranks_a_random_search_and_plots_the_metric_against_each_key(random_search):
    import matplotlib.image

    report = run_distrain("report", str(random_search))
    rows = report_rows(random_search)
    values = [float(r["accuracy"]) for r in rows]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5, 6] and values == sorted(values, reverse=True)
    results = yaml.safe_load((random_search / "optimization_results.yaml").read_text())
    assert values[0] == pytest.approx(results["best_value"])
    assert float(rows[0]["optim.lr"]) == pytest.approx(results["best_params"]["optim.lr"])
    for key in SEARCHED:
        png = random_search / "report" / f"{key}.png"
        assert f"wrote {png}" in report.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > 400 and height > 300
