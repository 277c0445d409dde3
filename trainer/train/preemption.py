"""Stopping on request: a signal (SLURM's warning before a time limit or preemption, SIGTERM) or a STOP file in
the run dir (`touch <run.dir>/STOP`, which is also how the launcher passes on a signal it receives).

A handler only sets a flag; the loop all-reduces it after every step, so every rank stops after the same step,
writes a checkpoint and ends with status "preempted". The launcher then requeues the SLURM job, whose rerun
resumes from that checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path

from distrain.trainer.config import run_files


def signal_number(name: str) -> signal.Signals:
    """`USR1`, `SIGUSR1` or `10` -> the signal."""
    name = name.upper()
    if name.isdigit():
        return signal.Signals(int(name))
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


class StopRequest:
    def __init__(self, run_dir: Path, signals: list[str]):
        self.flag = False
        self.file = run_dir / run_files.STOP
        for name in signals:
            signal.signal(signal_number(name), self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.flag = True

    def requested(self) -> bool:
        return self.flag or self.file.exists()
