"""Unstructured magnitude pruning during training (`prune=magnitude`): the one home of the schedule and the masks.

The weights pruned are those of every Linear layer of the base model (attention and feed-forward projections, the
pooler); embeddings, norms, biases and the task head are kept whole. Every prune.every steps from prune.start_step
on, and at prune.end_step, the masks are re-chosen after the optimizer step: the smallest-magnitude weights are
set to zero so that a fraction s_t of them is zero, with the cubic schedule of Zhu & Gupta 2017 (arXiv:1710.01878):

    s_t = sparsity * (1 - (1 - (t - start) / (end - start))^3)   for start <= t <= end, sparsity after end

over all pruned weights at once (prune.scope=global) or per weight matrix (layer). At the other steps after
prune.start_step the weights that were zero before the step are set back to zero. Either way the mask of a step is
a function of that step's weights and number only, so there is no mask state to save: the checkpoint's weights
(zeros included) and step recompute it exactly, and a resumed run equals an uninterrupted one. Choosing by
magnitude costs a k-th value over all pruned weights (seconds for MiniLM's 10.6M on a loaded CPU), hence
prune.every.

The masks are plain tensors applied in place: torch.nn.utils.prune reparametrizes each module into weight_orig
and weight_mask, which renames the state dict (checkpoints, the export) and does not compose with FSDP2's DTensor
parameters or DCP. Under FSDP the thresholds come from the whole tensors (an all-gather per pruned matrix per
step), so every rank zeroes the same weights as one process would.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

from distrain.trainer.parallel.apply import unwrap


def target_sparsity(step: int, prune: DictConfig, total_steps: int) -> float:
    """s_t of the cubic schedule (0 before prune.start_step)."""
    start, end = prune.start_step, prune.end_step if prune.end_step is not None else total_steps
    if step < start:
        return 0.0
    progress = min(1.0, (step - start) / max(end - start, 1))
    return float(prune.sparsity) * (1.0 - (1.0 - progress) ** 3)


def chooses(step: int, prune: DictConfig, total_steps: int) -> bool:
    """Whether optimizer step `step` re-chooses the masks by magnitude (else it keeps the zeros it found)."""
    start, end = prune.start_step, prune.end_step if prune.end_step is not None else total_steps
    return start <= step <= end and ((step - start) % prune.every == 0 or step == end)


def pruned_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of the Linear layers of the base model, named as in the model's state dict."""
    model = unwrap(model)
    prefix = model.base_model_prefix
    base = getattr(model, prefix, model)
    lead = f"{prefix}." if base is not model else ""
    return [(f"{lead}{name}", m) for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)]


def _whole(weight: torch.Tensor) -> torch.Tensor:
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def _threshold(magnitudes: torch.Tensor, fraction: float) -> float | None:
    """The magnitude at or below which `fraction` of the values lie (None: nothing to prune)."""
    k = int(fraction * magnitudes.numel())
    return float(magnitudes.flatten().float().kthvalue(k).values) if k >= 1 else None


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


class Pruner:
    def __init__(self, model: torch.nn.Module, prune: DictConfig, total_steps: int):
        self.model, self.prune, self.total_steps = model, prune, total_steps
        self.modules = pruned_modules(model)
        self.zeros: list[torch.Tensor] | None = None  # which (local) weights were zero before this step

    def chooses(self, step: int) -> bool:
        return chooses(step, self.prune, self.total_steps)

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Before optimizer step `step`: note the zeros that a step which does not re-choose must keep."""
        keeps = step > self.prune.start_step and not self.chooses(step)
        self.zeros = [_local(m.weight) == 0 for _, m in self.modules] if keeps else None

    @torch.no_grad()
    def apply(self, step: int) -> None:
        """After optimizer step `step`: re-choose the masks (s_step of the weights zero), or zero again the
        weights that were zero before it."""
        if self.zeros is not None:
            for (_, module), zero in zip(self.modules, self.zeros, strict=True):
                _local(module.weight).masked_fill_(zero, 0.0)
            self.zeros = None
            return
        fraction = target_sparsity(step, self.prune, self.total_steps)
        if not self.chooses(step) or fraction <= 0:
            return
        weights = [m.weight for _, m in self.modules]
        if self.prune.scope == "global":
            everything = torch.cat([_whole(w).detach().abs().flatten() for w in weights])
            thresholds = [_threshold(everything, fraction)] * len(weights)
        else:
            thresholds = [_threshold(_whole(w).detach().abs(), fraction) for w in weights]
        for weight, threshold in zip(weights, thresholds, strict=True):
            if threshold is not None:
                local = _local(weight)
                local.mul_(local.abs() > threshold)


def sparsity_by_layer(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """The measured fraction of zeros of each pruned weight matrix in a full state dict (the export's)."""
    names = [f"{name}.weight" for name, _ in pruned_modules(model)]
    return {name: float((state[name] == 0).float().mean()) for name in names if name in state}
