"""`distrain bench` end to end on the tiny BERT and a tiny CoNLL-shaped folder: both sides train for real (one
run each, 2 steps), the start-up runs (a tiny run, a sweep, bare torchrun), and the JSON holds their figures."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess

import pytest
from conftest import DISTRAIN

from distrain.cli.bench import BUSY_LIMIT, SWEEP_JOBS, cpu_seconds, load_report


def bench(*args: str, home) -> subprocess.CompletedProcess:
    # HOME: `distrain train` caches tokenized data under ~/.cache/distrain; the test keeps its own.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(home)}
    return subprocess.run([DISTRAIN, "bench", *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, conll_dir):
    root = tmp_path_factory.mktemp("bench")
    result = bench(f"--data-dir={conll_dir}", "--model=bert_tiny", "--batch=1", "--steps=2", "--warmup=1",
                   "--repeats=1", f"--out={root / 'out'}", home=root / "home")  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result, json.loads((root / "out" / "bench.json").read_text())


@pytest.mark.slow  # a benchmark's smoke run: second stage, like the other scripts'
def test_bench_measures_both_sides_and_writes_their_figures(tiny_bench):
    result, report = tiny_bench
    assert report["machine"]["cores"] == os.cpu_count() and report["machine"]["cpu_model"]
    assert report["machine"]["torch"].startswith("2.")
    throughput = report["throughput"]
    for side in ("distrain", "hf_trainer"):
        (run,) = throughput[side]["runs"]
        assert run["steps"] == 3 and run["counted_steps"] == 2, run  # the warm-up step is not counted
        assert run["real_tokens"] > 0 and run["step_seconds"] > 0 and run["all_steps_real_tokens_per_s"] > 0, run
        assert math.isclose(run["real_tokens_per_s"], run["real_tokens"] / run["step_seconds"]), run
        assert throughput[side]["median"] == run["real_tokens_per_s"]
        assert run["padding"] == 0.0, run  # one sentence per batch: every position is a real token
    assert throughput["ratio"] == throughput["distrain"]["median"] / throughput["hf_trainer"]["median"]
    startup = report["startup"]
    assert startup["distrain_tiny"]["median"] > startup["torchrun_bare"]["median"] > 0
    assert startup["difference_seconds"] == startup["distrain_tiny"]["median"] - startup["torchrun_bare"]["median"]
    (sweep,) = startup["distrain_sweep_job"]["runs"]
    jobs = sweep["jobs_after_the_first"]
    assert len(jobs) == SWEEP_JOBS - 1 and all(job > 0 for job in jobs), sweep
    assert sweep["seconds"] == statistics.median(jobs) == startup["distrain_sweep_job"]["median"]
    # The sweep's launcher imports torch and transformers once: a later job costs less than a whole tiny run.
    assert sweep["seconds"] < startup["distrain_tiny"]["median"] and sweep["sweep_seconds"] > sum(jobs), sweep
    assert "distrain / HF" in result.stdout and f"{throughput['ratio']:.3f}" in result.stdout


@pytest.mark.slow  # two 1-step runs, one per side, and their start-ups
def test_bench_reports_date_versions_and_load_beside_the_ratio_at_bf16(tmp_path, conll_dir):
    """Both sides at bf16 (distrain's precision=bf16, the Trainer's bf16=True), one step each, no start-up runs:
    the report carries the date, torch and transformers versions and the load, the console the same beside the
    ratio."""
    import torch
    import transformers

    result = bench(f"--data-dir={conll_dir}", "--model=bert_tiny", "--batch=1", "--steps=1", "--warmup=0",
                   "--repeats=1", "--startup-repeats=0", "--precision=bf16", f"--out={tmp_path / 'out'}",
                   home=tmp_path / "home")  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["settings"]["precision"] == "bf16"
    (hf,) = report["throughput"]["hf_trainer"]["runs"]
    assert hf["bf16"] is True
    config = (tmp_path / "out" / "distrain_1" / "config.yaml").read_text()
    assert "precision:\n  name: bf16" in config
    assert report["date"].endswith(" UTC") and report["date"][:4].isdigit()
    machine = report["machine"]
    assert (machine["torch"], machine["transformers"]) == (torch.__version__, transformers.__version__)
    load = report["load"]
    assert len(load["load_average_start"]) == len(load["load_average_end"]) == 3
    assert load["other_processes_cores"] >= 0
    out = " ".join(result.stdout.split())  # rich wraps long lines
    ratio = report["throughput"]["ratio"]
    assert f"distrain / HF {ratio:.3f} at bf16: {report['date']}, torch {torch.__version__}" in out, out
    assert f"transformers {transformers.__version__}" in out and "load average before" in out
    assert ("warning:" in out) == ("warning" in load), out


def test_load_report_warns_when_other_processes_kept_the_cores_busy():
    """The warning's two causes, from the machine's real counters: a high load average before the runs, and other
    processes' CPU time during them (the machine's busy seconds minus this process tree's)."""
    cores = os.cpu_count()
    now = cpu_seconds()
    quiet = {"load_average": (0.0, 0.0, 0.0), "cpu": None}
    assert "warning" not in load_report(quiet, cores)
    busy_before = {"load_average": (cores * BUSY_LIMIT + 0.5, 0.0, 0.0), "cpu": None}  # no /proc/stat figures
    assert "load average" in load_report(busy_before, cores)["warning"]
    # The same load average before, but no one else's CPU time over the 5 s since: a job that had just ended.
    ended = {**busy_before, "cpu": {"machine": now["machine"], "ours": now["ours"], "wall": now["wall"] - 5}}
    assert "warning" not in load_report(ended, cores)
    # 10 busy CPU seconds per core, not ours, over the last 5 s: twice the machine's cores, over any limit.
    earlier = {"machine": now["machine"] - 10 * cores, "ours": now["ours"], "wall": now["wall"] - 5}
    busy_during = {"load_average": (0.0, 0.0, 0.0), "cpu": earlier}
    report = load_report(busy_during, cores)
    assert report["other_processes_cores"] >= 2 * cores - 0.5
    assert f"kept {report['other_processes_cores']:.2f} cores busy" in report["warning"]
    assert "rerun on an idle machine" in report["warning"]


def test_bench_without_the_data_names_the_option_and_the_files(tmp_path):
    result = bench(f"--data-dir={tmp_path}", home=tmp_path)
    assert result.returncode == 2
    assert "--data-dir" in result.stderr and "train.txt" in result.stderr and "DISTRAIN_CONLL2003_DIR" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written
