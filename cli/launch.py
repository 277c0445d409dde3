"""Start the workers with torch.distributed.run (torchrun) in this process, and wait for them."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure


class TrainingFailed(RuntimeError):
    """The worker group failed (after any restarts); the message names the ranks, exit codes and logs."""


def torchrun_args(launcher: DictConfig, run_dir: Path) -> list[str]:
    args = [
        f"--nproc-per-node={launcher.nproc_per_node}",
        f"--nnodes={launcher.nnodes}",
        f"--max-restarts={launcher.max_restarts}",
        f"--monitor-interval={launcher.monitor_interval}",
    ]
    if launcher.nnodes == 1 and launcher.rdzv_endpoint is None:
        args.append("--standalone")  # c10d rendezvous on a free local port
    else:
        # Every node must use the same id: by default the SLURM job or the run dir (the same path on all nodes).
        rdzv_id = (
            launcher.rdzv_id or os.environ.get("SLURM_JOB_ID") or hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
        )
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launcher.rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
        if launcher.node_rank is not None:
            args.append(f"--node-rank={launcher.node_rank}")
    return [*args, "--module", "distrain.trainer.worker", str(run_dir)]


def _message(failure: ProcessFailure) -> str:
    message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
    return message.strip() or "no error recorded (killed by a signal?)"


def launch(launcher: DictConfig, run_dir: Path) -> None:
    from torch.distributed.run import parse_args, run

    # Its one-line "failed (exitcode ...)" duplicates the report below.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)

    threads = launcher.threads_per_process or max(1, (os.cpu_count() or 1) // launcher.nproc_per_node)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # workers inherit it; restored for the next multirun job
    try:
        run(parse_args(torchrun_args(launcher, run_dir)))
    except ChildFailedError as error:
        # The first rank to fail holds the cause; the others usually died of losing their peer.
        first_rank, first = error.get_first_failure()
        lines = [f"rank {first_rank} failed first (exit code {first.exitcode}): {_message(first)}"]
        for rank, failure in sorted(error.failures.items()):
            if rank != first_rank:
                lines.append(f"rank {rank} exited too (code {failure.exitcode}): {run_dir}/logs/rank_{rank}.log")
        lines.append(f"logs: {run_dir / 'logs'}")
        raise TrainingFailed("\n".join(lines)) from None
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
