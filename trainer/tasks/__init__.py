"""The tasks distrain trains, by name (`task.name`): each a `Task` subclass, the one home of its knowledge."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from distrain.trainer.tasks.base import IGNORE, Task, TaskData
from distrain.trainer.tasks.chat import ChatTask
from distrain.trainer.tasks.classify import ClassifyTask
from distrain.trainer.tasks.dpo import DpoTask
from distrain.trainer.tasks.lm import CausalLMTask, MaskedLMTask
from distrain.trainer.tasks.ner import NerTask

TASKS: dict[str, type[Task]] = {
    str(t.name): t for t in (NerTask, ClassifyTask, MaskedLMTask, CausalLMTask, ChatTask, DpoTask)
}

__all__ = ["IGNORE", "TASKS", "Task", "TaskData", "build_task", "task_class"]


def task_class(name: str) -> type[Task]:
    return TASKS[str(name)]


def build_task(cfg: DictConfig, tokenizer: Any) -> Task:
    return task_class(cfg.task.name)(cfg, tokenizer)
