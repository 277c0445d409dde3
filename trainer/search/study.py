"""The study of a sweep: where it is stored, its sampler and pruner, and the trials a dead sweep left running.

Storage (`sweep.storage`): null -> SQLite file <sweep dir>/study.db; `journal` -> Optuna's journal file
<sweep dir>/study.journal (appends with file locks: safe on NFS, where SQLite's locks are not); `journal:PATH` -> a
journal file elsewhere; anything else -> an RDB URL (postgresql://, mysql://, sqlite:///...). The sweeper hands the
resolved form to each trial's run, whose rank 0 reports its dev evaluations to the same study.
Optuna is imported inside the functions: Hydra imports the sweeper at every start.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

JOURNAL = "journal"
OWNER = "distrain_sweeper"  # trial user attr: the sweeper process that runs the trial (host, pid, its start time)
RETRY_OF = "retry_of"  # trial user attr: the number of the trial whose process died, whose params these are


def resolve_storage(spec: str | None, sweep_dir: Path) -> str:
    """sweep.storage as every process of the sweep reaches it: an RDB URL or `journal:<absolute path>`."""
    if spec is None:
        return f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    if spec == JOURNAL:
        return f"{JOURNAL}:{(sweep_dir / 'study.journal').resolve()}"
    if spec.startswith(f"{JOURNAL}:"):
        return f"{JOURNAL}:{Path(spec.split(':', 1)[1]).expanduser().resolve()}"
    return spec


def open_storage(url: str) -> Any:
    """The Optuna storage of a resolved URL; raises on a URL that cannot be opened."""
    import optuna

    if url.startswith(f"{JOURNAL}:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.split(":", 1)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Many trial processes write to one SQLite file at once: wait for its lock instead of failing at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except (IntegrityError, OperationalError) as error:
            # Processes opening a new database at once (a sweep starting while `distrain report` or the dashboard
            # reads it) race to create its tables and schema version: the losers' CREATE or INSERT fails, and the
            # schema is complete when they try again.
            if isinstance(error, OperationalError) and "already exists" not in str(error):
                raise
            time.sleep(0.2 * (attempt + 1))
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def display_url(url: str) -> str:
    """The storage URL for messages and files: an RDB password is masked."""
    if url.startswith(f"{JOURNAL}:") or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def build_sampler(sweep: DictConfig, grid: dict[str, list] | None, seed: int) -> Any:
    import optuna

    name = str(sweep.sampler)
    if name == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=sweep.n_startup_trials, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "cmaes":
        # Categorical keys (choice) are drawn by the random sampler beside CMA-ES: expected, not worth a warning.
        return optuna.samplers.CmaEsSampler(n_startup_trials=sweep.n_startup_trials, seed=seed,
                                            warn_independent_sampling=False)  # fmt: skip
    raise ValueError(f"sweep.sampler: unknown sampler {name!r}")


def build_pruner(sweep: DictConfig, eval_every: int = 0) -> Any:
    """The same pruner in the sweeper and in every trial's rank 0 (should_prune asks it there)."""
    import optuna

    name = str(sweep.pruner)
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.n_startup_trials)
    if name == "asha":
        # The first rung sits at the first dev evaluation: Optuna's "auto" estimate assumes a report every step and
        # puts its rungs at steps 2, 6, 18, so one early evaluation decided three rungs at once (measured on
        # CoNLL-2003: the best trial pruned at its first evaluation; docs/performance.md).
        first = sweep.min_resource or eval_every or "auto"
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    raise ValueError(f"sweep.pruner: unknown pruner {name!r}")


# --- trials of a dead sweep --------------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), which tells a live process from a new one with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def owner_alive(record: dict[str, Any] | None) -> bool:
    """Whether the sweeper that started a trial still runs. One on another host cannot be asked: assumed alive."""
    if not record or record.get("host") != socket.gethostname():
        return bool(record)
    return _start_time(record["pid"]) == record.get("started")


def recover(study: Any) -> list[tuple[int, int]]:
    """Mark FAIL each RUNNING trial whose sweeper process is gone, and enqueue its params again: the next trial asked
    for tries them. Returns (failed trial, its retry is to come) pairs for the message."""
    from optuna.trial import TrialState

    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_alive(trial.user_attrs.get(OWNER)):
            continue
        told(study, trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
        recovered.append((trial.number, len(study.trials) - 1))
    return recovered


def told(study: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
    """study.tell; the grid sampler's study.stop() once its grid is done (an error outside study.optimize, raised
    after the trial was stored) is not a failure here: the sweeper stops at n_trials, capped at the grid's size."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise


def finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
