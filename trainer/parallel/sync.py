"""Communication every H steps (`parallel.sync`): what happens after each optimizer step when the data-parallel
ranks do not all-reduce gradients at every step. Called by the loop after `StepRunner.run`.

- `every_step`: nothing (DDP all-reduced the gradients).
- `local_sgd`: plain DDP for `sync_warmup` steps, then each rank steps on its own gradients and every `sync_every`
  steps the weights are averaged (torch's post-local-SGD recipe: `post_localSGD_hook` on DDP, registered by
  parallel/comm.py, with `PeriodicModelAverager` here; Lin et al. 2020).
- `diloco`: each rank runs the inner optimizer (optim.*) alone; every `sync_every` steps the ranks average their
  change from the anchor weights (the weights of the last sync) and an outer SGD with Nesterov momentum applies it
  to the anchor, which every rank then continues from (Douillard et al. 2023). `comm_hook=bf16|fp16` sends that
  change in half precision (half the bytes; Streaming DiLoCo, Douillard et al. 2025, sends it in fewer bits still):
  it is the difference of two nearby weights, small, and the anchor and the outer step stay fp32.

Between syncs every rank has its own weights and optimizer state, which a DDP checkpoint (one replica) does not
hold: they go into the checkpoint per rank (`tensors()`), with the anchor and the outer optimizer's momentum, so a
stop/resume in the same world size continues exactly. The averager's step and PowerSGD-like iteration counters
are in trainer_state.json.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer.parallel.apply import REDUCE_DTYPES, unwrap


class Synchronizer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, parallel: DictConfig,
                 data_parallel: bool):  # fmt: skip
        self.mode = str(parallel.sync) if data_parallel else "every_step"
        self.every = parallel.sync_every
        self.optimizer = optimizer
        self.named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        self.averager: Any = None
        self.anchor: list[torch.Tensor] = []
        if self.mode == "local_sgd":
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

            self.averager = PeriodicModelAverager(period=self.every, warmup_steps=parallel.sync_warmup)
        elif self.mode == "diloco":
            self.anchor = [p.detach().clone() for _, p in self.named]
            self.send_dtype = REDUCE_DTYPES.get(str(parallel.comm_hook), torch.float32)
            momentum = parallel.diloco.outer_momentum  # 0: a plain SGD step (torch refuses Nesterov without one)
            self.outer = torch.optim.SGD(self.anchor, lr=parallel.diloco.outer_lr, momentum=momentum,
                                         nesterov=momentum > 0)  # fmt: skip

    def after_step(self, step: int) -> int:
        """Sync if due after optimizer step `step`; the bytes this rank put into all-reduces for it."""
        params = [p for _, p in self.named]
        if self.mode == "local_sgd":
            from torch.distributed.algorithms.model_averaging.utils import average_parameters

            # The averager's schedule (its step counter, checkpointed); its average_parameters() would skip every
            # parameter here, as it only averages those with a gradient and the step has set them to None.
            a = self.averager
            due = a.step >= a.warmup_steps and (a.step - a.warmup_steps) % a.period == 0
            if due:
                average_parameters(iter(params), None)
            a.step += 1
            return 4 * sum(p.numel() for p in params) if due else 0
        if self.mode == "diloco" and step % self.every == 0:
            with torch.no_grad():
                for anchor, param in zip(self.anchor, params, strict=True):
                    delta = (anchor - param).to(self.send_dtype)  # the outer "gradient": this rank's move, negated
                    torch.distributed.all_reduce(delta, op=torch.distributed.ReduceOp.AVG)
                    anchor.grad = delta.to(anchor.dtype)
                self.outer.step()
                for anchor, param in zip(self.anchor, params, strict=True):
                    param.copy_(anchor)
                    anchor.grad = None
            return self.send_dtype.itemsize * sum(p.numel() for p in params)
        return 0

    # --- checkpoint ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"averager_step": self.averager.step} if self.averager else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.averager and "averager_step" in state:
            self.averager.step = state["averager_step"]

    def tensors(self) -> dict[str, torch.Tensor]:
        """This rank's own weights and optimizer state (and DiLoCo's anchor and outer momentum)."""
        if self.mode == "every_step":
            return {}
        out = {}
        for i, (name, param) in enumerate(self.named):
            out[f"weight/{name}"] = param.detach()
            for key, value in self.optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    out[f"optim/{name}/{key}"] = value
            if self.anchor:
                out[f"anchor/{name}"] = self.anchor[i]
                if (momentum := self.outer.state.get(self.anchor[i], {}).get("momentum_buffer")) is not None:
                    out[f"outer/{name}"] = momentum
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.mode == "every_step":
            return
        with torch.no_grad():
            for i, (name, param) in enumerate(self.named):
                param.copy_(tensors[f"weight/{name}"])
                for key, value in self.optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and f"optim/{name}/{key}" in tensors:
                        value.copy_(tensors[f"optim/{name}/{key}"])
                if self.anchor:
                    self.anchor[i].copy_(tensors[f"anchor/{name}"])
                    if f"outer/{name}" in tensors:
                        self.outer.state[self.anchor[i]]["momentum_buffer"] = tensors[f"outer/{name}"].clone()
