"""`distrain report <sweep dir or run dir>`: the runs ranked by their dev metric, with what each changed.

A sweep dir is any folder whose sub-folders are run dirs (a multirun's `<hydra.sweep.dir>`, an Optuna study's).
Each run's metric is its best dev metric (summary.json; for a run still going, the best eval record so far); the
direction comes from the task (perplexity and loss: lower is better). The table shows the overrides that differ
between the runs; the same rows go to report.csv in the given folder.
Those keys are also plotted: the dev metric against each, one PNG per key in <folder>/report/ (a log
axis for values spanning more than 20x, such as learning rates), the best run marked.
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
from distrain.trainer.reporting import read_metrics
from distrain.trainer.tasks import task_class


def run_dirs(folder: Path) -> list[Path]:
    if (folder / "config.yaml").is_file():
        return [folder]
    found = [p for p in folder.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def describe(run: Path) -> dict[str, Any]:
    config = yaml.safe_load((run / "config.yaml").read_text())
    metric, task = config["task"]["metric"], task_class(config["task"]["name"])
    overrides = yaml.safe_load((run / "overrides.yaml").read_text()) if (run / "overrides.yaml").exists() else []
    row: dict[str, Any] = {
        "run": run,
        "metric": metric,
        "task": task,
        "overrides": overrides,
        "value": None,
        "best_step": None,
    }
    summary = run / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        row.update(value=data.get("best_metric"), best_step=data.get("best_step"), status=data.get("status"))
        return row
    evals = []
    if (run / "metrics.jsonl").exists():
        evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval" and r["step"] > 0]
    if evals:
        best_first = task.best_first(metric)
        best = min(evals, key=lambda r: best_first(r[metric]))
        row.update(value=best[metric], best_step=best["step"])
    row["status"] = "running or failed" if evals or (run / "logs").exists() else "not started"
    return row


def as_numbers(values: list[str]) -> list[float] | None:
    """The override values as numbers, or None when one is not a number (a categorical key such as model=...)."""
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


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
    # Imported here, not at the top: matplotlib takes a second to import, and `distrain --help` needs none of it.
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out = folder / "report"
    out.mkdir(exist_ok=True)
    return [plot_key(plt, key, scored, metric, direction, out / f"{key.replace('/', '_')}.png") for key in keys]


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
    metric, task = rows[0]["metric"], rows[0]["task"]
    best_first = task.best_first(metric)
    rows.sort(key=lambda r: (r["value"] is None, best_first(r["value"] or 0)))
    # Show only what differs between runs (in a sweep: the swept keys).
    seen = [dict(o.split("=", 1) for o in r["overrides"] if "=" in o) for r in rows]
    keys = sorted({k for s in seen for k in s if len({s2.get(k) for s2 in seen}) > 1 and not k.startswith("run.")})
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
    for path in plot_metric_against_keys(folder, rows, seen, keys, metric, direction):
        console.print(f"wrote {path}", highlight=False)


if __name__ == "__main__":
    main()
