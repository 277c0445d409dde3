"""Surviving what clusters do to jobs, without SLURM: a killed worker (torchrun restarts the group), a stop request
(STOP file, the preemption signal, SIGTERM), and two launchers joining one job through c10d rendezvous.
Each ends with the losses and weights of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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
    # Its own session, like a job in a terminal: a Ctrl-C goes to its process group (torchrun's workers have their own).
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


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


def stop(run: Path, process: subprocess.Popen, how: str) -> tuple[int, str]:
    """Ask the running `process` to stop the way `how` says; the step it stopped at and its output, after checking
    it left a complete checkpoint there, said how to resume and removed its request."""
    if how == "stop file":
        (run / "STOP").touch()
    elif how == "Ctrl-C":
        os.killpg(process.pid, signal.SIGINT)  # what a terminal does
    else:
        process.send_signal(signal.SIGUSR1 if how == "preempt signal" else signal.SIGTERM)
    asked = time.monotonic()
    output, _ = process.communicate(timeout=300)
    # a step, a checkpoint and the exit: not torchrun's 30 s wait for forked workers (once for SIGTERM)
    assert time.monotonic() - asked < 20, (how, time.monotonic() - asked)
    assert process.returncode == 0, output
    summary = json.loads((run / "summary.json").read_text())
    stopped = int(summary["status"].removeprefix("preempted at step "))
    assert summary["step"] == stopped and stopped < STEPS
    assert (run / "checkpoints" / f"step_{stopped}" / "COMPLETE").exists()
    assert "to resume" in output
    if how == "Ctrl-C":
        assert "Ctrl-C: the workers finish their step and write a checkpoint" in output and "Traceback" not in output
    assert not (run / "STOP").exists()  # the request does not outlive the run
    return stopped, output


def test_ctrl_c_checkpoints_and_a_rerun_finishes_the_same_run(uninterrupted, tmp_path, cache_dir):
    run = tmp_path / "stopped"
    process = start(run, cache_dir)
    wait_for(lambda: (run / "config.yaml").exists(), "the run dir", process)  # while it starts its workers
    # Frozen while a second launch is tried (seconds under load: the tiny run could end meanwhile); still alive.
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        assert_a_second_launch_is_refused(run, cache_dir, process)
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    wait_for(lambda: len(steps_logged(run)) >= 5, "step 5", process)
    stopped, _ = stop(run, process, "Ctrl-C")
    assert stopped >= 5
    assert f"preempted at step {stopped}" in report_row(run)

    # A rerun moves the stopped invocation's summary aside: the report says it runs, then that it was killed.
    rerun = start(run, cache_dir)
    wait_for(lambda: len(steps_logged(run)) > stopped, "a step of the rerun", rerun)
    pids = run_pids(run, rerun)
    for pid in pids:  # frozen mid-run (the tiny run would end while the report starts)
        os.kill(pid, signal.SIGSTOP)
    assert f"running (pid {rerun.pid} on {socket.gethostname()})" in report_row(run)
    kill_all(pids)
    rerun.wait(timeout=60)
    assert "failed or killed (no summary.json; logs/ says why)" in report_row(run)
    previous = json.loads((run / "summary.previous.json").read_text())
    assert previous["status"] == f"preempted at step {stopped}"

    final = run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}")
    assert "resumed from" in final.stdout
    assert "finished" in report_row(run)
    assert_matches(run, uninterrupted)


def report_row(run: Path) -> str:
    """The run's row of `distrain report`, its cells joined (rich wraps a long status within its cell)."""
    table = run_distrain("report", str(run)).stdout
    rows = [line for line in table.splitlines() if "│" in line]
    return " ".join(" ".join(cell.strip() for cell in line.split("│")) for line in rows)


@pytest.mark.slow
def test_a_stop_file_a_preempt_signal_and_sigterm_each_checkpoint_and_the_reruns_finish_the_same_run(
    uninterrupted, tmp_path, cache_dir
):
    """One run stopped three times, each way a scheduler or a user asks (every rerun resumes where the last one
    stopped), then finished: it ends with the uninterrupted run's losses and weights."""
    run, stopped = tmp_path / "stopped", 0
    for how, after in (("stop file", 15), ("preempt signal", 30), ("SIGTERM", 45)):
        process = start(run, cache_dir)
        wait_for(lambda after=after: max(steps_logged(run), default=0) >= after, f"step {after}", process)
        resumed_from, (stopped, output) = stopped, stop(run, process, how)
        assert stopped >= after, how
        assert not resumed_from or f"at step {resumed_from}" in output, output
    rerun = run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}")
    assert f"at step {stopped}" in rerun.stdout
    assert_matches(run, uninterrupted)


