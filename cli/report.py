"""`distrain report <sweep dir or run dir>`: the runs ranked by their dev metric, with what each changed.

A sweep dir is any folder whose sub-folders are run dirs (a multirun's `<hydra.sweep.dir>`, an Optuna study's).
Each run's metric is its best dev metric (summary.json; for a run still going, the best eval record so far); the
direction comes from the metric (perplexity and loss: lower is better). The table shows the overrides that differ
between the runs; the same rows go to report.csv in the given folder.
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
from distrain.trainer.tasks import LOWER_IS_BETTER


def run_dirs(folder: Path) -> list[Path]:
    if (folder / "config.yaml").is_file():
        return [folder]
    found = [p for p in folder.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def describe(run: Path) -> dict[str, Any]:
    config = yaml.safe_load((run / "config.yaml").read_text())
    metric = config["task"]["metric"]
    overrides = yaml.safe_load((run / "overrides.yaml").read_text()) if (run / "overrides.yaml").exists() else []
    row: dict[str, Any] = {"run": run, "metric": metric, "overrides": overrides, "value": None, "best_step": None}
    summary = run / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        row.update(value=data.get("best_metric"), best_step=data.get("best_step"), status=data.get("status"))
        return row
    evals = []
    if (run / "metrics.jsonl").exists():
        lines = (run / "metrics.jsonl").read_text().splitlines()
        evals = [r for r in map(json.loads, lines) if r["kind"] == "eval" and r["step"] > 0]
    sign = 1 if metric in LOWER_IS_BETTER else -1
    if evals:
        best = min(evals, key=lambda r: sign * r[metric])
        row.update(value=best[metric], best_step=best["step"])
    row["status"] = "running or failed" if evals or (run / "logs").exists() else "not started"
    return row


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
    metric = rows[0]["metric"]
    sign = 1 if metric in LOWER_IS_BETTER else -1
    rows.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0)))
    # Show only what differs between runs (in a sweep: the swept keys).
    seen = [dict(o.split("=", 1) for o in r["overrides"] if "=" in o) for r in rows]
    keys = sorted({k for s in seen for k in s if len({s2.get(k) for s2 in seen}) > 1 and not k.startswith("run.")})
    direction = "lower is better" if sign == 1 else "higher is better"
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


if __name__ == "__main__":
    main()
