"""The hang watchdog outside a collective: two real processes share a real TCPStore, as two workers of a job do.
Rank 0 stalls in data loading at step 3 (a deadlock there never enters a collective, so no process-group timeout
would fire); rank 1 reaches step 5 and waits for it. Both must stop within the timeout plus a few heartbeats,
each writing every thread's stack into its log and naming rank 0, the one that did not arrive, in the error
torchrun reports. (tests/test_recovery.py stops a worker of a real `distrain train` run.) And a long one-rank
phase, the cache build on local rank 0, must not trip the collective timeout (slow)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from conftest import DISTRAIN, TINY

WORKER = """
import sys, time
from pathlib import Path
from distrain.trainer.observe.watchdog import mark, start_watchdog

rank = int(sys.argv[1])
start_watchdog(rank, 2, 6.0, Path(sys.argv[2]))
for step in range(1, 6 if rank else 4):
    mark("data", step)
    mark("forward")
mark("data" if rank == 0 else "forward")
time.sleep(120)  # rank 0: stuck loading a batch; rank 1: waiting for rank 0
"""


def test_a_rank_stuck_outside_a_collective_is_named_by_every_live_rank_with_stacks(tmp_path):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
               "TORCHELASTIC_ERROR_FILE": str(tmp_path / f"error_{rank}.json")}  # fmt: skip
        args = [sys.executable, "-c", WORKER, str(rank), str(tmp_path / f"rank_{rank}.log")]
        procs.append(subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True))
    codes = [p.wait(timeout=90) for p in procs]
    assert codes == [1, 1], [p.stderr.read() for p in procs]
    for rank in (0, 1):
        log = (tmp_path / f"rank_{rank}.log").read_text()
        assert f"--- rank {rank}: stacks of all threads" in log
        assert 'File "<string>", line 12 in <module>' in log  # the main thread's sleep: where it hangs
        error = json.loads((tmp_path / f"error_{rank}.json").read_text())["message"]["message"]
        assert error.startswith(f"HangError: rank {rank} stopped at step ")
        idle = int(re.search(r"no progress for (\d+) s \(launcher.collective_timeout_s=6\)", error).group(1))
        assert 6 <= idle <= 6 + 2  # checked every timeout/6 s
    error_1 = json.loads((tmp_path / "error_1.json").read_text())["message"]["message"]
    assert "Ranks that did not arrive: rank 0 behind the others (last heard at step 3, phase data;" in error_1
    assert "rank 1" not in error_1.split("did not arrive:")[1]


@pytest.mark.slow
def test_a_one_rank_build_longer_than_the_collective_timeout_does_not_fail_the_run(tmp_path):
    """Local rank 0 builds the tokenized cache while rank 1 waits: SIGSTOP rank 0 in the build for 12 s with
    launcher.collective_timeout_s=5. Rank 1 waits by watching the folder, not in a collective, so the run ends."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [DISTRAIN, "train", *TINY, "parallel=ddp", "launcher.nproc_per_node=2", "launcher.collective_timeout_s=5",
            f"data.cache_dir={cache}", f"run.dir={run}"]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run / "logs" / "rank_0.log"
    deadline = time.time() + 300
    while "building the tokenized cache" not in (text := log.read_text() if log.exists() else ""):
        assert process.poll() is None and time.time() < deadline, "the run ended before building its cache"
        time.sleep(0.01)
    pid = int(re.search(r"rank 0: pid (\d+)", text).group(1))
    os.kill(pid, signal.SIGSTOP)
    assert not list(cache.rglob("*.arrow")), "rank 0 was stopped after its build, not in it"
    time.sleep(12)
    os.kill(pid, signal.SIGCONT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "reading the tokenized cache" in (run / "logs" / "rank_1.log").read_text()
