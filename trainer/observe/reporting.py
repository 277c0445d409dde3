"""What a run reports: `metrics.jsonl` (rank 0), a rich progress bar or log lines, and the final summary table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from distrain.trainer import strict_json


def make_console(stderr: bool = False) -> Console:
    """The one kind of rich Console distrain prints with: on a terminal, its width; in logs and pipes (nothing to
    measure), 160 columns, so lines and tables stay whole instead of rich's default 80."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


console = make_console()  # rank 0's (other ranks write to their log files)


class MetricsWriter:
    """Appends one JSON object per line; a resumed run keeps appending to the same file."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 (lives with the run)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(strict_json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if key == "kind" or value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        parts.append(f"{key} {value}")
    return "  ".join(parts)


class RunProgress:
    """A live progress bar on a terminal; plain log lines otherwise (CI logs, files). Rank 0 only."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.enabled = enabled
        self.console = console
        self.live = enabled and self.console.is_terminal
        self.bar: Progress | None = None
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=completed, stats="")
            self.bar.start()

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None and record["kind"] == "train":
            self.bar.update(self.task, stats=f"loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tok/s")
        if self.bar is None or record["kind"] != "train":
            self.print(f"[{record['kind']}] {format_record(record)}")

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="distrain run summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key.replace("_", " "), str(value))
    return table
