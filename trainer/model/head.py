"""The task head's settings (label names and ids) in the run dir: written once by the worker after reading the
data, so weights load later (eval, predict, export) without the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distrain.trainer import strict_json
from distrain.trainer.config import run_files


def save_head(run_dir: Path, head: dict[str, Any]) -> None:
    (run_dir / run_files.HEAD).write_text(strict_json.dumps(head, indent=1))


def load_head(run_dir: Path) -> dict[str, Any]:
    head = json.loads((run_dir / run_files.HEAD).read_text())
    if "id2label" in head:
        head["id2label"] = {int(k): v for k, v in head["id2label"].items()}  # JSON keys are strings
    return head
