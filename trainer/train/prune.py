"""Pruning during training: the one home of the schedule and the masks. `prune=magnitude` zeroes single weights;
`prune=structured` removes whole feed-forward neurons, so that the export is a smaller dense model.

Magnitude pruning (class Pruner).

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

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor, distribute_tensor

from distrain.trainer.model.families import feed_forward_names
from distrain.trainer.parallel.apply import transformer_blocks, unwrap


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


@dataclass(frozen=True)
class FeedForward:
    """The feed-forward of one block: `inputs` hold a row per neuron, `output` a column per neuron."""

    name: str  # the block's qualified name, as in the model's state dict
    input_names: tuple[str, ...]  # block-relative
    output_name: str
    inputs: tuple[torch.nn.Linear, ...]
    output: torch.nn.Linear


def feed_forwards(model: torch.nn.Module) -> list[FeedForward]:
    model = unwrap(model)
    input_names, output_name = feed_forward_names(model.config.model_type)
    return [
        FeedForward(
            name,
            input_names,
            output_name,
            tuple(block.get_submodule(n) for n in input_names),
            block.get_submodule(output_name),
        )  # fmt: skip
        for name, block in transformer_blocks(model)
    ]


def _pruned_neurons(output_weight: torch.Tensor) -> torch.Tensor:
    """Which neurons are pruned: those whose column of the (whole) output weight is all zero."""
    return (output_weight == 0).all(dim=0)


def _mask_(parameter: torch.Tensor | None, keep: torch.Tensor) -> None:
    """Zero `parameter` (a whole-shaped mask `keep` broadcast over it) on this rank's part of it."""
    if parameter is None:
        return
    keep = keep.expand(parameter.shape).to(parameter.dtype)
    if isinstance(parameter, DTensor):  # this rank's part; every rank holds the same whole mask: no scatter
        mesh, placements = parameter.device_mesh, parameter.placements
        keep = distribute_tensor(keep.contiguous(), mesh, placements, src_data_rank=None).to_local()
    _local(parameter).mul_(keep)


class NeuronPruner:
    """prune=structured: the same interface as Pruner (before_step, then apply after the optimizer step)."""

    def __init__(self, model: torch.nn.Module, prune: DictConfig, total_steps: int):
        self.model, self.prune, self.total_steps = model, prune, total_steps
        self.layers = feed_forwards(model)
        self.pruned: list[torch.Tensor] | None = None  # per layer, the neurons pruned before this step

    def chooses(self, step: int) -> bool:
        return chooses(step, self.prune, self.total_steps)

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        after_start = step > self.prune.start_step
        self.pruned = [_pruned_neurons(_whole(f.output.weight)) for f in self.layers] if after_start else None

    @torch.no_grad()
    def apply(self, step: int) -> None:
        pruned, self.pruned = self.pruned, None
        fraction = target_sparsity(step, self.prune, self.total_steps)
        if self.chooses(step) and fraction > 0:
            pruned = [self._choose(layer, fraction, before) for layer, before in
                      zip(self.layers, pruned or [None] * len(self.layers), strict=True)]  # fmt: skip
        if pruned is None:
            return
        for layer, gone in zip(self.layers, pruned, strict=True):
            keep = ~gone
            for linear in layer.inputs:
                _mask_(linear.weight, keep[:, None])
                _mask_(linear.bias, keep)
            _mask_(layer.output.weight, keep[None, :])

    def _choose(self, layer: FeedForward, fraction: float, before: torch.Tensor | None) -> torch.Tensor:
        """The floor(fraction * neurons) neurons of least importance (those pruned before first)."""
        score = _whole(layer.output.weight).float().norm(dim=0)
        for linear in layer.inputs:
            score = score * _whole(linear.weight).float().norm(dim=1)
        if before is not None:
            score = score.masked_fill(before, -torch.inf)
        gone = torch.zeros_like(score, dtype=torch.bool)
        gone[score.argsort(stable=True)[: int(fraction * score.numel())]] = True
        return gone


def make_pruner(model: torch.nn.Module, prune: DictConfig, total_steps: int) -> Pruner | NeuronPruner | None:
    if prune.name == "none":
        return None
    return (NeuronPruner if prune.name == "structured" else Pruner)(model, prune, total_steps)


def shrunk_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """A full state dict without the pruned feed-forward neurons, and the intermediate_size it has. Every layer
    keeps the same number of neurons: were one layer to have more pruned (all-zero) neurons than the others,
    the extra ones stay, as zeros."""
    layers = feed_forwards(model)
    pruned = [_pruned_neurons(state[f"{f.name}.{f.output_name}.weight"]) for f in layers]
    drop = min(int(gone.sum()) for gone in pruned)
    out = dict(state)
    for layer, gone in zip(layers, pruned, strict=True):
        keep = torch.ones_like(gone)
        keep[gone.nonzero().flatten()[:drop]] = False
        for name in layer.input_names:
            for kind in ("weight", "bias"):
                if (key := f"{layer.name}.{name}.{kind}") in out:
                    out[key] = out[key][keep].contiguous()
        key = f"{layer.name}.{layer.output_name}.weight"
        out[key] = out[key][:, keep].contiguous()
    return out, len(pruned[0]) - drop
