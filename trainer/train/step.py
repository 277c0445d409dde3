"""One optimizer step over `grad_accum_steps` micro-batches: forward, backward, clip, optimizer and schedule, and
the guard that skips a step whose loss or gradient norm is not finite.

The loss of a step is the sum of per-target losses over the whole global batch divided by the global number of
targets (all-reduced once per step), so 1 process and N processes, with or without accumulation, compute the same
loss and the same gradients. Scalars stay on the device: the metrics processor reads them when it logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from distrain.trainer.data.packing import examples_in
from distrain.trainer.model.forward import forward_logits_and_hidden, to_device
from distrain.trainer.observe.accounting import HeldBytes, held_bytes
from distrain.trainer.observe.profiling import FORWARD
from distrain.trainer.observe.watchdog import mark
from distrain.trainer.parallel.comm import GradientComm
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.parallel.grads import clip_grad_norm, no_sync
from distrain.trainer.parallel.precision import autocast_precision, grad_scaler
from distrain.trainer.tasks import Task
from distrain.trainer.train.distill import Distiller
from distrain.trainer.train.prune import NeuronPruner, Pruner

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed over this rank's targets
    global_targets: torch.Tensor  # targets of the whole global batch
    grad_norm: torch.Tensor
    lr: float
    applied: bool  # False: skipped for a non-finite loss or gradient norm
    tokens: int  # this rank's non-padding tokens
    slots: int  # this rank's token positions, padding included
    samples: int
    held: HeldBytes | None = None  # after the first applied step: what this rank holds
    # distillation: this rank's [hard loss sum, soft loss sum, targets the teacher gets right, hidden loss sum]
    distill: torch.Tensor | None = None
    comm_bytes: int | None = None  # ddp, fsdp: bytes this rank put into gradient reductions (trainer/parallel/comm.py)


class StepRunner:
    def __init__(self, cfg: DictConfig, env: DistEnv, task: Task, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 say: Callable[[str], None], comm: GradientComm | None = None, distiller: Distiller | None = None,
                 pruner: Pruner | NeuronPruner | None = None):  # fmt: skip
        self.env, self.task, self.model, self.distiller, self.pruner = env, task, model, distiller, pruner
        self.comm = comm
        self.optimizer, self.scheduler = optimizer, scheduler
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = cfg.optim.max_grad_norm
        self.max_nonfinite = cfg.train.max_nonfinite_steps
        self.precision = autocast_precision(env.dims, cfg.precision.name)  # what autocast runs at
        self.scaler = grad_scaler(cfg.precision.name, env.device)
        self.say = say  # rank 0's console (the progress bar's)
        self.nonfinite_in_a_row = 0  # steps skipped since the last good one
        self.divergence: str | None = None  # set by the step that makes the run diverge
        self.measured_memory = False

    def run(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepResult:
        """Optimizer step number `step` (1-based) over this rank's micro-batches."""
        local_targets = sum(self.task.num_targets(mb) for mb in micro_batches)
        targets = torch.tensor(float(local_targets), device=self.env.device)
        global_targets = self.env.all_reduce_sum(targets, data_parallel=True)
        # DDP and FSDP average gradients over the data-parallel ranks; multiplying by their number turns that
        # into a sum, so the gradient is that of (sum of losses over the global batch) / (global targets).
        scale = self.env.dp_size / global_targets.clamp(min=1)
        loss_sum = torch.zeros((), device=self.env.device)
        distill_sums = torch.zeros(4, device=self.env.device) if self.distiller else None
        for i, cpu_batch in enumerate(micro_batches):
            batch = to_device(cpu_batch, self.env.device)
            with no_sync(self.model, sync=i == len(micro_batches) - 1):
                mark("forward")
                with torch.profiler.record_function(FORWARD):  # the profiler's phases (observe/profiling.py)
                    wants_hidden = bool(self.distiller and self.distiller.hidden_weight)
                    logits, hidden = forward_logits_and_hidden(self.model, self.task, batch, self.precision,
                                                               self.env.device, wants_hidden)  # fmt: skip
                    micro_loss = self.task.loss_sum(logits, batch)
                if self.distiller:  # the objective mixes in the teacher's soft targets (train/distill.py)
                    micro_loss, parts = self.distiller.objective(logits, batch, micro_loss, hidden)
                    distill_sums += parts
                mark("backward")
                # 0 * loss is 0, or NaN when this rank's loss is not finite: then its gradients are NaN, and so are
                # the reduced gradients and the gradient norm on every rank (see _nonfinite). Exact otherwise.
                poisoned = scale + 0.0 * micro_loss.detach()
                self.scaler.scale(micro_loss * poisoned).backward()
            loss_sum += micro_loss.detach()
        if self.comm:  # ddp: the word embedding's touched rows, which DDP's buckets leave out (parallel/comm.py)
            self.comm.reduce_embedding_rows()
        mark("optimizer")
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.parameters, self.max_grad_norm, self.comm.rows if self.comm else None)
        result = StepResult(
            loss_sum=loss_sum, global_targets=global_targets, grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"], applied=False,
            tokens=sum(int(mb["attention_mask"].sum()) for mb in micro_batches),
            slots=sum(mb["attention_mask"].numel() for mb in micro_batches),
            samples=sum(examples_in(mb) for mb in micro_batches), distill=distill_sums,
        )  # fmt: skip
        if self._nonfinite(loss_sum, grad_norm, step):
            self.scaler.update()  # fp16: closes this step's unscale_ (and lowers the scale); a no-op otherwise
            self.optimizer.zero_grad(set_to_none=True)
            return result
        if not self.measured_memory:
            grad_bytes = held_bytes(self.model, self.optimizer).grads  # gradients exist between backward and zero_grad
        loss_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        if self.pruner:
            self.pruner.before_step(step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if loss_scale is not None and self.scaler.get_scale() < loss_scale:
            # fp16 overflow: the scaler skipped the optimizer step, so the schedule waits too.
            log.info("step %d skipped by the fp16 loss scaler (overflow); scale now %g", step, loss_scale / 2)
        else:
            self.scheduler.step()
            if self.pruner:  # the masks of this step, re-applied after the update (train/prune.py)
                self.pruner.apply(step)
        if not self.measured_memory:  # the optimizer state exists from the first step on
            result.held = held_bytes(self.model, self.optimizer)
            result.held.grads = grad_bytes
            self.measured_memory = True
        self.optimizer.zero_grad(set_to_none=True)
        result.applied = True
        return result

    def _nonfinite(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, step: int) -> bool:
        """Whether this step must not be applied: its loss (on any rank) or gradient norm is not finite. After
        train.max_nonfinite_steps such steps in a row, self.divergence says why the run stops.

        The decision is the same on every rank without a collective of its own: a rank whose loss is not finite
        made its gradients NaN (run), and the gradient norm is global: computed from the all-reduced gradients
        (DDP), or from every shard's squares (FSDP, TP); TP peers compute the same loss. Under fp16 an infinite
        gradient is the loss scaler's business (it skips the step and lowers the scale), so there only the loss
        counts, and ranks exchange a flag."""
        if self.scaler.is_enabled():
            bad = self.env.any(not bool(torch.isfinite(loss_sum)))
        else:
            bad = not bool(torch.isfinite(grad_norm))
        if not bad:
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_in_a_row += 1
        limit = self.max_nonfinite
        loss = float(self.env.all_reduce_sum(loss_sum.detach().clone(), data_parallel=True))
        what = f"loss {loss:.4g}, gradient norm {float(grad_norm):.4g}"
        log.warning(
            "step %d skipped: %s (%d non-finite steps in a row)",
            step,
            what,
            self.nonfinite_in_a_row,
            extra={"file_only": True},
        )  # fmt: skip (the console gets it from say)
        self.say(f"step {step} skipped: {what} is not finite ({self.nonfinite_in_a_row} in a row)")
        if self.nonfinite_in_a_row >= limit:  # fit() logs this step's record like the skipped ones', then stops
            self.divergence = (
                f"training diverged at step {step}: {what}; {limit} steps in a row were not finite "
                f"(train.max_nonfinite_steps={limit}) and none was applied: the weights, and every checkpoint "
                f"since, are those of step {step - self.nonfinite_in_a_row}. No export was written. Lower optim.lr "
                "or set optim.max_grad_norm, then rerun"
            )
        return True
