"""A smaller copy of a trained model to distil into: `model.init_from=<teacher>` with `model.keep_layers=[0,2,4]`
(DistilBERT's initialisation from every other layer).

The student's config is the teacher's with num_hidden_layers=len(keep_layers), built with from_config; its weights
are the teacher's state dict with the kept blocks renumbered 0..n-1, loaded with strict=True, so a missing or
unexpected tensor is an error. (`from_pretrained(folder, num_hidden_layers=3)` would silently keep layers 0-2.)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from omegaconf import DictConfig


def kept_layers(model: DictConfig, layers: int) -> list[int]:
    return list(model.keep_layers) if model.keep_layers is not None else list(range(layers))


def renumbered(state: dict[str, torch.Tensor], blocks: list[str], keep: list[int]) -> dict[str, torch.Tensor]:
    """`state` without the blocks not kept, and block keep[j] renamed block j. `blocks`: the block names in order
    (e.g. bert.encoder.layer.0 ...)."""
    out = {}
    for key, value in state.items():
        block = next((i for i, name in enumerate(blocks) if key.startswith(name + ".")), None)
        if block is None:
            out[key] = value
        elif block in keep:
            out[blocks[keep.index(block)] + key[len(blocks[block]) :]] = value
    return out


def student_model(model: DictConfig, auto_class: type, pretrained: bool, head: dict[str, Any]) -> torch.nn.Module:
    """The student: the teacher's architecture with the kept blocks only; with the teacher's weights when
    `pretrained` (a fresh run), else the architecture alone (a checkpoint loads over it)."""
    from distrain.trainer.parallel.apply import transformer_blocks
    from distrain.trainer.train.distill import find_teacher

    source = find_teacher(model.init_from)
    teacher = source.load(auto_class) if pretrained else source.meta_model(auto_class)
    if "id2label" in head:
        from distrain.trainer.errors import ConfigError
        from distrain.trainer.train.distill import label_problem

        names = [teacher.config.id2label[i] for i in range(len(teacher.config.id2label))]
        problem = label_problem(names, [head["id2label"][i] for i in range(len(head["id2label"]))])
        if problem:
            raise ConfigError([problem.replace("distill.teacher", "model.init_from", 1)])
    keep = kept_layers(model, teacher.config.num_hidden_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    for key, value in head.items():  # the run's labels (the worker checked they are the teacher's)
        setattr(config, key, value)
    student = auto_class.from_config(config)
    if pretrained:
        blocks = [name for name, _ in transformer_blocks(teacher)]
        student.load_state_dict(renumbered(teacher.state_dict(), blocks, keep), strict=True)
    return student
