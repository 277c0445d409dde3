"""Knowledge distillation (`distill.teacher=...`): the one home of the teacher and of the soft loss.

The student is the run's model; the teacher is a trained distrain model (run dir, checkpoint or export, loaded by
trainer/inference/load.py) or a Hugging Face folder of the same task, label set and tokenizer. It runs frozen, in
eval mode and without gradients: replicated under DDP (a plain module: nothing of it is reduced), sharded like the
student under FSDP; tensor parallelism is refused by the launcher (the teacher would need the TP plan too).

Per target (the positions whose label is not IGNORE: a labelled token for ner, a sample for classify, a target token
for mlm/clm) the objective is

    (1 - alpha) * cross_entropy(student, gold) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

summed over this rank's targets like the hard loss, so the step's normalisation by the global number of targets
(train/step.py) applies to both parts and 1 and N processes agree. T^2 keeps the soft gradients' scale independent
of T (Hinton et al. 2015).

With distill.hidden_weight > 0, each target token also adds hidden_weight times the mean over the mapped blocks of
the mean squared difference between the student's block output and its teacher block's (TinyBERT's hidden-state
loss; the student's block j learns from teacher block distill.layers[j], by default the block it was copied from).
The hidden sizes must be equal: no projection is learned. Token targets only: a classify target is a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from distrain.trainer.config.paths import resolve_path
from distrain.trainer.errors import ConfigError
from distrain.trainer.tasks.base import IGNORE

KEY = "distill.teacher"


@dataclass
class TeacherSource:
    """Where the teacher's weights, tokenizer and labels come from."""

    path: Path
    weights: Any  # inference.load.Weights of a distrain run, checkpoint or export; None: a Hugging Face folder

    @property
    def task(self) -> str | None:
        """The teacher run's task name (None for a plain Hugging Face folder)."""
        from distrain.trainer.config.schema import load_run_config

        return None if self.weights is None else str(load_run_config(self.weights.config).task.name)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if self.weights is None or self.weights.kind in ("export", "adapter"):
            return AutoTokenizer.from_pretrained(str(self.path if self.weights is None else self.weights.path))
        from distrain.trainer.config.schema import load_run_config
        from distrain.trainer.model.tokenizer import load_tokenizer
        from distrain.trainer.parallel.distributed import DistEnv

        return load_tokenizer(load_run_config(self.weights.config).model, DistEnv(), self.weights.config.parent)

    def labels(self) -> list[str] | None:
        """The teacher's label names in id order (None: a language model, or none recorded)."""
        import json

        from distrain.trainer.config import run_files

        if self.weights is not None and self.weights.kind == "checkpoint":
            head = self.weights.config.parent / run_files.HEAD
            id2label = json.loads(head.read_text()).get("id2label") if head.is_file() else None
        else:
            folder = self.path if self.weights is None else self.weights.path
            id2label = json.loads((folder / "config.json").read_text()).get("id2label")
        return [id2label[k] for k in sorted(id2label, key=int)] if id2label else None

    def meta_model(self, auto_class: type) -> torch.nn.Module:
        """The teacher's architecture on the meta device (for `distrain plan`: shapes, no weights read)."""
        with torch.device("meta"):
            if self.weights is None or self.weights.kind == "export":
                from transformers import AutoConfig

                folder = self.path if self.weights is None else self.weights.path
                return auto_class.from_config(AutoConfig.from_pretrained(str(folder)))
            from distrain.trainer.config.schema import load_run_config
            from distrain.trainer.model.build import build_model, model_source
            from distrain.trainer.model.head import load_head
            from distrain.trainer.parallel.distributed import DistEnv

            tcfg, run_dir = load_run_config(self.weights.config), self.weights.config.parent
            head = load_head(run_dir) if (run_dir / "head.json").is_file() else {}
            return build_model(tcfg.model, auto_class, 0, model_source(tcfg.model, DistEnv()),
                               self.tokenizer(), pretrained=False, **head)  # fmt: skip

    def load(self, auto_class: type) -> torch.nn.Module:
        """The teacher model, in this process, in eval mode."""
        if self.weights is None:
            return auto_class.from_pretrained(str(self.path)).eval()
        from distrain.trainer.inference.load import load_for_inference

        return load_for_inference(self.weights)[-1]


