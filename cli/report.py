"""`distrain report <sweep dir or run dir>`: the runs ranked by their dev metric, with what each changed.

A sweep dir is any folder whose sub-folders are run dirs (a multirun's `<hydra.sweep.dir>`, an Optuna study's).
Each run's metric is its best dev metric (summary.json, which a rerun moves aside when it starts; for a run still
going or one that died, the best eval record so far, and its status says which: a launcher holds a running one's
LOCK); the direction comes from the task (perplexity and loss: lower is better). The table shows the overrides
that differ between the runs; the same rows go to report.csv in the given folder.
Those keys are also plotted: the dev metric against each, one PNG per key in <folder>/report/ (a log
axis for values spanning more than 20x, such as learning rates), the best run marked. For a run dir,
<run>/report/training.png shows loss, learning rate, tokens/s and the dev metric against step (evaluations and
resumes marked); for a sweep dir, <folder>/report/curves.png overlays the loss and dev metric of every run.
The sweep dir of a study (hparams_search=..., with study.json) also gets the study's own view, read from its
storage: trials by state and ranked (pruned ones with the step they stopped at), Optuna's parameter importances,
and report/study_history.png, intermediate_values.png, importances.png.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from distrain.cli.console import console, print_error
from distrain.cli.rundir import holder_now
from distrain.trainer.config import run_files
from distrain.trainer.observe.reporting import read_metrics
from distrain.trainer.tasks import task_class

JOB_KEYS = ("run.", "sweep.", "launcher.rdzv_id", "launcher.rdzv_endpoint")


def run_dirs(folder: Path) -> list[Path]:
    """The run dir `folder`, or its sub-folders that are run dirs or a sweep's jobs refused before they started
    (a summary.json without config.yaml)."""
    if (folder / run_files.CONFIG).is_file():
        return [folder]
    found = [p for p in folder.iterdir()
             if p.is_dir() and ((p / run_files.CONFIG).is_file() or (p / run_files.SUMMARY).is_file())]  # fmt: skip
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def status_of(summary: dict[str, Any]) -> str:
    """A summary's status, with why for a refused or failed one (each problem's first line: a failed run's also
    lists every rank's log)."""
    why = "; ".join(problem.splitlines()[0] for problem in summary.get("problems", []) if problem)
    return f"{summary['status']}: {why}" if why else summary["status"]


def describe(run: Path) -> dict[str, Any]:
    overrides = yaml.safe_load((run / run_files.OVERRIDES).read_text()) if (run / run_files.OVERRIDES).exists() else []
    if not (run / run_files.CONFIG).is_file():  # a sweep's job refused before it started: no metric, no task
        summary = json.loads((run / run_files.SUMMARY).read_text())
        return {"run": run, "metric": None, "task": None, "overrides": overrides, "value": None, "best_step": None,
                "status": status_of(summary)}  # fmt: skip
    config = yaml.safe_load((run / run_files.CONFIG).read_text())
    metric, task = config["task"]["metric"], task_class(config["task"]["name"])
    row: dict[str, Any] = {
        "run": run,
        "metric": metric,
        "task": task,
        "overrides": overrides,
        "value": None,
        "best_step": None,
    }
    summary = run / run_files.SUMMARY
    if summary.exists():
        data = json.loads(summary.read_text())
        row.update(value=data.get("best_metric"), best_step=data.get("best_step"), status=status_of(data))
        return row
    evals = []
    if (run / run_files.METRICS).exists():
        evals = [r for r in read_metrics(run / run_files.METRICS) if r["kind"] == "eval" and r["step"] > 0]
    if evals:
        best_first = task.best_first(metric)
        best = min(evals, key=lambda r: best_first(r[metric]))
        row.update(value=best[metric], best_step=best["step"])
    if holder := holder_now(run):
        row["status"] = f"running (pid {holder.get('pid', '?')} on {holder.get('host', '?')})"
    elif evals or (run / run_files.LOGS).exists():
        row["status"] = "failed or killed (no summary.json; logs/ says why)"
    else:
        row["status"] = "not started"
    return row


