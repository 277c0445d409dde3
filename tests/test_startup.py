"""Start-up: commands that only compose a config do not import torch."""

from __future__ import annotations

import subprocess
import sys


def imported_modules(*args: str) -> tuple[set[str], int]:
    """The modules a `distrain` command imports (python -X importtime), and its exit code."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "distrain.cli.main", *args],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    return set(lines), result.returncode


def test_printing_the_config_and_rejecting_one_import_neither_torch_nor_transformers():
    for args, code in ((["train", "+debug=tiny", "--cfg", "job"], 0), (["train", "+debug=tiny", "optim.lr=abc"], 2)):
        modules, returncode = imported_modules(*args)
        assert returncode == code
        assert "hydra" in modules and not {"torch", "transformers", "datasets"} & modules, args
