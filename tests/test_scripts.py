"""Smoke tests of scripts/: each runs as a user runs it (`python scripts/<name>.py ...`) on tiny settings, and its
output is checked. The scripts import distrain's internals and nothing else runs them, so they rot silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TINY_RUN = ["+debug=tiny", "train.max_steps=10", "data.max_eval_samples=16"]  # a record every 5 steps: one after step 5


def run_script(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 1200):
    command = [sys.executable, str(SCRIPTS / name), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of a rich table as printed (not a terminal: 160 columns, one line per row), by first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│") and line.endswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def test_padding_waste_shows_no_padding_with_packing_only(tmp_path, cache_dir):
    result = run_script("padding_waste.py", "+experiment=shakespeare_clm", "model=llama_tiny",
                        "data.max_train_samples=200", "data.max_length=64", f"data.cache_dir={cache_dir}",
                        cwd=tmp_path)  # fmt: skip
    rows = table_rows(result.stdout)
    settings = ["packing", "no packing", "no packing, length-grouped batches"]
    assert sorted(rows) == sorted(settings), result.stdout
    fraction = {name: float(rows[name][0]) for name in settings}
    positions = {name: int(rows[name][1].replace(",", "")) for name in settings}
    assert rows["packing"][0] == "0.0000"  # packed blocks are exactly data.max_length tokens
    assert fraction["no packing"] > 0 and fraction["no packing, length-grouped batches"] > 0, fraction
    assert all(0 <= f < 1 for f in fraction.values()), fraction
    # an epoch of 16-sample global batches of 64-token blocks, the last partial batch dropped
    assert positions["packing"] % (16 * 64) == 0 and 0 < positions["packing"] <= 200 * 64, positions
    assert all(p > 0 for p in positions.values()), positions


def test_bench_compress_latency_measures_the_student_and_the_pruning_steps(tmp_path):
    result = run_script("bench_compress_latency.py", "--repeats", "3", cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert any(line.startswith("teacher, 6 layers: 22,568,841 parameters") for line in lines), result.stdout
    assert any(line.startswith("student, blocks [0,2,4]: 17,245,449 parameters") for line in lines), result.stdout
    assert sum(line.startswith("prune ") and "of 10,616,832 weights" in line for line in lines) == 2, result.stdout
    # 768 of each layer's 1,536 neurons removed: 6 x 768 x (384 + 384 + 1) parameters fewer
    assert any(line.startswith("teacher, structured 50% of the feed-forward neurons (intermediate_size 768): "
                               "19,025,289 parameters") for line in lines), result.stdout  # fmt: skip
    assert any(line.startswith("student, structured 50% of the feed-forward neurons (intermediate_size 768): "
                               "15,473,673 parameters") for line in lines), result.stdout  # fmt: skip


def test_sweep_bench_compares_pruning(tmp_path, cache_dir):
    """The pruning half on 2 trials per study (test_sweeps kills and reruns a study itself)."""
    result = run_script("sweep_bench.py", "--parts", "prune", "--prune-trials", "2", "--steps", "4",
                        "--eval-every", "2", "--out", str(tmp_path), "data.max_eval_samples=32",
                        f"data.cache_dir={cache_dir}", cwd=tmp_path)  # fmt: skip
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert [row["pruner"] for row in numbers["pruning"]] == ["none", "asha"] and numbers["wall_ratio"] > 0


def test_bench_packing_compares_padded_and_packed_runs(tmp_path, cache_dir):
    result = run_script("bench_packing.py", "--repeats", "1", "--out", str(tmp_path / "bench"), *TINY_RUN,
                        f"data.cache_dir={cache_dir}", cwd=tmp_path)  # fmt: skip
    summary = json.loads((tmp_path / "bench" / "bench_packing.json").read_text())
    assert set(summary["runs"]) == {"padded", "packed"}, result.stdout
    padded, packed = summary["runs"]["padded"][0], summary["runs"]["packed"][0]
    assert packed["padding"] < padded["padding"]  # the same examples on fewer positions
    assert summary["packed_over_padded"] == packed["tokens_per_s"] / padded["tokens_per_s"] > 0
    assert "f1" in padded["dev"] and "f1" in packed["dev"]  # each run ends with its dev evaluation
    assert "packed/padded" in result.stdout
