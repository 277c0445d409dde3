"""The slow-link benchmark (scripts/slow_link_bench.py) end to end, tiny: two namespace hosts over a 100 Mbit/s
veth, every communication mode, its JSON. Needs root; cluster stage of CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
SCRIPT = Path(__file__).parent.parent / "scripts" / "slow_link_bench.py"


def test_the_slow_link_benchmark_measures_every_mode(tmp_path):
    if os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("unshare"):
        pytest.skip("network namespaces and tc need root")
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--smoke"], check=True, timeout=900)
    report = json.loads((tmp_path / "slow_link.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert set(rows) == {"every_step", "sparse_rows", "fp16", "powersgd", "local_sgd", "diloco"}
    full = rows["every_step"]["bytes_per_step"]
    assert rows["sparse_rows"]["bytes_per_step"] < full
    # fp16: the other gradients at 2 bytes, the embedding's touched rows apart at 4 (as sparse_rows sends them)
    assert rows["sparse_rows"]["bytes_per_step"] / 2 < rows["fp16"]["bytes_per_step"] < full / 2
    # H=2 over 4 steps: the weights (fp32, as many as the gradients) cross the link after steps 2 and 4 only
    assert rows["diloco"]["bytes_per_step"] == full / 2
    assert rows["powersgd"]["bytes_per_step"] < full  # plain at step 1, compressed from step 2
    assert all(r["steps"] == 4 and r["seconds_per_step"] > 0 for r in rows.values())
    assert not subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("dsl")