def as_numbers(values: list[str]) -> list[float] | None:
    """The override values as numbers, or None when one is not a number (a categorical key such as model=...)."""
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def short(value: str) -> str:
    """A swept value for a legend: numbers to 4 significant digits (a random search draws 0.0004598786090752841)."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def log_axis(ax: Any, xs: list[float]) -> None:
    """Learning rates and the like: searched on a log scale, shown on one, with plain tick labels."""
    from matplotlib import ticker

    ax.set_xscale("log")
    if max(xs) / min(xs) < 1000:  # a range of one to three decades: ticks at 1, 2 and 5 times each power of ten
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def plot_key(plt: Any, key: str, scored: list[tuple[dict, dict]], metric: str, direction: str, path: Path) -> Path:
    """The dev metric of each scored run against its value of `key`; scored[0] is the best run."""
    values = [over.get(key, "") for _, over in scored]
    ys = [row["value"] for row, _ in scored]
    xs = as_numbers(values)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if xs is None:
        categories = sorted(set(values))
        xs = [categories.index(v) for v in values]
        ax.set_xticks(range(len(categories)), [v or "(not set)" for v in categories])
        ax.set_xlim(-0.5, len(categories) - 0.5)
    elif min(xs) > 0 and max(xs) / min(xs) > 20:
        log_axis(ax, xs)
    elif len(set(xs)) <= 5:  # a choice such as batch sizes: a tick at each value
        ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
    ax.scatter(xs, ys, s=40, color="tab:blue", label="runs (named as in the table)")
    if len(scored) <= 20:  # the run names tie each point to its row of the table
        for (row, _), x, y in zip(scored, xs, ys, strict=True):
            ax.annotate(row["run"].name, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8, color="gray")
    best = scored[0][0]
    ax.scatter([xs[0]], [ys[0]], s=260, marker="*", color="tab:red", zorder=3,
               label=f"best: run {best['run'].name} ({ys[0]:.4f})")  # fmt: skip
    ax.set_xlabel(key)
    ax.set_ylabel(f"dev {metric}, {direction}")
    ax.set_title(f"dev {metric} against {key} ({len(scored)} runs)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_against_keys(
    folder: Path, rows: list[dict], seen: list[dict], keys: list[str], metric: str, direction: str
) -> list[Path]:
    """One PNG per key that differs between the runs, in <folder>/report/; rows are sorted best first."""
    scored = [(row, over) for row, over in zip(rows, seen, strict=True) if row["value"] is not None]
    if not scored or not keys:
        return []
    plt = pyplot()
    out = folder / "report"
    out.mkdir(exist_ok=True)
    return [plot_key(plt, key, scored, metric, direction, out / f"{key.replace('/', '_')}.png") for key in keys]


def pyplot() -> Any:
    # Imported here, not at the top: matplotlib takes a second to import, and `distrain --help` needs none of it.
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def curves(run: Path) -> dict[str, Any]:
    """A run's train and eval records by step (the last record of a step wins: after a crash, the resumed run
    redoes the steps since its checkpoint) and the steps it was resumed at."""
    records = read_metrics(run / run_files.METRICS) if (run / run_files.METRICS).exists() else []
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    dev = {r["step"]: r for r in records if r["kind"] == "eval" and r["split"] == "dev"}
    resumes = sorted({r["step"] for r in records if r["kind"] == "resume"})
    return {"train": dict(sorted(train.items())), "dev": dict(sorted(dev.items())), "resumes": resumes}


def series_of(by_step: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    points = [(step, r[key]) for step, r in by_step.items() if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(plt: Any, run: Path, metric: str, direction: str, path: Path) -> Path:
    """Loss, learning rate, tokens/s and the dev metric against step, in one 2x2 figure."""
    data = curves(run)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        ("loss", "train loss (mean per target token)", "tab:blue"),
        ("lr", "learning rate", "tab:green"),
        ("tokens_per_s", "throughput (real tokens/s, all ranks)", "tab:purple"),
    ]
    for ax, (key, label, color) in zip(axes.flat, panels, strict=False):
        xs, ys = series_of(data["train"], key)
        ax.plot(xs, ys, color=color, marker="." if len(xs) <= 50 else None, label=label.split(" (")[0])
        dev_xs, dev_ys = series_of(data["dev"], "loss") if key == "loss" else ([], [])
        if dev_xs:  # the same normalisation as the train loss, without class weights
            ax.plot(dev_xs, dev_ys, color="tab:orange", marker="o", label="dev loss")
        if key == "tokens_per_s":
            profiled = [(s, r[key]) for s, r in data["train"].items() if r.get("profiled")]
            if profiled:
                ax.scatter(*zip(*profiled, strict=True), marker="x", color="black", zorder=3,
                           label="profiled steps (not comparable)")  # fmt: skip
        ax.set_ylabel(label)
    if data["train"] and max(series_of(data["train"], "lr")[1] or [0]) > 0:
        axes[0, 1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax = axes[1, 1]
    xs, ys = series_of(data["dev"], metric)
    ax.plot(xs, ys, color="tab:orange", marker="o", label=f"dev {metric} (each evaluation)")
    ax.set_ylabel(f"dev {metric}, {direction}")
    for ax in axes.flat:
        for i, step in enumerate(data["resumes"]):
            ax.axvline(step, color="tab:red", linestyle="--", alpha=0.7, label="resumed here" if i == 0 else None)
        if ax is not axes[1, 1]:
            for i, step in enumerate(data["dev"]):
                ax.axvline(step, color="gray", linestyle=":", alpha=0.4, label="dev evaluation" if i == 0 else None)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(f"run {run.parent.name}/{run.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs_overlaid(plt: Any, rows: list[dict], labels: list[str], metric: str, direction: str, path: Path) -> Path:
    """The train loss and dev metric of every run against step, one colour per run, named by its overrides."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for row, label in zip(rows, labels, strict=True):
        data = curves(row["run"])
        (line,) = left.plot(*series_of(data["train"], "loss"), label=label)
        right.plot(*series_of(data["dev"], metric), marker="o", color=line.get_color(), label=label)
    left.set_ylabel("train loss (mean per target token)")
    right.set_ylabel(f"dev {metric}, {direction}")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    # Below both panels: the labels are long, and inside an axes they would hide curves.
    rows_of_legend = len(rows) if len(rows) <= 6 else (len(rows) + 1) // 2
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=1 if len(rows) <= 6 else 2, fontsize=8,
               title="run: overrides that differ between runs (best first)", title_fontsize=8)  # fmt: skip
    fig.suptitle(f"train loss and dev {metric} of {len(rows)} runs")
    fig.tight_layout(rect=(0, min(0.5, 0.06 + 0.045 * rows_of_legend), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def study_report(folder: Path) -> list[Path]:
    """The study of a sweep dir (study.json names its storage), as Optuna reads it; the plots written."""
    info = json.loads((folder / "study.json").read_text())
    import optuna
    from optuna.trial import TrialState

    from distrain.trainer.search.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name=info["study_name"], storage=open_storage(info["storage"]))
    except Exception as error:  # e.g. an RDB whose password study.json does not keep
        console.print(f"study {info['study_name']}: cannot open {info['storage']} ({error})", highlight=False)
        return []
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    states = ", ".join(f"{n} {state.name.lower()}" for state, n in counts.items() if n)
    direction = study.direction.name.lower()
    console.print(f"study {study.study_name} in {info['storage']} ({direction}): {len(trials)} trials, {states}",
                  highlight=False)  # fmt: skip
    table = Table(title=f"trials of study {study.study_name}, best first")
    for column in ("rank", "trial", "state", "value", "stopped at step", "params"):
        table.add_column(column, justify="left" if column in ("state", "params") else "right")
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    ranked = sorted(trials, key=lambda t: (t.state != TrialState.COMPLETE, t.value is None, sign * (t.value or 0)))
    for rank, t in enumerate(ranked, start=1):
        stopped = str(max(t.intermediate_values)) if t.state == TrialState.PRUNED and t.intermediate_values else ""
        params = " ".join(f"{k}={short(str(v))}" for k, v in t.params.items())
        value = "-" if t.value is None else f"{t.value:.4f}"
        table.add_row(str(rank), str(t.number), t.state.name.lower(), value, stopped, params)
    console.print(table)
    plots, out = [], folder / "report"
    out.mkdir(exist_ok=True)
    importances = None
    fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)  # named, and seeded: the same figures each time
    if counts[TrialState.COMPLETE] >= 2:
        try:
            importances = optuna.importance.get_param_importances(study, evaluator=fanova)
            console.print("parameter importances (Optuna, fANOVA): " + ", ".join(
                f"{k} {v:.2f}" for k, v in importances.items()), highlight=False)  # fmt: skip
        except (RuntimeError, ValueError) as error:  # e.g. every trial had the same value of each key
            console.print(f"parameter importances: not available ({error})", highlight=False)
    else:
        console.print("parameter importances: need 2 or more complete trials", highlight=False)
    plt = pyplot()
    import warnings

    from optuna.visualization import matplotlib as optuna_plots

    drawings = [("study_history.png", optuna_plots.plot_optimization_history, counts[TrialState.COMPLETE] > 0),
                ("intermediate_values.png", optuna_plots.plot_intermediate_values,
                 any(t.intermediate_values for t in trials)),
                ("importances.png", lambda s: optuna_plots.plot_param_importances(s, evaluator=fanova),
                 bool(importances))]  # fmt: skip
    for name, draw, wanted in drawings:
        if not wanted:
            continue
        with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
            warnings.simplefilter("ignore")
            ax = draw(study)
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        plots.append(out / name)
    return plots


