"""The one training loop every task and strategy shares.

`fit()` owns the schedule (epochs, evaluation, checkpoints, early stopping, export); `train_step()` runs one
optimizer step over `grad_accum_steps` micro-batches. The loss of a step is the sum of per-target losses over the
whole global batch divided by the global number of targets (all-reduced once per step), so 1 process and N
processes, with or without accumulation, compute the same loss and the same gradients. Scalars are read on the
host only when logging.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer import adapters
from distrain.trainer.accounting import flops_per_token, held_bytes, max_memory_bytes
from distrain.trainer.checkpoint import Checkpointer, full_model_state, load_model_weights, read_trainer_state
from distrain.trainer.data.loaders import train_loader
from distrain.trainer.data.mixture import SOURCE_COLUMN, SourceCounts
from distrain.trainer.data.sampler import GlobalBatchSampler
from distrain.trainer.data.streaming import TrainStream
from distrain.trainer.distributed import DistEnv
from distrain.trainer.errors import Diverged, UserError
from distrain.trainer.forward import forward_logits, predict_split, to_device
from distrain.trainer.inference import HEAD_FILE
from distrain.trainer.loggers import Loggers
from distrain.trainer.model_card import model_card
from distrain.trainer.optim import build_scheduler
from distrain.trainer.parallel import autocast_precision, clip_grad_norm, no_sync, unwrap
from distrain.trainer.precision import grad_scaler
from distrain.trainer.preemption import StopRequest
from distrain.trainer.profiling import StepProfiler
from distrain.trainer.reporting import MetricsWriter, RunProgress, console, format_record, read_metrics, summary_table
from distrain.trainer.schema import ExportWeights
from distrain.trainer.tasks import Task, TaskData
from distrain.trainer.watchdog import mark

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        env: DistEnv,
        task: Task,
        data: TaskData,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        peak_flops: float,
        stop_request: StopRequest,
        adapter: adapters.AdapterRun | None = None,
    ):
        self.cfg, self.run_dir, self.env, self.task, self.data = cfg, run_dir, env, task, data
        self.model, self.optimizer = model, optimizer
        self.dims = env.dims  # the layout (strategy and degrees), as the launcher checked it
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.adapter = adapter  # adapter=lora: the frozen base's record, and a builder for the export
        self.parameter_counts = adapters.parameter_counts(model)
        self.compute_precision = autocast_precision(self.dims, cfg.precision.name)  # what autocast runs at
        self.peak_flops = peak_flops  # per process
        self.stop_request = stop_request
        t = cfg.train
        self.collate = task.collator(train=True)
        self.stream: TrainStream | None = None  # data.streaming: the training stream, its position in data_state
        self.data_state: dict[str, Any] | None = None
        self.source_counts: SourceCounts | None = None  # map mode with data.mixture
        if cfg.data.streaming:
            self.stream = TrainStream(task, t.micro_batch_size, t.grad_accum_steps, env.dp_rank, env.dp_size,
                                      self.collate)  # fmt: skip
            self.data_state = self.stream.state
            self.steps_per_epoch = None  # unsized: epochs are counted when the stream wraps
        else:
            self.sampler = GlobalBatchSampler(
                data.splits["train"]["length"],
                micro_batch_size=t.micro_batch_size,
                grad_accum_steps=t.grad_accum_steps,
                dp_rank=env.dp_rank,
                dp_size=env.dp_size,
                seed=t.seed,
                group_by_length=cfg.data.group_by_length,
            )
            self.loader = train_loader(
                data.splits["train"], self.collate, list(task.loader_columns), self.sampler, cfg.data.num_workers
            )
            self.steps_per_epoch = self.sampler.steps_per_epoch
            if cfg.data.mixture:
                names = [source.name for source in cfg.data.mixture]
                self.source_counts = SourceCounts(names, data.splits["train"][SOURCE_COLUMN], self.sampler)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps)
        self.scaler = grad_scaler(cfg.precision.name, env.device)
        self.checkpointer = Checkpointer(run_dir, env, t.keep_last)
        self.metrics = MetricsWriter(run_dir / "metrics.jsonl", env.is_main)
        self.step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.nonfinite_in_a_row = 0  # steps skipped for a non-finite loss or gradient norm, since the last good one
        self.divergence: str | None = None  # set by the step that makes the run diverge
        self.held = None  # bytes of parameters, gradients and optimizer state on this rank
        self.real_tokens = 0.0  # all data shards, this invocation (for the summary's throughput)
        self.step_seconds = 0.0
        self.data_seconds = 0.0  # this rank's wait for its batches, this invocation
        self.profiler = StepProfiler(t.profile_steps, run_dir, env.rank)
        self._reset_window()

    # --- one optimizer step --------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        local_targets = sum(self.task.num_targets(mb) for mb in micro_batches)
        targets = torch.tensor(float(local_targets), device=self.env.device)
        global_targets = self.env.all_reduce_sum(targets, data_parallel=True)
        # DDP and FSDP average gradients over the data-parallel ranks; multiplying by their number turns that
        # into a sum, so the gradient is that of (sum of losses over the global batch) / (global targets).
        scale = self.env.dp_size / global_targets.clamp(min=1)
        step_loss = torch.zeros((), device=self.env.device)
        for i, cpu_batch in enumerate(micro_batches):
            batch = to_device(cpu_batch, self.env.device)
            with no_sync(self.model, sync=i == len(micro_batches) - 1):
                mark("forward")
                logits = forward_logits(self.model, self.task, batch, self.compute_precision, self.env.device)
                loss_sum = self.task.loss_sum(logits, batch)
                mark("backward")
                # 0 * loss is 0, or NaN when this rank's loss is not finite: then its gradients are NaN, and so are
                # the reduced gradients and the gradient norm on every rank (see _nonfinite). Exact otherwise.
                poisoned = scale + 0.0 * loss_sum.detach()
                self.scaler.scale(loss_sum * poisoned).backward()
            step_loss += loss_sum.detach()
        mark("optimizer")
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.parameters, self.cfg.optim.max_grad_norm)
        w = self.window
        w["tokens"] += sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
        w["slots"] += sum(mb["attention_mask"].numel() for mb in micro_batches)
        w["samples"] += sum(len(mb["attention_mask"]) for mb in micro_batches)
        if self._nonfinite(step_loss, grad_norm):
            self.scaler.update()  # fp16: closes this step's unscale_ (and lowers the scale); a no-op otherwise
            self.optimizer.zero_grad(set_to_none=True)
            w["skipped"] += 1
            return
        first = self.held is None
        if first:
            grad_bytes = held_bytes(self.model, self.optimizer).grads  # gradients exist between backward and zero_grad
        lr = self.optimizer.param_groups[0]["lr"]
        loss_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if loss_scale is not None and self.scaler.get_scale() < loss_scale:
            # fp16 overflow: the scaler skipped the optimizer step, so the schedule waits too.
            log.info("step %d skipped by the fp16 loss scaler (overflow); scale now %g", self.step + 1, loss_scale / 2)
        else:
            self.scheduler.step()
        if first:  # the optimizer state exists from the first step on
            self.held = held_bytes(self.model, self.optimizer)
            self.held.grads = grad_bytes
            self._report_memory()
        self.optimizer.zero_grad(set_to_none=True)

        w["loss_sum"] += step_loss
        w["targets"] += global_targets
        w["grad_norm"], w["lr"] = grad_norm, lr

    def _nonfinite(self, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step must not be applied: its loss (on any rank) or gradient norm is not finite. After
        train.max_nonfinite_steps such steps in a row, self.divergence says why the run stops.

        The decision is the same on every rank without a collective of its own: a rank whose loss is not finite
        made its gradients NaN (train_step), and the gradient norm is global: computed from the all-reduced
        gradients (DDP), or from every shard's squares (FSDP, TP); TP peers compute the same loss. Under fp16 an
        infinite gradient is the loss scaler's business (it skips the step and lowers the scale), so there only
        the loss counts, and ranks exchange a flag."""
        if self.scaler.is_enabled():
            bad = self.env.any(not bool(torch.isfinite(step_loss)))
        else:
            bad = not bool(torch.isfinite(grad_norm))
        if not bad:
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_in_a_row += 1
        step, limit = self.step + 1, self.cfg.train.max_nonfinite_steps
        loss = float(self.env.all_reduce_sum(step_loss.detach().clone(), data_parallel=True))
        what = f"loss {loss:.4g}, gradient norm {float(grad_norm):.4g}"
        log.warning(
            "step %d skipped: %s (%d non-finite steps in a row)",
            step,
            what,
            self.nonfinite_in_a_row,
            extra={"file_only": True},
        )  # fmt: skip (the console got it from progress.print)
        self.progress.print(f"step {step} skipped: {what} is not finite ({self.nonfinite_in_a_row} in a row)")
        if self.nonfinite_in_a_row >= limit:  # fit() logs this step's record like the skipped ones', then stops
            self.divergence = (
                f"training diverged at step {step}: {what}; {limit} steps in a row were not finite "
                f"(train.max_nonfinite_steps={limit}) and none was applied: the weights, and every checkpoint "
                f"since, are those of step {step - self.nonfinite_in_a_row}. No export was written. Lower optim.lr "
                "or set optim.max_grad_norm, then rerun"
            )
        return True

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
            "grad_norm": None,
            "lr": None,
        }

    def _log_train(self) -> dict[str, Any]:
        w = self.window
        counts = [w["tokens"], w["samples"], w["slots"]]
        totals = torch.stack([w["loss_sum"], *(torch.tensor(float(c)) for c in counts)])
        totals = self.env.all_reduce_sum(totals.to(self.env.device).double(), data_parallel=True).tolist()
        grad_norm = w["grad_norm"]
        seconds = max(w["seconds"], 1e-9)
        memory = self.env.all_gather_ints(max_memory_bytes(self.env.device))
        per_rank = self.env.all_gather_floats([w["seconds"] / w["steps"], w["data_seconds"] / w["steps"]])
        seq_len = totals[1] / max(totals[2], 1.0)
        model_flops = flops_per_token(unwrap(self.model), seq_len) * totals[1] / seconds
        self.real_tokens += totals[1]
        self.step_seconds += w["seconds"]
        self.data_seconds += w["data_seconds"]
        record = {
            "kind": "train",
            "step": self.step,
            "epoch": self.epoch(),
            "loss": totals[0] / float(w["targets"]) if w["targets"] > 0 else None,  # None: every step skipped
            "lr": w["lr"],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "skipped_steps": w["skipped"],
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
        if self.stream is not None:  # the samples each source gave so far (the same global stream on every rank)
            record["samples_by_source"] = self.stream.counts(self.data_state)
        elif self.source_counts is not None:  # the same, from the global batches of map mode
            record["samples_by_source"] = self.source_counts.at(self.step)
        if w["profiled"]:
            record["profiled"] = True  # the profiler slowed these steps: their throughput is not comparable
        self._report(record)
        self._reset_window()
        return record

    def _report_memory(self) -> None:
        """Once, after the first optimizer step: what each rank holds (compare with `distrain plan`)."""
        held = {key: self.env.all_gather_ints(getattr(self.held, key)) for key in ("params", "grads", "optimizer")}
        held_bytes = {f"{k}_bytes": v for k, v in held.items()}
        self._report({"kind": "memory", "step": self.step + 1, **held_bytes, **self.parameter_counts})

    def _report(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        self.loggers.log(record)
        self.progress.record(record)
        if self.env.is_main:
            log.info("%s %s", record["kind"], format_record(record))

    # --- evaluation ----------------------------------------------------------------------------------------
    def evaluate_split(self, split: str) -> dict[str, float]:
        mark("eval")
        dataset = self.data.splits[split]
        batch_size = self.cfg.train.eval_batch_size or 2 * self.cfg.train.micro_batch_size
        # DDP: the bare module (shards may differ by a batch; DDP's forward could wait on a collective).
        # FSDP/TP: the sharded model itself, with the same number of batches on every rank.
        merged = predict_split(unwrap(self.model), self.task, dataset, batch_size, self.env, self.compute_precision)
        metrics = self.task.metrics(merged, dataset) if merged is not None else None
        metrics = self.env.broadcast_object(metrics)
        self._report({"kind": "eval", "split": split, "step": self.step, **metrics})
        return metrics

    # --- state ---------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch(),
            "total_steps": self.total_steps,
            "metric": self.cfg.task.metric,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "world_size": self.env.world_size,
            "strategy": self.dims.strategy.value,
            "dp": self.dims.dp,
            "tp": self.dims.tp,
            **({"base_model": self.adapter.base} if self.adapter else {}),
            **({"data": self.data_state} if self.stream is not None else {}),
        }

    def epoch(self) -> float:
        """Epochs done: fractional in map mode; completed passes when streaming."""
        if self.stream is not None:
            return self.stream.epoch(self.data_state)
        return self.step / self.steps_per_epoch

    def save(self) -> Path:
        mark("checkpoint")
        self._check_weights_finite("checkpoint")
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.trainer_state())

    def resume(self) -> None:
        latest = self.checkpointer.latest_good(report=self._warn)
        if latest is None:
            return
        if self.adapter:  # the adapters are only right on the base they were trained on
            adapters.check_base(read_trainer_state(latest).get("base_model"), self.adapter.base, f"checkpoint {latest}")
        state = self.checkpointer.load(latest, self.model, self.optimizer)
        self.step = state["step"]
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.stream is not None:
            if "data" not in state:
                raise UserError(f"{latest} holds no stream position: it was written by a run without data.streaming")
            self.stream.load_state_dict(state["data"])
            self.data_state = state["data"]
        if self.env.is_main:
            message = f"resumed from {latest} at step {self.step}"
            log.info(message)
            console.print(message, markup=False, highlight=False, soft_wrap=True)

    def _warn(self, message: str) -> None:
        """Rank 0: something the user must know (console and log)."""
        log.warning(message, extra={"file_only": True})
        console.print(f"[yellow]{message}", highlight=False, soft_wrap=True)

    # --- the schedule --------------------------------------------------------------------------------------
    def _step_batches(self):
        """Micro-batches of each step from the current position on, epoch after epoch."""
        if self.stream is not None:
            for item in self.stream.loader(self.cfg.data.num_workers):
                self.data_state = item["state"]  # the position after this step: what its checkpoint stores
                yield item["micro_batches"]
            return
        while True:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start)
            if hasattr(self.collate, "set_epoch"):  # e.g. MLM masking draws per epoch
                self.collate.set_epoch(epoch)
            batches = iter(self.loader)
            for _ in range(start, self.steps_per_epoch):
                yield [next(batches) for _ in range(self.cfg.train.grad_accum_steps)]

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        self.resume()
        first_step = self.step
        stop_at = min(t.stop_at_step or self.total_steps, self.total_steps)
        self.progress = RunProgress(self.env.is_main, total=self.total_steps, completed=self.step)
        self.loggers = Loggers(self.cfg, self.run_dir, self.env.is_main, start_step=self.step)
        if self.step > 0:
            self._report({"kind": "resume", "step": self.step})  # report plots mark it
        started = time.perf_counter()
        stopped_early = preempted = False
        diverged: Diverged | None = None
        steps = self._step_batches()
        if t.eval_at_start and self.step == 0:
            self.evaluate_split("dev")  # the baseline, recorded at step 0; not a candidate for the best checkpoint
        try:
            while self.step < stop_at:
                self.profiler.before_step(self.step + 1)
                tick = time.perf_counter()
                mark("data", self.step + 1)
                batches = next(steps)
                self.window["data_seconds"] += time.perf_counter() - tick
                self.train_step(batches)
                self.step += 1
                self.window["seconds"] += time.perf_counter() - tick
                self.window["steps"] += 1
                self.window["profiled"] |= self.profiler.active
                self.profiler.after_step(self.step)
                self.progress.step(self.step)
                if self.divergence:  # every rank alike: the gradient norm is global
                    self._log_train()
                    raise Diverged(self.divergence)
                last = self.step == self.total_steps
                # A stop request on any rank (signal or STOP file) stops every rank after this same step.
                preempted = not last and self.env.any(self.stop_request.requested())
                if self._due(t.log_every) or last or self.step == stop_at or preempted:
                    self._log_train()
                epoch_end = self.stream is None and self.step % self.steps_per_epoch == 0
                improved = False
                due_eval = self._due(t.eval_every) or (t.eval_every == 0 and epoch_end) or last
                if due_eval and not preempted:  # when preempted, time is short: checkpoint first
                    improved, stopped_early = self._after_eval(self.evaluate_split("dev"))
                ends = last or stopped_early or preempted or self.step == stop_at
                if self._due(t.save_every) or improved or ends:
                    self.save()
                if stopped_early or preempted:
                    if preempted:
                        self.progress.print(f"stop requested: checkpoint written at step {self.step}")
                    break
        except Diverged as error:
            diverged = error  # reported in the summary; the worker exits with it
        except BaseException:
            self.loggers.close(None)
            raise
        finally:
            self.progress.close()
            self.metrics.close()
        finished = self.step >= self.total_steps or stopped_early
        status = "early stopped" if stopped_early else "finished" if finished else f"stopped at step {self.step}"
        if preempted:
            status = f"preempted at step {self.step}"
        if diverged:
            status = "diverged"
        trained = self.step > first_step or not (self.run_dir / "export").is_dir()
        export = self.export() if finished and not diverged and trained else None
        summary = {
            "status": status,
            "steps": f"{self.step} / {self.total_steps}",
            "epochs": round(self.epoch(), 2),
            f"best dev {self.cfg.task.metric}": self.best_metric,
            "best step": self.best_step,
            "train time (s)": round(time.perf_counter() - started, 1),
            "real tokens/s": round(self.real_tokens / max(self.step_seconds, 1e-9), 1),
            "parameters trained": "{trainable_params:,} of {total_params:,}".format(**self.parameter_counts),
            **(step_times := self._step_times(self.step - first_step)),  # seconds per step
            "checkpoint": str(self.checkpointer.latest()),
            "export": str(export) if export else "-",
        }
        if self.env.is_main:
            self.progress.console.print(summary_table(summary))
        result = {
            "status": status,
            "step": self.step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "train_seconds": time.perf_counter() - started,  # steps, evaluations and checkpoints of this invocation
            "step_seconds": self.step_seconds,  # optimizer steps only
            "real_tokens": self.real_tokens,
            **self.parameter_counts,
            **step_times,
            **({"error": str(diverged)} if diverged else {}),
        }
        self.loggers.close(result)
        return result

    def _step_times(self, steps: int) -> dict[str, float]:
        """For the summary: seconds per step of the slowest and fastest rank, and the longest wait for data."""
        per_rank = self.env.all_gather_floats([self.step_seconds, self.data_seconds])
        if steps == 0:
            return {}
        times = [r[0] / steps for r in per_rank]
        return {"step_time_max": max(times), "step_time_min": min(times),
                "data_wait_max": max(r[1] for r in per_rank) / steps}  # fmt: skip

    def _after_eval(self, metrics: dict[str, float]) -> tuple[bool, bool]:
        """(new best?, stop now?) — the same on every rank, since the metrics were broadcast."""
        value = metrics[self.cfg.task.metric]
        improved = self.task.is_better(self.cfg.task.metric, value, than=self.best_metric)
        if improved:
            self.best_metric, self.best_step = value, self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        patience = self.cfg.train.early_stopping_patience
        stop = self.env.any(patience > 0 and self.evals_without_improvement >= patience)
        if stop:
            self.progress.print(f"early stopping: no better dev {self.cfg.task.metric} for {patience} evaluations")
        return improved, stop

    def _check_weights_finite(self, what: str) -> None:
        """A checkpoint or export of non-finite weights is never written (every rank checks its shards)."""
        local = (p.to_local() if hasattr(p, "to_local") else p for p in unwrap(self.model).parameters())
        if self.env.any(not all(bool(torch.isfinite(t).all()) for t in local)):
            raise Diverged(f"the weights after step {self.step} are not finite: no {what} written")

    def _export_adapter(self, folder: Path, state: dict[str, torch.Tensor]) -> None:
        """Rank 0: the adapter folder (peft), and the merged model beside it when adapter.merge_on_export; both
        loadable without distrain (the adapter's with its tokenizer and config, onto the recorded base)."""
        plain = self.adapter.rebuild()
        adapters.load_full_state(plain, state)
        target = folder / adapters.ADAPTER_DIR if self.cfg.adapter.merge_on_export else folder
        adapters.save_adapter(plain, target, self.adapter.base)
        shutil.copy(self.run_dir / HEAD_FILE, target)  # a new task head's labels (ner, classify)
        if target != folder:
            self.task.tokenizer.save_pretrained(target)
            shutil.copy(self.run_dir / "config.yaml", target / "distrain_config.yaml")
            adapters.merged(plain).save_pretrained(folder)

    def export(self) -> Path:
        """A plain Hugging Face folder (weights, tokenizer, label names) that transformers.pipeline loads."""
        model = unwrap(self.model)
        exported_step = self.step
        if self.cfg.train.export_weights == ExportWeights.best and self.best_step not in (None, self.step):
            load_model_weights(self.checkpointer.root / f"step_{self.best_step}", model)
            exported_step = self.best_step
        self._check_weights_finite("export")
        state = full_model_state(self.model)
        target = self.run_dir / "export"
        if self.env.is_main:
            partial = self.run_dir / "export.partial"
            shutil.rmtree(partial, ignore_errors=True)
            if self.adapter:
                self._export_adapter(partial, state)
            else:
                model.save_pretrained(partial, state_dict=state)
            self.task.tokenizer.save_pretrained(partial)
            shutil.copy(self.run_dir / "config.yaml", partial / "distrain_config.yaml")
            card = model_card(self.cfg, self.task, self._dev_metrics(exported_step))
            (partial / "README.md").write_text(card, encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        self.env.barrier()
        return target

    def _dev_metrics(self, step: int) -> dict[str, Any] | None:
        """The dev eval record of `step` in metrics.jsonl (also from before a resume), or None."""
        found = None
        for record in read_metrics(self.run_dir / "metrics.jsonl"):
            if record.get("kind") == "eval" and record.get("split") == "dev" and record.get("step") == step:
                found = {k: v for k, v in record.items() if k not in ("kind", "split")}
        return found
