"""The frozen reference model of a task whose loss compares the trained model with one (`Task.needs_reference`:
dpo): the one home of which model that is and how it runs.

- adapter=lora: the run's own model with its adapters disabled (peft's `disable_adapter`): the frozen base, no
  second copy. The adapters start at zero, so at step 0 policy and reference agree exactly.
- dpo.reference=<run dir, checkpoint, export or Hugging Face folder>: that model (loaded as distill's teacher is).
- otherwise: the starting weights, rebuilt from model.name_or_path (or the seeded random initialisation), which
  train nothing after.

A separate reference is frozen (no gradients, not in the optimizer: the optimizer is built over the run's model),
kept in eval mode, replicated under DDP (a plain module: nothing of it is reduced) and sharded like the model under
FSDP, as distill's teacher; it runs without gradients at the run's autocast precision.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from omegaconf import DictConfig

from distrain.trainer.errors import ConfigError
from distrain.trainer.model import adapters
from distrain.trainer.parallel.apply import unwrap
from distrain.trainer.parallel.precision import autocast_precision

KEY = "dpo.reference"


class Reference:
    """Log-probabilities of a batch's sequences under the frozen reference."""

    def __init__(self, model: torch.nn.Module, task: Any, precision: Any, disable_adapters: bool):
        self.model, self.task, self.precision = model, task, precision
        self.disable_adapters = disable_adapters  # the run's own LoRA model, its adapters off

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from distrain.trainer.model.forward import forward_logits
        from distrain.trainer.tasks.dpo import sequence_logps

        model = unwrap(self.model)  # DDP: the bare module (no gradients to reduce, no collective of DDP's)
        was_training = model.training
        model.eval()  # dropout off, as the reference was when the policy started from it
        try:
            with model.disable_adapter() if self.disable_adapters else nullcontext():
                device = batch["input_ids"].device
                logits = forward_logits(model, self.task, batch, self.precision, device)
        finally:
            model.train(was_training)
        return sequence_logps(logits, batch["labels"])


def reference_model(cfg: DictConfig, task: Any, tokenizer: Any, env: Any) -> torch.nn.Module:
    """A separate frozen reference, in this process, in eval mode: dpo.reference's model, else the starting
    weights rebuilt from the run's model settings (seeded: a random-init model gets the same weights)."""
    if cfg.dpo.reference is not None:
        from distrain.trainer.train.distill import find_teacher, tokenizer_problem

        try:
            source = find_teacher(cfg.dpo.reference)
        except ConfigError as error:
            raise ConfigError([p.replace("distill.teacher", KEY, 1) for p in error.problems]) from None
        named = cfg.model.tokenizer or cfg.model.name_or_path
        run_source = f"model.tokenizer={named}" if named else "trained by the run: model.train_tokenizer_vocab"
        problem = tokenizer_problem(source.tokenizer(), tokenizer, run_source, KEY, "reference",
                                    "DPO compares the log-probabilities of the same tokens under both")  # fmt: skip
        if problem:
            raise ConfigError([problem])
        model = source.load(task.auto_model_class())
    else:
        from distrain.trainer.model.build import build_model, model_source

        model = build_model(cfg.model, task.auto_model_class(), cfg.train.seed, model_source(cfg.model, env),
                            tokenizer)  # fmt: skip
    model.requires_grad_(False)
    return model.eval()


def build_reference(cfg: DictConfig, env: Any, task: Any, tokenizer: Any, policy: torch.nn.Module | None = None,
                    mesh: Any = None) -> Reference:  # fmt: skip
    """The run's reference. `policy`: the run's (parallelized) model, whose adapters are switched off under
    adapter=lora; without it (`distrain eval` of merged weights) the base is built separately."""
    precision = autocast_precision(env.dims, cfg.precision.name)
    if policy is not None and adapters.enabled(cfg):
        return Reference(policy, task, precision, disable_adapters=True)
    model = reference_model(cfg, task, tokenizer, env).to(env.device)
    if mesh is not None and env.dims.fsdp_enabled:
        from distrain.trainer.parallel.apply import apply_fsdp

        model = apply_fsdp(model, mesh["dp"], cfg.parallel, cfg.precision.name)
    return Reference(model, task, precision, disable_adapters=False)