@pytest.mark.slow
def test_a_killed_worker_without_restarts_fails_naming_the_checkpoint_to_resume_from(tmp_path, cache_dir):
    run = tmp_path / "killed-once"
    process = start(run, cache_dir)
    wait_for(lambda: (run / "checkpoints" / "step_10" / "COMPLETE").is_file(), "the step 10 checkpoint", process)
    log = (run / "logs" / "rank_1.log").read_text()
    os.kill(int(re.search(r"rank 1: pid (\d+)", log).group(1)), signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    said = " ".join(output.split())
    # the killed rank, or its peer whose collective failed with it (torchrun reports whichever it saw first)
    assert process.returncode == 1 and re.search(r"rank [01] failed first \(exit code (-9|1)\)", said), output
    latest = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*[0-9]"))
    assert f"Rerun the same command (run.dir={run}) to resume from {run}/checkpoints/step_{latest}" in said, output
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow  # test_schedule sets a damaged checkpoint aside in process
@pytest.mark.parametrize("garbled", ["COMPLETE", "trainer_state.json"])
def test_a_garbled_marker_or_state_is_damage_eval_refuses_it_and_a_rerun_resumes_before_it(
    garbled, uninterrupted, tmp_path, cache_dir
):
    """A marker that records no digests proves nothing about the files beside it, and an emptied trainer state
    (read by the launcher's own checks before any worker starts) is a file that differs from its digest: each is
    treated as any other damage."""
    run = tmp_path / "garbled"
    shutil.copytree(uninterrupted, run)
    path = run / "checkpoints" / f"step_{STEPS}" / garbled
    content = "garbage\n" if garbled == "COMPLETE" else ""
    path.write_text(content)
    why = f"{path} cannot be parsed" if garbled == "COMPLETE" else f"{path} has 0 bytes"
    result = run_distrain("eval", f"ckpt={path.parent}", "split=dev", check=False)
    assert result.returncode == 2 and why in result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    rerun = run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}")
    assert f"checkpoint step_{STEPS} skipped: {why}" in rerun.stdout, rerun.stdout
    assert f"renamed to step_{STEPS}.damaged for inspection" in rerun.stdout
    assert f"at step {STEPS - 10}" in rerun.stdout  # the previous checkpoint (train.save_every=10)
    assert (run / "checkpoints" / f"step_{STEPS}.damaged" / garbled).read_text() == content
    assert_matches(run, uninterrupted)


def test_a_rerun_on_another_global_batch_is_refused_before_any_worker_starts(uninterrupted, tmp_path, cache_dir):
    """Another train.micro_batch_size would resume the checkpoint on other batches: exit 2 with the key, the
    checkpoint's value and this run's, and the way out; the run dir is left as it was."""
    run = tmp_path / "regrouped"
    shutil.copytree(uninterrupted, run)
    config = (run / "config.yaml").read_text()
    result = run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}", "train.micro_batch_size=2",
                          check=False)  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "train.micro_batch_size x train.grad_accum_steps x data-parallel processes: the checkpoint has 8, this " \
           "run 4" in out, out  # fmt: skip
    assert f"checkpoint.init_from={run} run.dir=<new dir>" in out and "Traceback" not in out, out
    assert "distrain train run dir" not in result.stdout  # no worker started
    assert (run / "config.yaml").read_text() == config

    # So is a checkpoint.step with no checkpoint, listing the steps that have one
    result = run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}", "checkpoint.step=45",
                          check=False)  # fmt: skip
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "checkpoint.step=45: no complete checkpoint step_45" in out, out
    assert "(complete: 40, 50, 60); pick one of those" in out and "distrain train run dir" not in out, out
    assert (run / "config.yaml").read_text() == config and not (run / "config.previous.yaml").exists()


def assert_a_second_launch_is_refused(run: Path, cache_dir: str, first: subprocess.Popen) -> None:
    started = time.perf_counter()
    second = run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}", check=False)
    seconds = time.perf_counter() - started
    print(f"second launch refused in {seconds:.1f} s:\n{second.stderr}")
    assert second.returncode == 1 and "run dir in use" in second.stderr, second.stderr
    assert f"host {socket.gethostname()}, pid {first.pid}, started 20" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    assert "distrain train run dir" not in second.stdout  # nothing written, no worker started
    assert first.poll() is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
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


