"""Surviving what clusters do to jobs, without SLURM: a killed worker (torchrun restarts the group), a stop request
(STOP file, the preemption signal, SIGTERM), and two launchers joining one job through c10d rendezvous.
Each ends with the losses and weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DISTRAIN, TINY, run_distrain, train_losses
from safetensors.torch import load_file

STEPS = 60
RUN = [*TINY, "parallel=ddp", "launcher.nproc_per_node=2", "train.micro_batch_size=4", f"train.max_steps={STEPS}",
       "train.save_every=10", "train.keep_last=3", "train.export_weights=last",
       "data.max_train_samples=1024"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}")
    return run


def start(run: Path, cache_dir: str, *extra: str) -> subprocess.Popen:
    args = [DISTRAIN, "train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{process.stdout.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"train"' in x]


def same_weights(a: Path, b: Path) -> float:
    x, y = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    return max((x[k] - y[k]).abs().max().item() for k in x)


def assert_matches(run: Path, reference: Path) -> None:
    mine, theirs = train_losses(run), train_losses(reference)  # the last record of each step wins
    assert sorted(mine) == sorted(theirs) == list(range(1, STEPS + 1))
    assert max(abs(mine[s] - theirs[s]) for s in theirs) <= 1e-6
    assert same_weights(run, reference) <= 1e-6


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(uninterrupted, tmp_path, cache_dir):
    run = tmp_path / "killed"
    process = start(run, cache_dir, "launcher.max_restarts=1")
    wait_for(lambda: max(steps_logged(run), default=0) >= 25, "step 25 (after the step 20 checkpoint)", process)
    log = (run / "logs" / "rank_1.log").read_text()
    pid = int(re.search(r"rank 1: pid (\d+)", log).group(1))
    os.kill(pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    resumed = int(re.search(r"resumed from .*step_(\d+) at step", output).group(1))
    logged = steps_logged(run)
    restart = next(i for i in range(1, len(logged)) if logged[i] <= logged[i - 1])  # where the steps go back
    lost = logged[restart - 1] - resumed
    print(f"worker killed after step {logged[restart - 1]}, resumed from step {resumed}: {lost} steps lost")
    assert resumed >= 20 and 0 < lost <= 10
    assert "attempt 1" in (run / "logs" / "rank_1.log").read_text()
    assert_matches(run, uninterrupted)


@pytest.mark.parametrize(
    "how", [pytest.param("stop file", marks=pytest.mark.slow), pytest.param("preempt signal", marks=pytest.mark.slow),
            "SIGTERM"],
)  # fmt: skip
def test_a_stop_request_checkpoints_and_a_rerun_finishes_the_same_run(uninterrupted, tmp_path, cache_dir, how):
    run = tmp_path / "stopped"
    process = start(run, cache_dir)
    wait_for(lambda: len(steps_logged(run)) >= 15, "step 15", process)
    if how == "stop file":
        (run / "STOP").touch()
    else:
        process.send_signal(signal.SIGUSR1 if how == "preempt signal" else signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    summary = json.loads((run / "summary.json").read_text())
    stopped = int(summary["status"].removeprefix("preempted at step "))
    assert 15 <= stopped < STEPS and summary["step"] == stopped
    assert (run / "checkpoints" / f"step_{stopped}" / "COMPLETE").exists()
    assert "to resume" in output
    assert not (run / "STOP").exists()  # the request does not outlive the run
    rerun = run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}")
    assert f"at step {stopped}" in rerun.stdout
    assert_matches(run, uninterrupted)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launchers_form_one_job_through_c10d_rendezvous(uninterrupted, tmp_path, cache_dir):
    """Two `distrain train` on one host as two 'nodes' of one process each, like two machines would."""
    run = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    # One thread each, as in the reference's 2-process launcher (and as two processes on two cores should be).
    multi = ["launcher.nnodes=2", "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint={endpoint}",
             "launcher.threads_per_process=1"]  # fmt: skip
    launchers = [start(run, cache_dir, *multi) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    assert all(p.returncode == 0 for p in launchers), outputs
    assert sum("distrain run summary" in out for out in outputs) == 1  # global rank 0 lives in one of them
    assert (run / "logs" / "rank_0.log").exists() and (run / "logs" / "rank_1.log").exists()
    assert_matches(run, uninterrupted)


@pytest.mark.slow
def test_a_stopped_worker_is_named_with_stacks_and_the_restarted_run_ends_as_if_nothing_happened(
    uninterrupted, tmp_path, cache_dir
):
    """SIGSTOP of one worker (a hang: it holds its sockets open, so peers wait instead of failing). The live rank
    reports it within launcher.collective_timeout_s (plus a heartbeat interval), with the stacks of its threads
    in its log; torchrun restarts the group (the stopped worker is killed) and the run resumes."""
    run = tmp_path / "stopped-worker"
    process = start(run, cache_dir, "launcher.collective_timeout_s=30", "launcher.max_restarts=1")
    wait_for(lambda: max(steps_logged(run), default=0) >= 25, "step 25 (after the step 20 checkpoint)", process)
    pid = int(re.search(r"rank 1: pid (\d+)", (run / "logs" / "rank_1.log").read_text()).group(1))
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    wait_for(lambda: "Ranks that did not arrive" in (run / "logs" / "rank_0.log").read_text(), "the diagnosis",
             process, timeout=120)  # fmt: skip
    seconds = time.time() - stopped_at
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    log = (run / "logs" / "rank_0.log").read_text()
    print(f"SIGSTOP of rank 1: reported by rank 0 after {seconds:.1f} s")
    print(log[log.index("stopped at step") - 40 :][:1500])
    assert re.search(r"rank 1 silent for \d+ s \(last heard at step \d+, phase \w+; \S+ pid " + str(pid), log)
    assert "--- rank 0: stacks of all threads" in log
    assert "Current thread" in log and 'trainer/watchdog.py", line' in log  # faulthandler's dump, every thread
    assert re.search(r'trainer/loop.py", line \d+, in (train_step|fit)', log)  # where the collective was called
    assert 30 <= seconds <= 30 + 30
    assert re.search(r"resumed from .*step_(\d+) at step", output)
    assert_matches(run, uninterrupted)
    print(f"max |diff| of the final weights vs uninterrupted: {same_weights(run, uninterrupted):.3g}")


def two_node_launch(run: Path, cache_dir: str, endpoint: str, *extra: str) -> subprocess.Popen:
    """One 'node' of a two-node job: its own launcher and worker, in a session of their own (one kill ends both,
    like a host going down)."""
    multi = ["launcher.nnodes=2", "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint={endpoint}",
             "launcher.threads_per_process=1", "launcher.max_restarts=1", *extra]  # fmt: skip
    args = [DISTRAIN, "train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}", *multi]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_node(launcher: subprocess.Popen, run: Path) -> None:
    """SIGKILL the launcher and its worker (torchrun puts the worker in a session of its own)."""
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    os.killpg(launcher.pid, signal.SIGKILL)
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    launcher.wait()


@pytest.mark.slow
def test_a_killed_node_that_is_relaunched_rejoins_and_the_run_ends_as_if_nothing_happened(
    uninterrupted, tmp_path, cache_dir
):
    """Two launchers on loopback (the same rendezvous code path as two hosts; tests/test_cluster.py has no
    namespaces yet). The second one's launcher and worker are killed after step 25 and started again, as a
    supervisor would: the restart counts of the two nodes now differ (1 and 0)."""
    run, endpoint = tmp_path / "rejoin", f"127.0.0.1:{free_port()}"
    first = two_node_launch(run, cache_dir, endpoint)
    time.sleep(2)  # the first one hosts the rendezvous
    second = two_node_launch(run, cache_dir, endpoint)
    wait_for(lambda: max(steps_logged(run), default=0) >= 25, "step 25", first)
    kill_node(second, run)
    relaunched_at = time.time()
    again = two_node_launch(run, cache_dir, endpoint)
    wait_for(lambda: "attempt 1" in (run / "logs" / "rank_0.log").read_text()
             + (run / "logs" / "rank_1.log").read_text(), "the group to re-form", first)  # fmt: skip
    reformed = time.time() - relaunched_at
    outputs = [p.communicate(timeout=300)[0] for p in (first, again)]
    assert first.returncode == 0 and again.returncode == 0, outputs
    resumed = int(re.search(r"resumed from .*step_(\d+) at step", "".join(outputs)).group(1))
    print(f"relaunched node: group re-formed after {reformed:.1f} s, resumed from step {resumed}, "
          f"max |diff| of the final weights vs uninterrupted: {same_weights(run, uninterrupted):.3g}")  # fmt: skip
    assert resumed >= 20
    assert_matches(run, uninterrupted)


@pytest.mark.slow
def test_without_a_relaunch_the_surviving_node_stops_in_bounded_time_naming_the_missing_host(tmp_path, cache_dir):
    run, endpoint = tmp_path / "lost", f"127.0.0.1:{free_port()}"
    first = two_node_launch(run, cache_dir, endpoint, "launcher.join_timeout_s=20")
    time.sleep(2)
    second = two_node_launch(run, cache_dir, endpoint, "launcher.join_timeout_s=20")
    wait_for(lambda: max(steps_logged(run), default=0) >= 25, "step 25", first)
    kill_node(second, run)
    killed_at = time.time()
    output, _ = first.communicate(timeout=300)
    seconds = time.time() - killed_at
    print(f"the surviving launcher stopped {seconds:.1f} s after the other node died:\n{output[-1200:]}")
    assert first.returncode == 1
    assert "did not (re-)form" in output and "launcher.join_timeout_s=20" in output
    assert f"this host is {socket.gethostname()}" in output
    assert "Traceback" not in output.split("distrain run dir")[-1]  # the launcher's own report
    assert seconds < 20 + 60  # the join timeout, a worker restart and torchrun's shutdown
