"""A hang is a failure with a diagnosis, not a silent wait.

Each rank runs one watchdog thread once training starts. The loop marks its progress with `mark(phase, step)`
(data, forward, backward, optimizer, checkpoint, eval); the thread publishes it as a heartbeat in the job's store
every few seconds. When a rank makes no progress for `launcher.collective_timeout_s`, or a collective times out
(the process group's timeout is the same value), the rank writes the Python stacks of all its threads and what it
was doing into its log, names the ranks that did not arrive (no heartbeat any more: stopped or dead; or behind
the others), and exits 1; torchrun then stops the group, or restarts it with `launcher.max_restarts`.

The heartbeats go through a store client of their own, so a main thread blocked in the store or a collective
does not block them. Setup (the tokenized cache built by local rank 0, model loading) is not watched: ranks
wait there outside any timed collective (`distrain.trainer.data.cache.build_once`).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)
PHASES = ("data", "forward", "backward", "optimizer", "checkpoint", "eval")


class HangError(RuntimeError):
    """Recorded for torchrun as the rank's failure: which ranks did not arrive, and what they were doing."""


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, log_file: Path):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        # A descriptor: faulthandler writes to it without Python's buffers or locks (another thread may hold them).
        self.log_fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.interval = min(10.0, timeout_s / 6)
        self.phase, self.step, self.last_progress = "setup", 0, time.time()
        self.armed = False  # from the first mark on: setup is not watched
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        client = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=max(30.0, timeout_s)),
        )  # fmt: skip
        self.store = dist.PrefixStore(f"attempt{attempt}/heartbeat", client)  # one node: one restart count
        self.identity = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distrain-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.log_fd)

    def mark(self, phase: str, step: int | None) -> None:
        self.phase, self.last_progress, self.armed = phase, time.time(), True
        if step is not None:
            self.step = step

    def _beat(self) -> None:
        beat = {"step": self.step, "phase": self.phase, "progress": self.last_progress, "beat": time.time()}
        self.store.set(str(self.rank), json.dumps({**beat, **self.identity}))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception as error:  # the store's host is gone: the agent is handling the failure already
                log.warning("watchdog: heartbeat not published (%s)", error)
            idle = time.time() - self.last_progress
            if self.armed and idle > self.timeout_s:
                self.fail(f"no progress for {idle:.0f} s (launcher.collective_timeout_s={self.timeout_s:g})")

    def peers(self) -> dict[int, dict[str, Any]]:
        """The last heartbeat of every rank that published one."""
        found = {}
        for rank in range(self.world_size):
            try:
                if self.store.check([str(rank)]):
                    found[rank] = json.loads(self.store.get(str(rank)))
            except Exception:  # the store is gone: report what this rank knows
                break
        return found

    def missing(self, peers: dict[int, dict[str, Any]]) -> dict[int, str]:
        """Ranks that did not arrive, with why: no heartbeat for 3 intervals (stopped, dead or frozen), or a
        step and phase behind the furthest rank's (stuck in data loading, a deadlock)."""
        now, stale = time.time(), 3 * self.interval

        def position(beat: dict[str, Any]) -> tuple[int, int]:
            return beat["step"], PHASES.index(beat["phase"]) if beat["phase"] in PHASES else -1

        furthest = max((position(b) for b in peers.values()), default=(0, 0))
        out = {}
        for rank in range(self.world_size):
            beat = peers.get(rank)
            if beat is None:
                out[rank] = "never sent a heartbeat"
                continue
            where = f"last heard at step {beat['step']}, phase {beat['phase']}; {beat['host']} pid {beat['pid']}"
            if now - beat["beat"] > stale:
                out[rank] = f"silent for {now - beat['beat']:.0f} s ({where}): stopped, frozen or dead"
            elif position(beat) < furthest:
                out[rank] = f"behind the others ({where}), no progress for {now - beat['progress']:.0f} s"
        return out

    def fail(self, reason: str, error: BaseException | None = None) -> None:
        """Write the stacks (and where `error` was raised: the collective that failed) and the diagnosis into this
        rank's log, record it for torchrun, exit 1."""
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        missing = self.missing(self.peers())
        names = "; ".join(f"rank {r} {why}" for r, why in sorted(missing.items())) or (
            f"none silent or behind (a rank that died in the last {3 * self.interval:.0f} s still looks alive)"
        )
        message = (
            f"rank {self.rank} stopped at step {self.step} in phase {self.phase}: {reason}. Ranks that did not arrive:"
            f" {names}. The stacks of every thread are in each live rank's log (logs/rank_<r>.log)."
        )
        log.error(message)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if error is not None:
            os.write(self.log_fd, "".join(traceback.format_exception(error)).encode())
        header = f"--- rank {self.rank}: stacks of all threads (step {self.step}, phase {self.phase})\n"
        os.write(self.log_fd, header.encode())
        faulthandler.dump_traceback(file=self.log_fd, all_threads=True)
        get_error_handler().record_exception(HangError(message))
        os._exit(1)  # the main thread is stuck: end the process from here


_current: Watchdog | None = None


def start_watchdog(rank: int, world_size: int, timeout_s: float, log_file: Path) -> Watchdog:
    global _current
    _current = Watchdog(rank, world_size, timeout_s, log_file).start()
    return _current


def mark(phase: str, step: int | None = None) -> None:
    """Record progress (what this rank is doing now); a no-op outside a watched worker."""
    if _current is not None:
        _current.mark(phase, step)


def fail_if_collective_failed(error: BaseException) -> None:
    """A collective that timed out (the process group's timeout) or lost a peer (a dead worker or host) ends with
    the same diagnosis as a hang, instead of a traceback on the console."""
    text = str(error)
    collective = isinstance(error, dist.DistBackendError) or any(word in text for word in ("gloo", "NCCL"))
    if _current is not None and isinstance(error, RuntimeError) and collective:
        what = "timed out" if "timed out" in text.lower() else "failed"
        _current.fail(f"a collective {what}: {text.splitlines()[0][:300]}", error)