# --- whole-run faults (slow: several torchrun launches each) -------------------------------------------------------
def run_pids(run: Path, launcher: subprocess.Popen) -> list[int]:
    """The launcher and the workers of its current attempt (torchrun starts the workers in their own sessions)."""
    pids = [launcher.pid]
    for log in (run / "logs").glob("rank_*.log"):
        found = re.findall(r"rank \d+: pid (\d+)", log.read_text())
        pids += [int(found[-1])] if found else []
    return pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_five_sigkills_of_the_whole_run_while_it_writes_a_checkpoint(uninterrupted, tmp_path, cache_dir):
    run = tmp_path / "killed-in-save"
    kills = []
    for _ in range(5):
        process = start(run, cache_dir)
        checkpoints = run / "checkpoints"
        before = {p.name for p in checkpoints.glob("step_*")} if checkpoints.is_dir() else set()
        # The moment a new checkpoint's partial folder appears, every process of the run dies.
        deadline = time.time() + 300
        while not [p for p in checkpoints.glob("*.partial") if p.name not in before] and time.time() < deadline:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.002)
        pids = run_pids(run, process)
        kill_all(pids)
        process.wait(timeout=60)
        kills.append(max(steps_logged(run), default=0))
    print(f"killed while writing checkpoints, after steps {kills}")
    final = run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}")
    said = " ".join(final.stdout.split())  # rich wraps the line where the run dir's path makes it long
    assert "taking over the lock of a distrain train that ended without releasing it" in said, final.stdout
    assert not list((run / "checkpoints").glob("*.partial")) and not list((run / "checkpoints").glob("*.damaged"))
    assert_matches(run, uninterrupted)


@pytest.mark.slow
def test_a_second_ctrl_c_kills_the_workers_at_once(uninterrupted, tmp_path, cache_dir):
    run = tmp_path / "aborted"
    process = start(run, cache_dir)
    wait_for(lambda: len(steps_logged(run)) >= 25, "step 25", process)
    workers = run_pids(run, process)[1:]
    os.killpg(process.pid, signal.SIGINT)
    wait_for(lambda: (run / "STOP").exists(), "the stop request", process)  # the first Ctrl-C was handled
    os.killpg(process.pid, signal.SIGINT)
    started = time.perf_counter()
    output, _ = process.communicate(timeout=60)
    print(f"aborted in {time.perf_counter() - started:.1f} s")
    assert process.returncode == 1, output
    assert "aborted by a second Ctrl-C: the workers were killed" in output and "to resume from" in output, output
    assert "Traceback" not in output
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    run_distrain("train", *RUN, f"data.cache_dir={cache_dir}", f"run.dir={run}")
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
    assert "Current thread" in log and 'trainer/observe/watchdog.py", line' in log  # faulthandler's dump, every thread
    assert re.search(r'trainer/train/loop.py", line \d+, in (train_step|fit)', log)  # where the collective was called
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


def kill_and_relaunch(
    run: Path, first: subprocess.Popen, second: subprocess.Popen, relaunch, wait_s: float = 180, end_s: float = 300
) -> tuple[float, int]:
    """Kill the second node (launcher and worker), start it again with `relaunch()` as a supervisor would, and
    wait until the group re-forms and both launchers end with 0: (seconds from the relaunch to the re-formed
    group, the step the run resumed from)."""
    kill_node(second, run)
    relaunched_at = time.time()
    again = relaunch()
    logs = lambda: "".join(p.read_text() for p in (run / "logs").glob("rank_*.log"))  # noqa: E731
    wait_for(lambda: "attempt 1" in logs(), "the group to re-form", first, timeout=wait_s)
    reformed = time.time() - relaunched_at
    outputs = [p.communicate(timeout=end_s)[0] for p in (first, again)]
    assert first.returncode == 0 and again.returncode == 0, outputs
    return reformed, int(re.search(r"resumed from .*step_(\d+) at step", "".join(outputs)).group(1))


def kill_and_wait_for_the_survivor(
    run: Path, survivor: subprocess.Popen, killed: subprocess.Popen
) -> tuple[str, float]:
    """Kill one node (launcher and worker) and do not relaunch it: (the survivor's output, seconds from the kill
    until the survivor's launcher ended)."""
    kill_node(killed, run)
    killed_at = time.time()
    output, _ = survivor.communicate(timeout=300)
    return output, time.time() - killed_at


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
    reformed, resumed = kill_and_relaunch(run, first, second, lambda: two_node_launch(run, cache_dir, endpoint))
    print(f"relaunched node: group re-formed after {reformed:.1f} s, resumed from step {resumed}, "
          f"max |diff| of the final weights vs uninterrupted: {same_weights(run, uninterrupted):.3g}")  # fmt: skip
    assert resumed >= 20
    assert_matches(run, uninterrupted)