def find_teacher(value: str) -> TeacherSource:
    """The teacher `distill.teacher` names, or a ConfigError saying what it expected."""
    from distrain.trainer.inference.load import EvalError, locate

    path = resolve_path(value)
    if not path.exists():
        raise ConfigError([f"{KEY}: expected a run dir, checkpoint, export or Hugging Face model folder, "
                           f"{path} does not exist"])  # fmt: skip
    try:
        return TeacherSource(path, locate(path))
    except EvalError as error:
        if (path / "config.json").is_file():  # not distrain's: a plain Hugging Face model folder
            return TeacherSource(path, None)
        raise ConfigError([f"{KEY}: {str(error).removeprefix('ckpt: ')} (or a Hugging Face model folder with a "
                           "config.json)"]) from None  # fmt: skip


def label_problem(teacher: list[str] | None, run: list[str]) -> str | None:
    """Why the teacher's labels cannot teach the run's (both in id order), or None when they are the same."""
    if teacher == list(run):
        return None
    teacher = teacher or []
    only_teacher = [name for name in teacher if name not in run]
    only_run = [name for name in run if name not in teacher]
    diff = (f"only the teacher has {only_teacher}; only the run's data has {only_run}" if only_teacher or only_run
            else "the same names in another order (ids differ)")  # fmt: skip
    return (f"{KEY}: the teacher's labels {teacher} differ from the run's {list(run)}: {diff}. Distillation matches "
            "outputs label by label: train the student on data with the teacher's label set (data.labels=[...] "
            "fixes the order)")  # fmt: skip


def tokenizer_problem(teacher: Any, run: Any, run_source: str, key: str = KEY, role: str = "teacher",
                      why: str = "Distillation compares outputs position by position") -> str | None:  # fmt: skip
    """Why the `role` model's (the teacher's, DPO's reference's) tokenizer differs from the run's (another
    vocabulary), or None; `run_source`: where the run's comes from."""
    mine, theirs = run.get_vocab(), teacher.get_vocab()
    if mine == theirs:
        return None
    differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda item: item[1])
    examples = ", ".join(f"{token!r}" for token, _ in differ[:3])
    return (f"{key}: the {role}'s tokenizer ({len(theirs)} tokens) differs from the run's ({run_source}, "
            f"{len(mine)} tokens): {len(differ)} (token, id) pairs differ, e.g. {examples}. {why}, so both must "
            f"tokenize alike: use the {role}'s tokenizer (model.tokenizer=<the {role}'s folder>)")  # fmt: skip


def check_teacher(cfg: DictConfig, run_tokenizer: Any, run_source: str) -> list[str]:
    """The launcher's checks of distill.*: the teacher exists, is of the run's task, tokenizes alike, and has the
    run's labels when data.labels says them (else the worker compares them with the data's)."""
    d = cfg.distill
    problems = []
    if not 0 <= d.alpha <= 1:
        problems.append(f"distill.alpha: expected a number in [0, 1] (the soft loss's weight), got {d.alpha}")
    if not (d.hidden_weight >= 0 and d.hidden_weight < float("inf")):
        problems.append(f"distill.hidden_weight: expected a finite number >= 0, got {d.hidden_weight}")
    elif d.hidden_weight and str(cfg.task.name) == "classify":
        problems.append("distill.hidden_weight: the hidden-state loss is per target token; task=classify's targets "
                        "are samples: expected 0")  # fmt: skip
    if d.layers is not None and not all(isinstance(b, int) and b >= 0 for b in d.layers):
        problems.append(f"distill.layers: expected null or a list of teacher block numbers >= 0, got {list(d.layers)}")
    if not (d.temperature > 0 and d.temperature < float("inf")):
        problems.append(f"distill.temperature: expected a finite number > 0, got {d.temperature}")
    if cfg.model.train_tokenizer_vocab is not None:
        return [*problems, f"{KEY}: expected a run with the teacher's tokenizer, not one it trains "
                           "(model.train_tokenizer_vocab): set model.tokenizer to the teacher's"]  # fmt: skip
    try:
        source = find_teacher(d.teacher)
    except ConfigError as error:
        return problems + error.problems
    if source.task is not None and source.task != str(cfg.task.name):
        return [*problems, f"{KEY}: the teacher was trained for task {source.task}, the run is {cfg.task.name}"]
    if run_tokenizer is not None:
        problem = tokenizer_problem(source.tokenizer(), run_tokenizer, run_source)
        problems += [problem] if problem else []
    from distrain.trainer.tasks import task_class

    if cfg.data.labels is not None and not task_class(cfg.task.name).language_model:
        problem = label_problem(source.labels(), list(cfg.data.labels))
        problems += [problem] if problem else []
    return problems