def main() -> None:
    args = sys.argv[1:]
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    folder = Path(args[0]).expanduser().resolve()
    runs = run_dirs(folder) if folder.is_dir() else []
    if not runs:
        print_error("nothing to report", f"{folder} is neither a run dir nor a folder of run dirs (with config.yaml)")
        raise SystemExit(2)
    rows = [describe(run) for run in runs]
    trained = [row for row in rows if row["task"]]
    if not trained:
        print_error("nothing to report", "no run of " + str(folder) + " started:\n"
                    + "\n".join(f"{row['run'].name}: {row['status']}" for row in rows))  # fmt: skip
        raise SystemExit(2)
    groups: dict[tuple[str, str], list[Path]] = {}
    for row in trained:
        groups.setdefault((row["task"].name, row["metric"]), []).append(row["run"])
    if len(groups) > 1:  # one ranking of an F1, a loss and a reward accuracy would mean nothing
        lines = [f"task {name}, dev {metric}: {len(found)} runs, e.g. {found[0]}"
                 for (name, metric), found in groups.items()]  # fmt: skip
        print_error("runs not comparable", f"the runs of {folder} score different metrics:\n" + "\n".join(lines)
                    + "\nreport a folder of one experiment's runs (a sweep dir, or runs/<run.name>)")  # fmt: skip
        raise SystemExit(2)
    metric, task = trained[0]["metric"], trained[0]["task"]
    best_first = task.best_first(metric)
    rows.sort(key=lambda r: (r["task"] is None, r["value"] is None, best_first(r["value"] or 0)))
    # Show only what differs between runs (in a sweep: the swept keys), not where or as which job each ran (a SLURM
    # job's rendezvous id and endpoint, from train.sbatch)
    seen = [dict(o.split("=", 1) for o in r["overrides"] if "=" in o) for r in rows]
    keys = sorted({k for s in seen for k in s if len({s2.get(k) for s2 in seen}) > 1 and not k.startswith(JOB_KEYS)})
    direction = task.direction(metric)
    console.print(f"runs in {folder}", highlight=False)
    table = Table(title=f"{len(rows)} runs ranked by dev {metric} ({direction})")
    for column in ("rank", "run", f"dev {metric}", "best step", "status", *keys):
        table.add_column(column, justify="right" if column not in ("run", "status") else "left")
    out_rows = []
    for rank, (row, over) in enumerate(zip(rows, seen, strict=True), start=1):
        name = str(row["run"].relative_to(folder)) if row["run"] != folder else row["run"].name
        value = "-" if row["value"] is None else f"{row['value']:.4f}"
        table.add_row(str(rank), name, value, str(row["best_step"] or "-"), row.get("status") or "-",
                      *(over.get(k, "") for k in keys))  # fmt: skip
        out_rows.append({"rank": rank, "run": str(row["run"]), metric: row["value"], "best_step": row["best_step"],
                         "status": row.get("status"), **{k: over.get(k, "") for k in keys}})  # fmt: skip
    console.print(table)
    with open(folder / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out_rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)
    console.print(f"wrote {folder / 'report.csv'}", highlight=False)
    plots = plot_metric_against_keys(folder, rows, seen, keys, metric, direction)
    (folder / "report").mkdir(exist_ok=True)
    if runs == [folder]:
        plots.append(plot_run(pyplot(), folder, metric, direction, folder / "report" / "training.png"))
    else:
        labels = [f"{row['run'].name}: " + (" ".join(f"{k}={short(over[k])}" for k in keys if k in over) or "-")
                  for row, over in zip(rows, seen, strict=True)]  # fmt: skip
        started = [i for i, row in enumerate(rows) if row["task"]]  # a refused job has no curves
        plots.append(plot_runs_overlaid(pyplot(), [rows[i] for i in started], [labels[i] for i in started], metric,
                                        direction, folder / "report" / "curves.png"))  # fmt: skip
    if (folder / "study.json").is_file():
        plots += study_report(folder)
    for path in plots:
        console.print(f"wrote {path}", highlight=False)


if __name__ == "__main__":
    main()
