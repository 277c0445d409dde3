"""Observability: the trackers (read back with their own readers), per-rank step times, the profiler, report plots.

The default suite shares one 2-process run (module fixture) that profiles steps 3-4 and has an MLflow server that
cannot be reached; the trackers' resume safety is checked in-process on the real libraries (cheap), and end to end
by a stopped, torn and resumed 2-process run with all three trackers (slow: two torchrun launches).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import TINY, compose_train, run_distrain, tensorboard_scalars, train_losses
from matplotlib.image import imread

from distrain.trainer.observe.loggers import Loggers

STEPS = 10  # +debug=tiny


def train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


# --- one 2-process run: profiler, per-rank step times, an unreachable MLflow server -------------------------------
@pytest.fixture(scope="module")
def profiled(tmp_path_factory, cache_dir) -> tuple[Path, object]:
    run = tmp_path_factory.mktemp("observability") / "profiled"
    result = run_distrain("train", *TINY, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
                          "train.micro_batch_size=4", "train.profile_steps=[3,4]", "train.eval_every=5",
                          "logger=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=http://127.0.0.1:9",
                          f"run.dir={run}")  # fmt: skip
    return run, result


def test_an_unreachable_tracker_is_warned_about_and_training_goes_on(profiled):
    run, result = profiled  # run_distrain checked exit 0
    output = result.stdout + result.stderr
    assert "logger mlflow could not start" in output and "training goes on" in output
    assert "ConnectionError" in output or "MlflowException" in output  # what happened
    assert [r["step"] for r in train_records(run)] == list(range(1, STEPS + 1))  # metrics.jsonl whole
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    # the other tracker still got every step
    assert [step for step, _ in tensorboard_scalars(run, "train/loss")] == list(range(1, STEPS + 1))


def test_train_records_carry_the_slowest_and_fastest_rank_and_the_data_wait(profiled):
    run, result = profiled
    for record in train_records(run):
        assert 0 < record["step_time_min"] <= record["step_time_max"]
        assert 0 <= record["data_wait_max"] < record["step_time_max"]
    assert "step time max" in result.stdout and "data wait max" in result.stdout  # the summary table
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["step_time_min"] <= summary["step_time_max"] and summary["data_wait_max"] >= 0
    assert [step for step, _ in tensorboard_scalars(run, "train/step_time_max")] == list(range(1, STEPS + 1))
    assert len(tensorboard_scalars(run, "train/max_memory_bytes/rank_1")) == STEPS  # memory per rank


def test_profiled_steps_leave_a_trace_per_rank_the_top_operators_and_a_mark(profiled):
    run, _ = profiled
    for rank in (0, 1):
        trace = json.loads((run / "profile" / f"rank_{rank}.pt.trace.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert "aten::addmm" in names or "aten::mm" in names  # the model's matrix products were recorded
        log = (run / "logs" / f"rank_{rank}.log").read_text()
        assert "profile of steps 3-4, top operators by self time" in log and "Self CPU" in log
        # DDP's gradient all-reduce runs on gloo's threads, outside the table: named with its calls and seconds
        assert re.search(r"collectives on the backend's own threads .*gloo:all_reduce \d+ calls [\d.]+ s", log), log
    assert [r["step"] for r in train_records(run) if r.get("profiled")] == [3, 4]


def test_report_draws_the_run_and_a_sweep_of_runs(profiled, tmp_path):
    run, _ = profiled
    out = run_distrain("report", str(run)).stdout
    plot = run / "report" / "training.png"
    assert f"wrote {plot}" in out.replace("\n", "")
    assert imread(plot).shape[:2] == (770, 1210)  # 11 x 7 inches at 110 dpi: the 2x2 figure
    sweep = tmp_path / "sweep"
    for n, lr in enumerate(("1e-3", "5e-4")):
        shutil.copytree(run, sweep / str(n), ignore=shutil.ignore_patterns("checkpoints", "export", "profile"))
        # as scripts/slurm/train.sbatch runs them: each its own SLURM job's rendezvous, which is not a setting
        (sweep / str(n) / "overrides.yaml").write_text(f"- optim.lr={lr}\n- launcher.rdzv_id={100 + n}\n"
                                                       f"- launcher.rdzv_endpoint=node{n}:29500\n")  # fmt: skip
    out = run_distrain("report", str(sweep)).stdout.replace("\n", "")
    for name in ("curves.png", "optim.lr.png"):
        assert f"wrote {sweep / 'report' / name}" in out
        assert imread(sweep / "report" / name).ndim == 3
    assert "rdzv" not in out and not list((sweep / "report").glob("launcher.*"))


# --- resume safety of the trackers, in-process on the real libraries -----------------------------------------------
def test_a_run_resumed_from_an_earlier_checkpoint_logs_each_step_once(tmp_path):
    """A crash after logging steps 1-6 with the last checkpoint at 3: the resumed run logs 4-10 again."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_train([*TINY, "logger=[tensorboard,mlflow]", f"run.dir={run}"])
    (run / "config.yaml").write_text("{}")  # MLflow keeps it as an artifact
    first = Loggers(cfg, run, enabled=True, start_step=0)
    for step in range(1, 7):
        first.log({"kind": "train", "step": step, "loss": 10.0 + step})  # values of the crashed invocation
    first.active[0].writer.flush()  # what a crash leaves: the events written, nothing closed
    resumed = Loggers(cfg, run, enabled=True, start_step=3)
    for step in range(4, STEPS + 1):
        resumed.log({"kind": "train", "step": step, "loss": float(step)})
    resumed.close({"status": "finished", "step": STEPS, "best_metric": 0.5})

    assert tensorboard_scalars(run, "train/loss") == [(s, 10.0 + s if s <= 3 else float(s)) for s in range(1, 11)]
    assert tensorboard_scalars(run, "hparams/best_dev_f1") == [(STEPS, 0.5)]  # the HParams tab's metric
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    start = HParamsPluginData.FromString(accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store, beside the run
    (mlflow_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # steps 4-6 once: the first values kept
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["optim.lr"] == "0.001"
    artifacts = Path(mlflow_run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "mlartifacts") and (artifacts / "summary.json").is_file()


# --- end to end: stopped, torn checkpoint, resumed; all three trackers ---------------------------------------------
@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cache_dir) -> tuple[Path, object, object]:
    """2 processes; stopped at step 6 with checkpoints at 3 and 6; then the step-6 checkpoint is torn (renamed to
    step_6.partial, as a crash during its save leaves it), so the rerun resumes at step 3 and redoes steps 4-6
    that the trackers had already logged."""
    run = tmp_path_factory.mktemp("observability-resume") / "run"
    args = [*TINY, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
            "train.micro_batch_size=4", "train.save_every=3", "train.eval_every=2",
            "logger=[tensorboard,mlflow,wandb]", f"run.dir={run}"]  # fmt: skip
    first = run_distrain("train", *args, "train.stop_at_step=6")
    (run / "checkpoints" / "step_6").rename(run / "checkpoints" / "step_6.partial")
    second = run_distrain("train", *args)
    return run, first, second


@pytest.mark.slow
def test_after_stop_crash_and_resume_every_tracker_shows_each_step_once(resumed):
    run, first, second = resumed
    assert "stopped at step 6" in first.stdout and "at step 3" in second.stdout
    losses = train_losses(run)  # the last record of a step: the resumed run's
    assert sorted(losses) == list(range(1, STEPS + 1))
    # TensorBoard: each step once, with metrics.jsonl's value (float32 in the event file)
    board = tensorboard_scalars(run, "train/loss")
    assert [step for step, _ in board] == list(range(1, STEPS + 1))
    assert [value for _, value in board] == pytest.approx([losses[s] for s in range(1, STEPS + 1)], rel=1e-6)
    assert [step for step, _ in tensorboard_scalars(run, "eval/dev/f1")] == [2, 4, 6, 8, 10]
    # MLflow: one run, each step once, with metrics.jsonl's value (the steps redone are deterministic)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = sorted(client.get_metric_history(mlflow_run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx([losses[s] for s in range(1, STEPS + 1)], abs=1e-6)
    assert mlflow_run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"config.yaml", "summary.json", "eval_reports.json"} <= artifacts
    # W&B offline: one run id across both invocations, kept in the run dir
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["run_id"]
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in offline)
    assert all((folder / f"run-{run_id}.wandb").is_file() for folder in offline)
