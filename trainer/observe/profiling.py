"""`train.profile_steps=[first, last]`: torch.profiler over those optimizer steps, on every rank.

Each rank writes a Chrome/Perfetto trace `<run.dir>/profile/rank_<r>.pt.trace.json` (CPU and, where present,
CUDA activities, with shapes and memory; https://ui.perfetto.dev and chrome://tracing open it) and
logs its top operators by self time into `logs/rank_<r>.log`. The train records of those steps say
`"profiled": true`: the profiler slows them down, so their tokens/s is not comparable.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, steps: list[int] | None, run_dir: Path, rank: int):
        self.first, self.last = steps if steps else (None, None)
        self.trace = run_dir / "profile" / f"rank_{rank}.pt.trace.json"
        self.profiler: torch.profiler.profile | None = None

    @property
    def active(self) -> bool:
        return self.profiler is not None

    def before_step(self, step: int) -> None:
        """`step` is about to run (its data loading included)."""
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.start()

    def after_step(self, step: int) -> None:
        if self.profiler is None or step != self.last:
            return
        self.profiler.stop()
        self.trace.parent.mkdir(exist_ok=True)
        self.profiler.export_chrome_trace(str(self.trace))
        by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=by, row_limit=15, max_name_column_width=70)
        log.info("profile of steps %d-%d, top operators by self time (trace: %s)\n%s", self.first, step, self.trace,
                 table)  # fmt: skip
        log.info("profile of steps %d-%d, collectives on the backend's own threads (not in the table above; they "
                 "overlap with it, waiting for peers included): %s", self.first, step,
                 collectives(self.trace) or "none")  # fmt: skip
        self.profiler = None


def collectives(trace: Path) -> str:
    """Calls and seconds per collective (gloo:all_reduce, nccl:...) in a Chrome trace, on any thread."""
    events = json.loads(trace.read_text())["traceEvents"]
    calls: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    for event in events:
        name = event.get("name", "")
        if name.startswith(("gloo:", "nccl:")) and "dur" in event:
            calls[name] += 1
            seconds[name] += event["dur"] / 1e6  # microseconds in the trace
    return ", ".join(f"{name} {calls[name]} calls {seconds[name]:.3f} s" for name, _ in seconds.most_common())
