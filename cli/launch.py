"""Start the workers with torch.distributed.run (torchrun) in this process, and wait for them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from distrain.cli.console import console
from distrain.trainer.config import run_files
from distrain.trainer.errors import ConfigError
from distrain.trainer.train.preemption import signal_number

SHARED_STORE_OFF = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
LIBC_FATAL = "LIBC_FATAL_STDERR_"


class TrainingFailed(RuntimeError):
    """The worker group failed (after any restarts); the message names the ranks, exit codes and logs."""


class RefusedByWorkers(ConfigError):
    """A setting only the data can check (task.class_weights against its labels), refused by the workers."""


def rdzv_id(launcher: DictConfig, run_dir: Path) -> str | None:
    """The rendezvous id of a multi-node job (None for one node without an endpoint: a standalone rendezvous).
    Every node must use the same id: by default the SLURM job or the run dir (the same path on all nodes)."""
    if launcher.nnodes == 1 and launcher.rdzv_endpoint is None:
        return None
    return launcher.rdzv_id or os.environ.get("SLURM_JOB_ID") or hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]


def forks_workers(launcher: DictConfig, device: str) -> bool:
    """Whether the workers are forked from this process (launcher.start_method; auto: CPU workers are)."""
    if launcher.start_method == "auto":
        from distrain.trainer.parallel.distributed import uses_cuda

        return not uses_cuda(device)
    return launcher.start_method == "fork"


def torchrun_args(launcher: DictConfig, run_dir: Path, forked_worker: str | None) -> list[str]:
    """torchrun's command line; `forked_worker`: the worker's file when the workers are forked from this process."""
    args = [
        f"--nproc-per-node={launcher.nproc_per_node}",
        f"--nnodes={launcher.nnodes}",
        f"--max-restarts={launcher.max_restarts}",
        f"--monitor-interval={launcher.monitor_interval}",
        # torchrun's agent leaves SIGINT (Ctrl-C) and SIGTERM to `launch`: on its own SIGTERM it would wait 30 s
        # for forked workers that stopped with a checkpoint and then wait for it to read their results
        "--signals-to-handle=SIGHUP,SIGQUIT",
    ]
    job = rdzv_id(launcher, run_dir)
    if job is None:
        args.append("--standalone")  # c10d rendezvous on a free local port
    else:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launcher.rdzv_endpoint}", f"--rdzv-id={job}",
                 f"--rdzv-conf=join_timeout={launcher.join_timeout_s:g}"]  # fmt: skip
        if launcher.node_rank is not None:
            args.append(f"--node-rank={launcher.node_rank}")
    if forked_worker is not None:
        return [*args, "--start-method=fork", "--run-path", forked_worker, str(run_dir)]
    return [*args, "--module", "distrain.trainer.worker", str(run_dir)]  # a fresh interpreter per worker


def import_worker(task: str) -> str:
    """Import what every worker needs (torch, transformers, datasets: ~3 s per process on a CPU core) and the
    task's metric modules, once, in this process, which the workers fork from; the worker's file."""
    import importlib

    from distrain.trainer import worker
    from distrain.trainer.tasks import task_class

    for module in task_class(task).metric_modules:
        importlib.import_module(module)
    return worker.__file__


def default_threads(nproc_per_node: int) -> int:
    """launcher.threads_per_process when null: this node's CPU cores, shared by its worker processes."""
    return max(1, (os.cpu_count() or 1) // nproc_per_node)


def _message(failure: ProcessFailure) -> str:
    message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
    return message.strip() or "no error recorded (killed by a signal?)"


def launch(launcher: DictConfig, run_dir: Path, device: str, task: str) -> None:
    """Run the workers to the end. A stop signal to this process (launcher.preempt_signal, or SIGTERM) makes them
    checkpoint and stop; under SLURM the job is then requeued. Ctrl-C (SIGINT) is a stop request too (never
    requeued); a second Ctrl-C kills the workers at once."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    # Its one-line "failed (exitcode ...)" duplicates the report below.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)

    threads = launcher.threads_per_process or default_threads(launcher.nproc_per_node)
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", SHARED_STORE_OFF, LIBC_FATAL)}
    os.environ["OMP_NUM_THREADS"] = str(threads)  # workers inherit it; restored for the next multirun job
    os.environ[LIBC_FATAL] = "1"  # glibc's fatal messages (heap corruption, ...) on stderr, not only on a tty
    if launcher.nnodes > 1 or launcher.rdzv_endpoint is not None:
        # A fresh workers' store per rendezvous round: torchrun's shared one is set up once per agent, so a node
        # whose launcher was killed and started again never finds it and the group cannot re-form.
        os.environ[SHARED_STORE_OFF] = "1"
    stop_file = run_dir / run_files.STOP
    stop_file.unlink(missing_ok=True)  # a request from an earlier run must not stop this one
    preempt = signal_number(launcher.preempt_signal)
    terms = []

    def on_stop(signum: int, frame: object) -> None:
        if signum == signal.SIGTERM:
            terms.append(signum)
            if len(terms) > 1:  # as a second Ctrl-C: the workers may be stuck (the watchdog would take minutes)
                raise SignalException("a second SIGTERM", sigval=signal.SIGKILL)
        stop_file.touch()  # the workers see the file after their step

    previous = {number: signal.signal(number, on_stop) for number in {preempt, signal.SIGTERM}}
    interrupts = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupts.append(signum)
        if len(interrupts) == 1:
            stop_file.touch()
            console.print("\n[bold]Ctrl-C[/]: the workers finish their step and write a checkpoint (Ctrl-C again "
                          "aborts at once)")  # fmt: skip
        else:  # torchrun's agent catches this, kills the workers with the signal given, and re-raises it
            raise SignalException("a second Ctrl-C", sigval=signal.SIGKILL)

    previous_interrupt = signal.signal(signal.SIGINT, on_interrupt)
    try:
        forked_worker = import_worker(task) if forks_workers(launcher, device) else None
        run(parse_args(torchrun_args(launcher, run_dir, forked_worker)))
    except RendezvousTimeoutError:
        raise TrainingFailed(_missing_nodes(launcher, run_dir)) from None
    except SignalException as error:
        # SIGHUP or SIGQUIT to this process: torchrun has passed it on and waited for the workers. A second
        # Ctrl-C or SIGTERM: killed.
        if len(interrupts) > 1 or len(terms) > 1:
            what = "Ctrl-C" if len(interrupts) > 1 else "SIGTERM"
            message = f"aborted by a second {what}: the workers were killed. {resume_hint(run_dir)}"
            raise TrainingFailed(message) from None
        if not _preempted(run_dir):
            raise TrainingFailed(f"stopped by {error.sigval.name} before a checkpoint was written") from None
    except ChildFailedError as error:
        # The first rank to fail holds the cause; the others usually died of losing their peer.
        first_rank, first = error.get_first_failure()
        said = _message(first)
        if said.startswith(f"{ConfigError.__name__}: "):
            raise RefusedByWorkers([line.removeprefix("  - ") for line in said.splitlines()[1:]]) from None
        lines = [f"rank {first_rank} failed first (exit code {first.exitcode}): {said}"]
        for rank, failure in sorted(error.failures.items()):
            if rank != first_rank:
                lines.append(f"rank {rank} exited too (code {failure.exitcode}): {run_files.rank_log(run_dir, rank)}")
        # A rank killed by a signal (the OOM killer, kill -9), or its peer's collective failing with it (which
        # torchrun may report first): the work up to the last checkpoint is kept
        if first.exitcode < 0 or said.startswith("HangError: "):
            lines.append(resume_hint(run_dir))
        lines.append(f"logs: {run_dir / run_files.LOGS}")
        raise TrainingFailed("\n".join(lines)) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        signal.signal(signal.SIGINT, previous_interrupt)
        stop_file.unlink(missing_ok=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if _preempted(run_dir):
        _after_preemption(launcher, run_dir, interrupted=bool(interrupts))


def resume_hint(run_dir: Path) -> str:
    from distrain.trainer.checkpoint.store import latest_checkpoint

    latest = latest_checkpoint(run_dir / run_files.CHECKPOINTS)
    return (f"Rerun the same command (run.dir={run_dir}) to resume from "
            f"{latest or 'the start: no checkpoint was written yet'}")  # fmt: skip


def _missing_nodes(launcher: DictConfig, run_dir: Path) -> str:
    """Which hosts did not come back: those of the last worker group (their ranks' logs in the shared run dir)
    other than this one."""
    hosts = set()
    for log in (run_dir / run_files.LOGS).glob("rank_*.log"):
        found = re.findall(r"rank \d+: pid \d+ on (\S+), attempt", log.read_text(errors="replace"))
        hosts.update(found[-1:])
    me = socket.gethostname()
    others = ", ".join(sorted(hosts - {me})) or "none recorded in logs/ (was a group ever formed?)"
    return (
        f"the worker group did not (re-)form: launcher.nnodes={launcher.nnodes} nodes must join the rendezvous at "
        f"{launcher.rdzv_endpoint} within launcher.join_timeout_s={launcher.join_timeout_s:g} s, and not all did. "
        f"Missing: the other hosts of the last group ({others}); this host is {me}. Start the same `distrain train` "
        f"command there (it resumes from the last checkpoint), or requeue the job."
    )


def _preempted(run_dir: Path) -> bool:
    summary = run_dir / run_files.SUMMARY
    return summary.exists() and run_files.is_preempted(json.loads(summary.read_text())["status"])


def _after_preemption(launcher: DictConfig, run_dir: Path, interrupted: bool) -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if job and launcher.requeue and not interrupted:  # a Ctrl-C is the user's stop, not the scheduler's
        # The requeued job gets the same SLURM_JOB_ID, hence the same run dir, and resumes from the checkpoint.
        # Requeueing ends this job step with SIGTERM: the line below is still printed, and the exit is clean.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            raise TrainingFailed(f"stopped with a checkpoint, but `scontrol requeue {job}` failed: {result.stderr}")
        console.print(f"checkpoint written; SLURM job {job} requeued: it resumes in {run_dir}")
    else:
        console.print(f"checkpoint written; run the same command (run.dir={run_dir}) to resume")
