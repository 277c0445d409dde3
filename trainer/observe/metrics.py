"""The metrics processor: owns the records of a run (metrics.jsonl on rank 0), the progress bar and the trackers.

The step hands it each step's result; it sums them in a window on the device and reads them on the host only when
a train record is due (one all-reduce for the window's totals, one gather for the per-rank times and memory).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer.config import run_files
from distrain.trainer.observe.accounting import HeldBytes, flops_per_token, max_memory_bytes
from distrain.trainer.observe.loggers import Loggers
from distrain.trainer.observe.reporting import (
    MetricsWriter,
    RunProgress,
    console,
    format_record,
    read_metrics,
    summary_table,
)
from distrain.trainer.parallel.apply import unwrap
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.train.state import TrainState
from distrain.trainer.train.step import StepResult

log = logging.getLogger(__name__)


class MetricsProcessor:
    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, model: torch.nn.Module, peak_flops: float,
                 state: TrainState, total_steps: int):  # fmt: skip
        self.cfg, self.run_dir, self.env, self.model, self.peak_flops = cfg, run_dir, env, model, peak_flops
        self.state, self.total_steps = state, total_steps
        self.path = run_dir / run_files.METRICS
        self.writer = MetricsWriter(self.path, env.is_main)
        self.progress: RunProgress | None = None
        self.loggers: Loggers | None = None
        self._reset_window()

    def start(self) -> None:
        """Open the progress bar and the trackers where the run really starts (after a resume)."""
        self.progress = RunProgress(self.env.is_main, total=self.total_steps, completed=self.state.step)
        self.loggers = Loggers(self.cfg, self.run_dir, self.env.is_main, start_step=self.state.step)

    # --- records ---------------------------------------------------------------------------------------------
    def report(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        self.loggers.log(record)
        self.progress.record(record)
        if self.env.is_main:
            log.info("%s %s", record["kind"], format_record(record))

    def say(self, message: str) -> None:
        """Rank 0's console line (above the progress bar)."""
        self.progress.print(message)

    def add_step(self, result: StepResult, seconds: float, data_seconds: float, profiled: bool) -> None:
        w = self.window
        w["tokens"] += result.tokens
        w["slots"] += result.slots
        w["samples"] += result.samples
        w["seconds"] += seconds
        w["data_seconds"] += data_seconds
        w["steps"] += 1
        w["profiled"] |= profiled
        if result.comm_bytes is not None:
            w["comm_bytes"] = (w["comm_bytes"] or 0) + result.comm_bytes
        if result.applied:
            w["loss_sum"] += result.loss_sum
            w["targets"] += result.global_targets
            w["grad_norm"], w["lr"] = result.grad_norm, result.lr
            if result.distill is not None:
                w["distill"] = result.distill if w["distill"] is None else w["distill"] + result.distill
        else:
            w["skipped"] += 1
        self.progress.step(self.state.step)

    def log_train(self, epoch: float, samples_by_source: dict[str, int] | None) -> dict[str, Any]:
        """The train record of the window since the last one (every rank takes part: it reduces)."""
        w, s = self.window, self.state
        counts = [w["tokens"], w["samples"], w["slots"]]
        distill = [] if w["distill"] is None else list(w["distill"].unbind())  # hard, soft, teacher right, hidden
        totals = torch.stack([w["loss_sum"], *(torch.tensor(float(c)) for c in counts), *distill])
        totals = self.env.all_reduce_sum(totals.to(self.env.device).double(), data_parallel=True).tolist()
        grad_norm = w["grad_norm"]
        seconds = max(w["seconds"], 1e-9)
        memory = self.env.all_gather_ints(max_memory_bytes(self.env.device))
        per_rank = self.env.all_gather_floats([w["seconds"] / w["steps"], w["data_seconds"] / w["steps"]])
        seq_len = totals[1] / max(totals[2], 1.0)
        model_flops = flops_per_token(unwrap(self.model), seq_len) * totals[1] / seconds
        s.real_tokens += totals[1]
        s.step_seconds += w["seconds"]
        s.data_seconds += w["data_seconds"]
        record = {
            "kind": "train",
            "step": s.step,
            "epoch": epoch,
            "loss": totals[0] / float(w["targets"]) if w["targets"] > 0 else None,  # None: every step skipped
            "lr": w["lr"],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "skipped_steps": w["skipped"],
            "seconds": seconds,  # this rank's (rank 0 writes the record): the denominator of the rates below
            "tokens_per_s": totals[1] / seconds,
            "samples_per_s": totals[2] / seconds,
            "padding": 1.0 - totals[1] / max(totals[3], 1.0),  # fraction of processed positions that are padding
            "mfu": model_flops / (self.peak_flops * self.env.world_size),
            "max_memory_bytes": memory,  # per rank: peak RSS on CPU, peak allocated memory on CUDA
            # seconds per step over the window: the slowest and fastest rank (a straggler), and the longest wait
            # for data of any rank (a data-bound run)
            "step_time_max": max(r[0] for r in per_rank),
            "step_time_min": min(r[0] for r in per_rank),
            "data_wait_max": max(r[1] for r in per_rank),
        }
        if distill:  # train/distill.py: loss = (1 - alpha) * hard_loss + alpha * T^2 * soft_loss, per target
            hard, soft, right, hidden = totals[4:]
            targets = max(float(w["targets"]), 1.0)
            record.update(hard_loss=hard / targets, soft_loss=soft / targets, teacher_agreement=right / targets)
            if self.cfg.distill.hidden_weight:  # ... + hidden_weight * hidden_loss
                record["hidden_loss"] = hidden / targets
        if samples_by_source is not None:
            record["samples_by_source"] = samples_by_source
        if w["comm_bytes"] is not None:  # ddp, fsdp: rank 0's gradient reduction payload per step (parallel/comm.py)
            record["comm_bytes_per_step"] = w["comm_bytes"] / w["steps"]
        if w["profiled"]:
            record["profiled"] = True  # the profiler slowed these steps: their throughput is not comparable
        self.report(record)
        self._reset_window()
        return record

    def report_memory(self, held: HeldBytes, parameter_counts: dict[str, int]) -> None:
        """Once, after the first optimizer step: what each rank holds (compare with `distrain plan`)."""
        per_rank = {f"{key}_bytes": self.env.all_gather_ints(getattr(held, key))
                    for key in ("params", "grads", "optimizer")}  # fmt: skip
        self.report({"kind": "memory", "step": self.state.step, **per_rank, **parameter_counts})

    def step_times(self) -> dict[str, float]:
        """For the summary: seconds per step of the slowest and fastest rank, and the longest wait for data."""
        s = self.state
        per_rank = self.env.all_gather_floats([s.step_seconds, s.data_seconds])
        steps = s.steps_this_invocation
        if steps == 0:
            return {}
        times = [r[0] / steps for r in per_rank]
        return {"step_time_max": max(times), "step_time_min": min(times),
                "data_wait_max": max(r[1] for r in per_rank) / steps}  # fmt: skip

    def dev_record(self, step: int) -> dict[str, Any] | None:
        """The dev eval record of `step` in metrics.jsonl (also from before a resume), or None."""
        found = None
        for record in read_metrics(self.path):
            if record.get("kind") == "eval" and record.get("split") == "dev" and record.get("step") == step:
                found = {k: v for k, v in record.items() if k not in ("kind", "split")}
        return found

    # --- the end ---------------------------------------------------------------------------------------------
    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()

    def print_summary(self, summary: dict[str, Any]) -> None:
        if self.env.is_main:
            console.print(summary_table(summary))

    def close(self, result: dict[str, Any] | None) -> None:
        """Close the trackers with the run's result (None: the run failed)."""
        if self.loggers is not None:
            self.loggers.close(result)

    def _reset_window(self) -> None:
        self.window: dict[str, Any] = {
            "loss_sum": torch.zeros((), device=self.env.device),
            "targets": torch.zeros((), device=self.env.device),
            "tokens": 0,
            "slots": 0,  # token positions processed, padding included
            "samples": 0,
            "skipped": 0,  # steps not applied: non-finite loss or gradient norm
            "seconds": 0.0,  # this rank's, data loading included
            "data_seconds": 0.0,  # of which waiting for the next batch
            "steps": 0,
            "profiled": False,
            "comm_bytes": None,
            "grad_norm": None,
            "lr": None,
            "distill": None,  # distillation: [hard loss sum, soft loss sum, targets the teacher gets right, hidden]
        }
