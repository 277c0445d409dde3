"""On a real one-node SLURM cluster (scripts/slurm/local-cluster.sh, started here): the sbatch wrapper trains with
2 processes; a job signalled before its time limit checkpoints, requeues itself, resumes and ends with the losses
and weights of an uninterrupted run. Needs root (to run slurmctld, slurmd, munged); cluster stage of CI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DISTRAIN, TINY, run_distrain, tensorboard_scalars, train_losses
from safetensors.torch import load_file

pytestmark = pytest.mark.cluster
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts" / "slurm"
RUN = [*TINY, "parallel=ddp", "train.micro_batch_size=4", "train.save_every=10", "train.export_weights=last",
       "data.max_train_samples=1024"]  # fmt: skip


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "DISTRAIN_SLURM_DIR": str(state), "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run([SCRIPTS / "local-cluster.sh", "start"], env=env, check=True, timeout=600)
    yield {**env, "DISTRAIN": DISTRAIN}
    subprocess.run([SCRIPTS / "local-cluster.sh", "stop"], env=env, timeout=120)


def sbatch(slurm, workdir: Path, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", f"--chdir={workdir}", str(SCRIPTS / "train.sbatch"), *args],
                         env=slurm, capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip().split(";")[0]


def job_state(slurm, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait(condition, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_the_sbatch_wrapper_trains_with_two_processes(slurm, tmp_path, cache_dir):
    job = sbatch(slurm, tmp_path, *RUN, "train.max_steps=6", f"data.cache_dir={cache_dir}")
    wait(lambda: job_state(slurm, job) in ("COMPLETED", "FAILED", "CANCELLED"), f"job {job}")
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert job_state(slurm, job) == "COMPLETED", log
    assert "2 processes each" in log and f"rendezvous {os.uname().nodename.split('.')[0]}" in log
    run = tmp_path / "runs" / "slurm" / job
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert sorted(train_losses(run)) == list(range(1, 7))
    assert (run / "checkpoints" / "step_6" / "COMPLETE").exists()
    assert (run / "logs" / "rank_1.log").exists()
    assert json.loads((run / "env.json").read_text())["slurm_job_id"] == job


def test_a_signalled_job_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(slurm, tmp_path, cache_dir):
    steps = 80
    job = sbatch(slurm, tmp_path, *RUN, f"train.max_steps={steps}", f"data.cache_dir={cache_dir}",
                 "logger=[tensorboard,mlflow]")  # fmt: skip
    run = tmp_path / "runs" / "slurm" / job
    metrics = run / "metrics.jsonl"
    wait(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 15, "step 15")
    # What SLURM does before a time limit with #SBATCH --signal=USR1@120 (to every process of the job's steps).
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    summary = run / "summary.json"
    wait(lambda: summary.exists() and "preempted" in summary.read_text(), "the checkpoint after the signal")
    stopped = json.loads(summary.read_text())["step"]
    wait(lambda: job_state(slurm, job) == "PENDING", "the requeue")
    # SLURM holds a requeued job for about two minutes; release it sooner, but not within the second its old
    # credential was revoked: slurmd would refuse the start ("Job credential revoked") and end the job.
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now+5"], env=slurm, check=True)
    wait(lambda: job_state(slurm, job) == "COMPLETED", "the requeued job")
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"SLURM job {job} requeued" in log and "restart count 1" in log
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped}'} at step {stopped}" in log.replace("\n", "")
    reference = tmp_path / "uninterrupted"
    run_distrain("train", *RUN, f"train.max_steps={steps}", "launcher.nproc_per_node=2",
                 f"data.cache_dir={cache_dir}", f"run.dir={reference}")  # fmt: skip
    mine, theirs = train_losses(run), train_losses(reference)
    print(
        f"preempted at step {stopped}; final loss {mine[steps]:.6f} (requeued) vs {theirs[steps]:.6f} (uninterrupted)"
    )
    assert sorted(mine) == sorted(theirs) and max(abs(mine[s] - theirs[s]) for s in theirs) <= 1e-6
    # The trackers saw one run with each step once, at metrics.jsonl's values, across the requeue.
    board = tensorboard_scalars(run, "train/loss")
    assert [s for s, _ in board] == sorted(mine) and max(abs(v - mine[s]) for s, v in board) <= 1e-6
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")  # the default store, beside the runs
    (tracked,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(tracked.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == sorted(mine) and all(abs(m.value - mine[m.step]) <= 1e-6 for m in history)
    a, b = load_file(run / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_study_runs_two_trials_at_once_as_slurm_jobs_sharing_the_study(slurm, tmp_path, cache_dir):
    import optuna
    import yaml

    sweep = tmp_path / "sweep"
    command = [DISTRAIN, "train", *TINY, "train.max_steps=3", "task.metric=accuracy", "data.max_eval_samples=32",
               "hparams_search=ner_optuna", "train.micro_batch_size=choice(4,8)", "sweep.sampler=random",
               "sweep.n_trials=2", "sweep.n_jobs=2", "hydra/launcher=distrain_slurm", "hydra.launcher.cpus_per_task=1",
               f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    with open(tmp_path / "sweep.log", "w") as log:
        sweeper = subprocess.Popen(command, cwd=tmp_path, env=slurm, stdout=log, stderr=subprocess.STDOUT)
        queue = []

        def two_running() -> bool:
            out = subprocess.run(["squeue", "--noheader", "--states=RUNNING", "--format=%i %j %T %S"], env=slurm,
                                 capture_output=True, text=True).stdout.strip().splitlines()  # fmt: skip
            queue[:] = out
            return len(out) >= 2 or sweeper.poll() is not None

        wait(two_running, "two trials running as SLURM jobs")
        print("squeue while the study ran:\n" + "\n".join(queue))
        assert sweeper.wait(timeout=900) == 0, (tmp_path / "sweep.log").read_text()
    assert len(queue) == 2
    study = optuna.load_study(study_name="ner_optuna", storage=f"sqlite:///{sweep}/study.db")
    a, b = study.trials
    print(f"trial 0 {a.datetime_start} .. {a.datetime_complete}; trial 1 {b.datetime_start} .. {b.datetime_complete}")
    assert a.state.name == b.state.name == "COMPLETE"
    # the two jobs ran at the same time: each was running when the other finished
    jobs = [json.loads((sweep / str(t.number) / "env.json").read_text())["slurm_job_id"] for t in (a, b)]
    assert jobs[0] != jobs[1]  # two SLURM jobs (submitit submits a batch as one job array: squeue shows 1_0, 1_1)
    # The study asks for both trials before submitting them and hears back from each: its times overlap; so do the
    # runs' own (config.yaml written at a run's start, summary.json at its end).
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
    spans = [((sweep / str(t.number) / "config.yaml").stat().st_mtime,
              (sweep / str(t.number) / "summary.json").stat().st_mtime) for t in (a, b)]  # fmt: skip
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]
    for trial in (a, b):
        overrides = yaml.safe_load((sweep / str(trial.number) / "overrides.yaml").read_text())
        assert f"sweep.trial={trial.number}" in overrides