@pytest.mark.slow
def test_a_diverging_run_exits_1_as_diverged_with_strict_json_and_finite_checkpoints(tmp_path, cache_dir):
    run = tmp_path / "diverging"
    result = run_distrain("train", *RUN, "train.max_steps=20", "train.save_every=1", "train.keep_last=30",
                          "optim.lr=1e30", "optim.max_grad_norm=null", f"data.cache_dir={cache_dir}",
                          f"run.dir={run}", check=False)  # fmt: skip
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 1
    assert "training diverged at step" in result.stderr and "Traceback" not in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert not (run / "export").exists()
    from distrain.trainer.checkpoint.store import complete_checkpoints
    from distrain.trainer.inference.load import load_for_inference, locate

    for _, folder in complete_checkpoints(run / "checkpoints"):
        *_, model = load_for_inference(locate(folder))
        assert all(p.isfinite().all() for p in model.parameters()), folder


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_removes_the_partial_checkpoint_and_stops_with_the_path_and_size(tmp_path, cache_dir):
    run = tmp_path / "small-disk"
    run.mkdir()
    # Room for about one checkpoint of the tiny model (its files, logs and metrics), not for a second.
    probe = tmp_path / "probe"
    run_distrain("train", *RUN, "train.max_steps=1", f"data.cache_dir={cache_dir}", f"run.dir={probe}")
    one = sum(p.stat().st_size for p in (probe / "checkpoints" / "step_1").iterdir())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.6)}", "tmpfs", str(run)], check=True)
    try:
        result = run_distrain("train", *RUN, "train.export_weights=last", f"data.cache_dir={cache_dir}",
                              f"run.dir={run}", check=False)  # fmt: skip
        print(result.stderr[-3000:])
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert re.search(
            rf"writing checkpoint {run}/checkpoints/step_20\.partial failed: .*No space left", result.stderr
        )
        assert re.search(r"needs about [\d.]+ MB \([\d.]+ MB free", result.stderr), result.stderr
        kept = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert kept == ["step_10"], kept  # the previous checkpoint stays, the partial one is gone
        assert (run / "checkpoints" / "step_10" / "COMPLETE").is_file()
    finally:
        subprocess.run(["umount", str(run)], check=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_disk_that_fills_between_checkpoints_stops_the_run_saying_where_and_how_to_resume(tmp_path, cache_dir):
    """Another process fills the run's disk during training: its next record cannot be written. The run stops
    naming the folder and the way on, without a traceback; once there is room, the rerun resumes."""
    run = tmp_path / "filled"
    run.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(run)], check=True)
    try:
        process = start(run, cache_dir, "train.save_every=1000")
        wait_for(lambda: max(steps_logged(run), default=0) >= 3, "step 3", process)
        subprocess.run(["dd", "if=/dev/zero", f"of={run / 'filler'}", "bs=64k"], capture_output=True)
        output, _ = process.communicate(timeout=180)
        said = " ".join(output.split())
        assert process.returncode == 1 and "Traceback" not in said, output
        assert f"the disk holding {run} is full" in said, output
        assert "Free space, then rerun the same command to resume from the start" in said, output
    finally:
        subprocess.run(["umount", str(run)], check=True)


@pytest.mark.slow
def test_without_a_relaunch_the_surviving_node_stops_in_bounded_time_naming_the_missing_host(tmp_path, cache_dir):
    run, endpoint = tmp_path / "lost", f"127.0.0.1:{free_port()}"
    first = two_node_launch(run, cache_dir, endpoint, "launcher.join_timeout_s=20")
    time.sleep(2)
    second = two_node_launch(run, cache_dir, endpoint, "launcher.join_timeout_s=20")
    wait_for(lambda: max(steps_logged(run), default=0) >= 25, "step 25", first)
    output, seconds = kill_and_wait_for_the_survivor(run, first, second)
    print(f"the surviving launcher stopped {seconds:.1f} s after the other node died:\n{output[-1200:]}")
    assert first.returncode == 1
    assert "did not (re-)form" in output and "launcher.join_timeout_s=20" in output
    assert f"this host is {socket.gethostname()}" in output
    assert "Traceback" not in output.split("distrain run dir")[-1]  # the launcher's own report
    assert seconds < 20 + 60  # the join timeout, a worker restart and torchrun's shutdown