class Distiller:
    """The frozen teacher and the distillation objective of each micro-batch."""

    def __init__(self, teacher: torch.nn.Module, task: Any, distill: DictConfig, precision: Any,
                 layers: list[int] | None = None):  # fmt: skip
        self.teacher, self.task, self.precision = teacher, task, precision
        self.alpha, self.temperature = float(distill.alpha), float(distill.temperature)
        self.hidden_weight = float(distill.hidden_weight)
        self.layers = layers  # hidden_weight > 0: the teacher block of each student block

    def objective(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], hard: torch.Tensor,
                  student_hidden: tuple[torch.Tensor, ...] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(the loss sum to minimise, [hard loss sum, soft loss sum, targets where the teacher is right, hidden
        loss sum]); `student_hidden`: the student's hidden states, when hidden_weight > 0."""
        from distrain.trainer.model.forward import forward_logits_and_hidden

        with torch.no_grad():
            teacher_logits, teacher_hidden = forward_logits_and_hidden(
                self.teacher, self.task, batch, self.precision, student_logits.device, bool(self.hidden_weight)
            )
        targets = batch["labels"].flatten() != IGNORE
        t = self.temperature
        student = student_logits.flatten(0, -2)[targets].float() / t
        teacher = teacher_logits.flatten(0, -2)[targets].float()
        soft = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum")
        agree = (teacher.argmax(-1) == batch["labels"].flatten()[targets]).sum()
        loss = (1 - self.alpha) * hard + (self.alpha * t * t) * soft
        hidden = torch.zeros_like(hard)
        if self.hidden_weight:
            for j, teacher_block in enumerate(self.layers):  # hidden states [0] are the embeddings' output
                s_j = student_hidden[j + 1].flatten(0, -2)[targets].float()
                t_j = teacher_hidden[teacher_block + 1].flatten(0, -2)[targets].float()
                hidden = hidden + F.mse_loss(s_j, t_j, reduction="none").mean(-1).sum()
            hidden = hidden / len(self.layers)
            loss = loss + self.hidden_weight * hidden
        return loss, torch.stack([hard.detach(), soft.detach(), agree.to(hard.dtype), hidden.detach()])


def build_distiller(cfg: DictConfig, env: Any, task: Any, labels: list[str], mesh: Any,
                    student_config: Any = None) -> Distiller | None:  # fmt: skip
    """The run's Distiller (None without distill.teacher): the teacher loaded on every rank, its labels checked
    against the data's, frozen, and sharded like the student under FSDP."""
    if cfg.distill.teacher is None:
        return None
    source = find_teacher(cfg.distill.teacher)
    teacher = source.load(task.auto_model_class())
    if not task.language_model:
        names = [teacher.config.id2label[i] for i in range(len(teacher.config.id2label))]
        problem = label_problem(names, labels)
        if problem:
            raise ConfigError([problem])
    teacher.requires_grad_(False)
    teacher.eval()
    teacher.to(env.device)
    if env.dims.fsdp_enabled:
        from distrain.trainer.parallel.apply import apply_fsdp

        teacher = apply_fsdp(teacher, mesh["dp"], cfg.parallel, cfg.precision.name)
    from distrain.trainer.parallel.precision import autocast_precision

    layers = hidden_layers(cfg, student_config, teacher.config) if cfg.distill.hidden_weight else None
    return Distiller(teacher, task, cfg.distill, autocast_precision(env.dims, cfg.precision.name), layers)


def hidden_layers(cfg: DictConfig, student: Any, teacher: Any) -> list[int]:
    """The teacher block of each student block for the hidden-state loss (distill.layers, else model.keep_layers
    of a student built from the teacher, else evenly spaced), checked against both models."""
    n, m = student.num_hidden_layers, teacher.num_hidden_layers
    if student.hidden_size != teacher.hidden_size:
        raise ConfigError([f"distill.hidden_weight: the student's hidden size ({student.hidden_size}) differs from "
                           f"the teacher's ({teacher.hidden_size}); the hidden-state loss compares them as they are "
                           "(no projection is learned): expected 0"])  # fmt: skip
    key = "distill.layers"
    if cfg.distill.layers is not None:
        layers = list(cfg.distill.layers)
    elif cfg.model.init_from is not None and cfg.model.keep_layers is not None:
        layers, key = list(cfg.model.keep_layers), "model.keep_layers"
    else:
        layers = [(j + 1) * m // n - 1 for j in range(n)]
    if len(layers) != n or not all(0 <= b < m for b in layers):
        raise ConfigError([f"{key}: expected one teacher block in [0, {m - 1}] for each of the student's {n} "
                           f"blocks, got {layers}"])  # fmt: skip
    return layers
