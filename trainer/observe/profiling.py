"""`train.profile_steps=[first, last]`: torch.profiler over those optimizer steps, on every rank.

Each rank writes a Chrome/Perfetto trace `<run.dir>/profile/rank_<r>.pt.trace.json` (CPU and, where present,
CUDA activities, with shapes and memory; https://ui.perfetto.dev and chrome://tracing open it) and
logs its top operators by self time and the breakdown of a step's time (`breakdown`: forward, backward and
optimizer, each's matrix multiplies, the rest; also used for the Hugging Face Trainer's steps by
cli/bench_hf.py) into `logs/rank_<r>.log`. The train records of those steps say
`"profiled": true`: the profiler slows them down, so their tokens/s is not comparable.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

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
        log.info("profile of steps %d-%d, seconds per step: %s", self.first, step,
                 format_breakdown(breakdown(self.trace, step - self.first + 1)))  # fmt: skip
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


FORWARD = "forward"  # the record_function label around a micro-batch's forward and loss (both sides)
# Matrix multiplies: GEMMs (autocast bf16 keeps these names; oneDNN runs them) and the fused attention kernels.
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
           "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")  # fmt: skip


def phase_of(name: str) -> str | None:
    if name == FORWARD:
        return "forward"
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward"
    if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
        return "optimizer"
    return None


def breakdown(trace: Path, steps: int) -> dict[str, Any]:
    """Seconds per step of a profiled window, on the thread that ran the steps: the window, the forward (the
    `forward` label), backward (autograd's functions) and optimizer (Optimizer.step/zero_grad), each's time in
    matrix multiplies (MATMULS), and the rest (data loading, collation, gradient clipping, the loop's Python),
    split into its operators and the time with none on the thread (Python, and waiting: for the all-reduce of
    the last gradient bucket, for the peers at a collective); collectives (on gloo's or NCCL's own threads,
    overlapping the backward) beside them."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    threads = Counter(e["tid"] for e in events if phase_of(e["name"]))
    if not threads:
        return {}
    main = sorted((e for e in events if e["tid"] == threads.most_common(1)[0][0]), key=lambda e: (e["ts"], -e["dur"]))
    seconds: Counter[str] = Counter()
    stack: list[tuple[float, str | None, bool]] = []  # (end, phase, inside a matmul) of the enclosing events
    for e in main:
        while stack and stack[-1][0] <= e["ts"]:
            stack.pop()
        outer_phase = next((phase for _, phase, _ in reversed(stack) if phase), None)
        in_matmul = bool(stack) and stack[-1][2]
        phase = phase_of(e["name"])
        seconds_of = e["dur"] / 1e6
        if phase and not outer_phase:
            seconds[phase] += seconds_of
        elif not stack:  # an operator of the loop's own, outside the three phases
            seconds["rest_operators"] += seconds_of
        is_matmul = e["name"] in MATMULS
        if is_matmul and not in_matmul:
            seconds[f"{outer_phase or phase or 'rest'}_matmul"] += seconds_of
        stack.append((e["ts"] + e["dur"], phase or outer_phase, in_matmul or is_matmul))
    window = (max(e["ts"] + e["dur"] for e in main) - main[0]["ts"]) / 1e6
    collective = sum(e["dur"] for e in events if e["name"].startswith(("gloo:", "nccl:"))) / 1e6
    per_step = {"window": window, **seconds, "collectives": collective}
    per_step["rest"] = window - sum(seconds[p] for p in ("forward", "backward", "optimizer"))
    per_step["rest_idle"] = per_step["rest"] - seconds["rest_operators"]
    return {key: value / steps for key, value in per_step.items()}


def format_breakdown(parts: dict[str, Any]) -> str:
    if not parts:
        return "no forward, backward or optimizer events found"
    text = [f"step {parts['window']:.3f}"]
    for phase in ("forward", "backward", "optimizer"):
        text.append(f"{phase} {parts.get(phase, 0.0):.3f} (matmul {parts.get(phase + '_matmul', 0.0):.3f})")
    text.append(
        f"rest {parts['rest']:.3f} (operators {parts.get('rest_operators', 0.0):.3f}, none on the thread "
        f"{parts['rest_idle']:.3f}); collectives on their own threads {parts['collectives']:.3f}"
    )
    return ", ".join(text)
