"""The run directory's file names and a run's statuses: the one place that spells them.

<run.dir>/config.yaml       the resolved config (workers and `distrain eval` read it, never Hydra)
<run.dir>/overrides.yaml    the command line's overrides
<run.dir>/env.json          versions, git sha, host, peak FLOP/s per process
<run.dir>/head.json         the task head's settings (label names), so weights load without the data
<run.dir>/class_weights.json  task.class_weights: the loss weight per label and the training counts behind it
<run.dir>/metrics.jsonl     one JSON record per line: train, eval, memory, resume
<run.dir>/summary.json      the last invocation's result (status, step, best metric, ...); none while one runs
<run.dir>/summary.previous.json  the one before, moved aside when a rerun starts
<run.dir>/logs/rank_<r>.log every rank's log
<run.dir>/checkpoints/      step_<N>/ DCP checkpoints
<run.dir>/export/           the Hugging Face folder (weights, tokenizer, labels, distrain_config.yaml, card)
<run.dir>/tokenizer/        a tokenizer the run trained (model.train_tokenizer_vocab)
<run.dir>/STOP              created by a user (or the launcher): checkpoint and stop after this step
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
OVERRIDES = "overrides.yaml"
ENV = "env.json"
HEAD = "head.json"
CLASS_WEIGHTS = "class_weights.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PREVIOUS_SUMMARY = "summary.previous.json"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
EXPORT = "export"
EXPORT_CONFIG = "distrain_config.yaml"  # the run's config.yaml, copied into an export folder
TOKENIZER = "tokenizer"
STOP = "STOP"


def rank_log(run_dir: Path, rank: int) -> Path:
    return run_dir / LOGS / f"rank_{rank}.log"


# --- statuses (summary.json's "status") -----------------------------------------------------------------------
FINISHED = "finished"
EARLY_STOPPED = "early stopped"
DIVERGED = "diverged"
PRUNED = "pruned"  # a sweep's pruner stopped the trial at a dev evaluation (summary "pruned": why); resumable
_PREEMPTED = "preempted at step"
_STOPPED = "stopped at step"  # train.stop_at_step reached: a rerun resumes
REFUSED = "invalid configuration"  # a sweep's job refused before it started (summary "problems": each with its key)
FAILED = "failed"  # a sweep's job whose workers failed without a summary of their own (summary "problems": why)


def preempted(step: int) -> str:
    return f"{_PREEMPTED} {step}"


def stopped(step: int) -> str:
    return f"{_STOPPED} {step}"


def is_preempted(status: str) -> bool:
    return status.startswith(_PREEMPTED)


def is_complete(status: str) -> bool:
    """Training ran to its end (all steps, or early stopping): nothing left to resume."""
    return status in (FINISHED, EARLY_STOPPED)
