"""The training loop every task and strategy shares, assembled from components (trainer/train, checkpoint,
observe, export), in the manner of torchtitan's trainer:

    BatchSource        the micro-batches of each step (map-style or streamed), its position and data order
    StepRunner         one optimizer step: forward/backward over the micro-batches, clip, step, non-finite guard
    Evaluator          dev evaluation, the best metric, early stopping
    MetricsProcessor   records (metrics.jsonl), progress bar, trackers
    CheckpointManager  where the run starts (resume, checkpoint.step, checkpoint.init_from), save, restore
    Exporter           the Hugging Face folder at the end
    cadence            pure "is it due" functions

`Trainer.fit()` is the schedule of a run and nothing else.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer.checkpoint.manager import CheckpointManager, Recorded, Wrapped
from distrain.trainer.config import run_files
from distrain.trainer.errors import ConfigError, Diverged
from distrain.trainer.export.hf import Exporter
from distrain.trainer.model import adapters
from distrain.trainer.observe.metrics import MetricsProcessor
from distrain.trainer.observe.profiling import StepProfiler
from distrain.trainer.observe.watchdog import mark
from distrain.trainer.optim.schedule import ScheduleState, build_scheduler
from distrain.trainer.parallel.comm import GradientComm
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.parallel.sync import Synchronizer
from distrain.trainer.search.trial import TrialReporter
from distrain.trainer.tasks import Task, TaskData
from distrain.trainer.train import cadence
from distrain.trainer.train.batches import BatchSource
from distrain.trainer.train.distill import Distiller
from distrain.trainer.train.evaluator import Evaluator
from distrain.trainer.train.preemption import StopRequest
from distrain.trainer.train.prune import NeuronPruner, Pruner, make_pruner
from distrain.trainer.train.state import TrainState
from distrain.trainer.train.step import StepRunner


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, env: DistEnv, task: Task, data: TaskData,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, peak_flops: float,
                 stop_request: StopRequest, adapter: adapters.AdapterRun | None = None,
                 distiller: Distiller | None = None):  # fmt: skip
        self.cfg, self.run_dir, self.env, self.task = cfg, run_dir, env, task
        self.model, self.optimizer, self.stop_request = model, optimizer, stop_request
        self.parameter_counts = adapters.parameter_counts(model)
        self.state = TrainState()
        self.batches = BatchSource(cfg, task, data, env)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.batches.steps_per_epoch
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps)
        self.metrics = MetricsProcessor(cfg, run_dir, env, model, peak_flops, self.state, self.total_steps)
        self.comm = GradientComm(model, cfg.parallel, cfg.train.seed)
        self.stepper = StepRunner(cfg, env, task, model, optimizer, self.scheduler, say=self.metrics.say,
                                  comm=self.comm, distiller=distiller, pruner=self._pruner())  # fmt: skip
        self.evaluator = Evaluator(cfg, env, task, data, model, report=self.metrics.report, say=self.metrics.say)
        self.trial = TrialReporter(cfg, env)  # a sweep's trial: dev evaluations reported to its study's pruner
        self.profiler = StepProfiler(cfg.train.profile_steps, run_dir, env.rank)
        self.sync = Synchronizer(model, optimizer, cfg.parallel, data_parallel=env.dims.ddp_enabled)
        parts = {
            "train": self.state,
            "evaluator": self.evaluator,
            "batches": self.batches,
            "scheduler": ScheduleState(self.scheduler, self.total_steps),
            "grad_scaler": Wrapped("grad_scaler", self.stepper.scaler),
            "comm": self.comm,  # PowerSGD's iteration; its error feedback and factors per rank (tensors())
            "sync": self.sync,  # local SGD / DiLoCo: each rank's own weights and optimizer state, the anchor
            "progress": Recorded(lambda: {"epoch": self.epoch, "total_steps": self.total_steps}),
        }
        self.checkpoints = CheckpointManager(cfg, run_dir, env, model, optimizer, parts, adapter)
        self.exporter = Exporter(cfg, run_dir, env, task, model, adapter)

    def _pruner(self) -> Pruner | NeuronPruner | None:
        """The pruner of prune=magnitude or structured, once the run's length is known (an epoch-based run's comes
        from the data)."""
        prune = self.cfg.prune
        if prune.name == "none":
            return None
        end = prune.end_step if prune.end_step is not None else self.total_steps
        if end > self.total_steps:
            raise ConfigError([f"prune.end_step: expected at most the run's {self.total_steps} steps, got {end}"])
        return make_pruner(self.model, prune, self.total_steps)

    @property
    def epoch(self) -> float:
        return self.batches.epoch(self.state.step)

    def fit(self) -> dict[str, Any]:
        t, s = self.cfg.train, self.state
        self.checkpoints.restore()
        stop_at = cadence.last_step(self.total_steps, t.stop_at_step)
        self.metrics.start()
        if s.step > 0:
            self.metrics.report({"kind": "resume", "step": s.step})  # report plots mark it
        started = time.perf_counter()
        stopped_early = preempted = False
        pruned: str | None = None
        diverged: Diverged | None = None
        if t.eval_at_start and s.step == 0:
            self.evaluator.evaluate("dev", 0)  # the baseline, recorded at step 0; never a best checkpoint
        try:
            if s.eval_owed:  # the stopped invocation's due evaluation, on the same weights, as it would have run
                s.eval_owed = False
                improved, stopped_early, pruned = self._evaluate(last=False, log_train=False)
                if improved or stopped_early or pruned:  # the checkpoint of this step, with the evaluator's news
                    self.checkpoints.save(s.step)
            if s.step > 0 and not (stopped_early or pruned):
                stopped_early = self.evaluator.patience_ran_out
                if stopped_early or s.step >= self.total_steps:
                    self.metrics.say(self._complete_already(stopped_early))
            steps = self.batches.batches(s.step)
            while s.step < stop_at and not (stopped_early or pruned):
                self.profiler.before_step(s.step + 1)
                tick = time.perf_counter()
                mark("data", s.step + 1)
                micro_batches = next(steps)
                waited = time.perf_counter() - tick
                result = self.stepper.run(micro_batches, s.step + 1)
                if self.comm.kind:  # ddp, fsdp: the gradients' bytes, and the weights' when a periodic sync is due
                    result.comm_bytes = self.comm.take(synced=True) + self.sync.after_step(s.step + 1)
                s.step += 1
                self.metrics.add_step(result, time.perf_counter() - tick, waited, self.profiler.active)
                self.profiler.after_step(s.step)
                if result.held is not None:
                    self.metrics.report_memory(result.held, self.parameter_counts)
                if self.stepper.divergence:  # every rank alike: the gradient norm is global
                    self.metrics.log_train(self.epoch, self.batches.samples_by_source(s.step))
                    raise Diverged(self.stepper.divergence)
                last = s.step == self.total_steps
                # A stop request on any rank (signal or STOP file) stops every rank after this same step.
                preempted = not last and self.env.any(self.stop_request.requested())
                ends = last or s.step == stop_at or preempted
                if cadence.log_due(s.step, t.log_every, ends):
                    self.metrics.log_train(self.epoch, self.batches.samples_by_source(s.step))
                improved = False
                due = cadence.eval_due(s.step, t.eval_every, self.batches.steps_per_epoch, self.total_steps)
                if due and preempted:
                    s.eval_owed = True
                elif due:
                    log_train = not cadence.log_due(s.step, t.log_every, ends)
                    improved, stopped_early, pruned = self._evaluate(last, log_train)
                # A pruned trial ends with a checkpoint, like a stop request: its run dir resumes and exports.
                if cadence.save_due(s.step, t.save_every, improved, ends or stopped_early or bool(pruned)):
                    self.checkpoints.save(s.step)
                if preempted:
                    self.metrics.say(f"stop requested: checkpoint written at step {s.step}")
                if stopped_early or preempted or pruned:
                    break
        except Diverged as error:
            diverged = error  # reported in the summary; the worker exits with it
        except BaseException:
            self.metrics.close(None)
            raise
        finally:
            self.metrics.stop_progress()
        return self._finish(started, self._status(stopped_early, preempted, diverged, pruned), diverged, pruned)

    def _complete_already(self, stopped_early: bool) -> str:
        how, more = ("early stopped", "train.early_stopping_patience (0: off)") if stopped_early else \
            (f"all {self.total_steps} steps", "train.max_steps or train.epochs")  # fmt: skip
        return f"the run was already complete at step {self.state.step} ({how}): nothing to train; to train on, " \
               f"raise {more}"  # fmt: skip

    def _evaluate(self, last: bool, log_train: bool) -> tuple[bool, bool, str | None]:
        """Dev evaluation at this step: (a new best, early stopping says stop, the study's pruner says why to stop).
        `log_train`: give the steps since the last train record theirs when the run ends here."""
        step = self.state.step
        dev = self.evaluator.evaluate("dev", step)
        improved, stopped_early = self.evaluator.judge(dev, step)
        # Every evaluation goes to the study; the last, or one that stopped early, cannot be pruned
        pruned = self.trial.prune(dev[self.cfg.task.metric], step, may_stop=not (last or stopped_early))
        if pruned:
            self.metrics.say(f"pruned: {pruned}")
        if (stopped_early or pruned) and log_train:  # their steps count in the summary
            self.metrics.log_train(self.epoch, self.batches.samples_by_source(step))
        return improved, stopped_early, pruned

    def _status(self, stopped_early: bool, preempted: bool, diverged: Diverged | None, pruned: str | None) -> str:
        step = self.state.step
        if diverged:
            return run_files.DIVERGED
        if pruned:
            return run_files.PRUNED
        if preempted:
            return run_files.preempted(step)
        if stopped_early:
            return run_files.EARLY_STOPPED
        return run_files.FINISHED if step >= self.total_steps else run_files.stopped(step)

    def _finish(self, started: float, status: str, diverged: Diverged | None, pruned: str | None) -> dict[str, Any]:
        """Export a finished run (unless this invocation trained nothing and an export exists), print the summary,
        close the trackers; return the result summary.json records."""
        s, ev = self.state, self.evaluator
        trained = s.steps_this_invocation > 0 or not (self.run_dir / run_files.EXPORT).is_dir()
        export = self._export() if run_files.is_complete(status) and trained else None
        step_times = self.metrics.step_times()  # seconds per step
        self.metrics.print_summary({
            "status": status,
            "steps": f"{s.step} / {self.total_steps}",
            "epochs": round(self.epoch, 2),
            f"best dev {self.cfg.task.metric}": ev.best_metric,
            "best step": ev.best_step,
            "train time (s)": round(time.perf_counter() - started, 1),
            "real tokens/s": round(s.real_tokens / max(s.step_seconds, 1e-9), 1),
            "parameters trained": "{trainable_params:,} of {total_params:,}".format(**self.parameter_counts),
            **step_times,
            "checkpoint": str(self.checkpoints.latest()),
            "export": str(export) if export else "-",
        })  # fmt: skip
        result = {
            "status": status,
            "step": s.step,
            "best_metric": ev.best_metric,
            "best_step": ev.best_step,
            "train_seconds": time.perf_counter() - started,  # steps, evaluations and checkpoints of this invocation
            "step_seconds": s.step_seconds,  # optimizer steps only
            "real_tokens": s.real_tokens,
            **self.parameter_counts,
            **step_times,
            **({"error": str(diverged)} if diverged else {}),
            **({"pruned": pruned} if pruned else {}),
        }
        self.metrics.close(result)
        return result

    def _export(self) -> Path:
        step = self.exporter.weights_step(self.state.step, self.evaluator.best_step)
        best = self.checkpoints.step_folder(step) if step != self.state.step else None
        return self.exporter.export(step, best, self.metrics.dev_record(step))
