"""`distrain plan +experiment=... parallel=... launcher.nproc_per_node=N`: what each rank would hold, and the
model's FLOPs per token, for the chosen layout and its alternatives, without starting workers.

The model is built on the meta device (no memory, no weights read); parameters are split as the strategies split
them (tensor-parallel plan, FSDP's row chunks), so parameter, gradient and optimizer figures are exact for rank 0
(fp32 weights and gradients, AdamW's two moments plus a step counter per tensor), and so are those of a frozen
second model (a distillation teacher, a DPO reference). Activations are an estimate for one micro-batch of
data.max_length tokens (a DPO pair is two rows, chosen and rejected; Korthikanti et al. 2022, scaled to 4-byte
floats): they depend on the data. Layouts that cannot work are flagged with the reason. `output=FILE` also writes
the table as JSON.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.table import Table

from distrain.cli.compose import compose_train, split_args
from distrain.cli.console import console, print_error
from distrain.cli.validate import validate, writable_file_problem
from distrain.trainer import strict_json
from distrain.trainer.errors import ConfigError
from distrain.trainer.model import adapters
from distrain.trainer.model.build import build_model, model_source
from distrain.trainer.model.tokenizer import load_tokenizer
from distrain.trainer.observe.accounting import activation_bytes, flops_per_token, planned_bytes, rank0_param_shapes
from distrain.trainer.optim.registry import layout_problems as optimizer_problems
from distrain.trainer.parallel.dims import ParallelDims
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks import build_task, task_class

OWN = {"output": None}


class _SizedVocab:
    """Stands in for a tokenizer the run would train (model.train_tokenizer_vocab): only its size matters."""

    pad_token_id = bos_token_id = eos_token_id = 0  # the trained tokenizer's one special token

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def meta_model(cfg: DictConfig) -> torch.nn.Module:
    """The run's model (with its task head) on the meta device: structure and shapes, no storage."""
    return meta_model_and_task(cfg)[0]


def meta_model_and_task(cfg: DictConfig, read_data: bool = True) -> tuple[torch.nn.Module, Any]:
    """meta_model's model, and the run's task. Without `read_data` (data that validation found unreadable) a
    classifier head keeps the model config's label count instead of the data's."""
    env = DistEnv()
    if cfg.model.train_tokenizer_vocab is not None:
        tokenizer: Any = _SizedVocab(cfg.model.train_tokenizer_vocab)
        task = build_task(cfg, tokenizer)
        head: dict[str, Any] = {}
    else:
        tokenizer = load_tokenizer(cfg.model, env)
        task = build_task(cfg, tokenizer)
        head = task.head(task.prepare(env)) if read_data else {}  # the label set sizes the classifier
    with torch.device("meta"):
        model = build_model(cfg.model, task.auto_model_class(), cfg.train.seed, model_source(cfg.model, env),
                            tokenizer, pretrained=False, **head)  # fmt: skip
        return (adapters.apply_lora(model, cfg.adapter) if adapters.enabled(cfg) else model), task


def layouts(cfg: DictConfig, world: int) -> list[tuple[str, DictConfig]]:
    """The chosen layout first, then the alternatives for the same number of processes."""
    chosen = cfg.parallel
    out = [(f"{chosen.name.value} (chosen)", chosen)]
    for candidate in ParallelDims.candidates(world):
        if candidate["name"] != chosen.name.value:
            out.append((candidate["name"], DictConfig(candidate)))
    return out


def main() -> None:
    own, overrides = split_args(sys.argv[1:], OWN, __doc__)
    if own["output"] and (problem := writable_file_problem("output", own["output"])):
        print_error("cannot plan", problem)
        raise SystemExit(2)
    cfg = compose_train(overrides)
    problems: list[str] = []
    try:
        validate(cfg)
    except ConfigError as error:
        problems = error.problems
        console.print(f"[yellow]note: the chosen config would not start: {'; '.join(problems)}")
    read_data = not any(problem.startswith("data.") for problem in problems)
    if not read_data:  # reading it would fail, after the Hub's retries when the data comes from there
        console.print("[yellow]note: the data is not read (see above): a classifier head is planned with the model "
                      "config's label count, a few parameters off the run's")  # fmt: skip
    world = cfg.launcher.nproc_per_node * cfg.launcher.nnodes
    try:
        model, task = meta_model_and_task(cfg, read_data)
    except Exception as error:  # the model or its tokenizer cannot be read here (e.g. a Hub id offline)
        print_error("cannot plan", f"{type(error).__name__}: {error}")
        raise SystemExit(2) from None
    frozen = _frozen_model(cfg, model, task.auto_model_class())
    available = _memory_per_process(cfg)
    flops = flops_per_token(model, cfg.data.max_length)
    rows = []
    for label, parallel in layouts(cfg, world):
        dims, problems = ParallelDims.resolve(parallel, world)
        row: dict[str, Any] = {"layout": label, "processes": world, "flops_per_token": flops}
        if adapters.enabled(cfg):
            row.update(adapters.parameter_counts(model))
        if dims is not None:
            problems += dims.model_problems(model.config) + adapters.layout_problems(cfg, dims)
            if frozen is not None and dims.tp_enabled:
                key = "distill.teacher" if frozen[0] == "teacher" else "task=dpo"
                problems.append(f"{key}: a tensor-parallel {frozen[0]} is not built (single, ddp or fsdp)")
            problems += optimizer_problems(cfg.optim, dims.fsdp_enabled or dims.tp_enabled)
        if dims is None or problems:
            rows.append({**row, "problems": problems})
            continue
        planned = planned_bytes(model, dims, cfg.optim)
        held = {"params_bytes": planned.params, "grads_bytes": planned.grads, "optimizer_bytes": planned.optimizer}
        activations = activation_bytes(
            model.config, cfg.train.micro_batch_size * task.rows_per_sample, cfg.data.max_length, dims.tp,
            cfg.train.activation_checkpointing, vocab_logits=model.get_output_embeddings() is not None,
            precision=cfg.precision.name,
        )  # fmt: skip
        if frozen is not None:  # frozen fp32 weights only, sharded like the model's under FSDP
            kind, frozen_model = frozen
            held[f"{kind}_bytes"] = sum(math.prod(shape) for shape in rank0_param_shapes(frozen_model, dims)) * 4
        total = sum(held.values()) + activations
        tied_output = model.get_output_embeddings() is not None and getattr(model.config, "tie_word_embeddings", False)
        if dims.tp_enabled and tied_output:
            problems.append("tied input/output embeddings stay whole on every rank")
        if available and total > available:
            problems.append(f"needs {total / 2**30:.1f} GiB per rank, {available / 2**30:.1f} GiB available")
        rows.append({**row, "dp": dims.dp, "tp": dims.tp, **held, "activation_bytes": activations,
                     "total_bytes": total, "problems": problems})  # fmt: skip
    console.print(plan_table(cfg, rows, flops))
    if own["output"]:
        Path(own["output"]).write_text(strict_json.dumps(rows, indent=1))


def _frozen_model(cfg: DictConfig, model: torch.nn.Module, auto_class: type) -> tuple[str, torch.nn.Module] | None:
    """The frozen model a run holds beside its own, on the meta device, and what it is: distill.teacher's
    ("teacher"), or dpo's ("reference": dpo.reference's, else a copy of the run's starting model; none with
    adapter=lora, whose reference is the base itself with the adapters off); None without one."""
    from distrain.trainer.train.distill import find_teacher

    if cfg.distill.teacher is not None:
        return "teacher", find_teacher(cfg.distill.teacher).meta_model(auto_class)
    if not task_class(cfg.task.name).needs_reference or adapters.enabled(cfg):
        return None
    if cfg.dpo.reference is not None:
        return "reference", find_teacher(cfg.dpo.reference).meta_model(auto_class)
    return "reference", model


def _memory_per_process(cfg: DictConfig) -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // cfg.launcher.nproc_per_node
    except (ValueError, OSError):
        return None


def _mib(value: int) -> str:
    return f"{value / 2**20:,.1f}"


def plan_table(cfg: DictConfig, rows: list[dict[str, Any]], flops: float) -> Table:
    title = (
        f"{cfg.model.name} / {cfg.task.name}: per-rank memory (MiB, rank 0) for micro-batch "
        f"{cfg.train.micro_batch_size} x {cfg.data.max_length} tokens; {flops / 1e6:,.1f} MFLOP per token"
    )
    if "trainable_params" in rows[0]:
        title += f"; adapter=lora trains {rows[0]['trainable_params']:,} of {rows[0]['total_params']:,} parameters"
    table = Table(title=title)
    # distill.teacher's or dpo's reference: its frozen weights per rank
    frozen = next((kind for kind in ("teacher", "reference") if any(f"{kind}_bytes" in row for row in rows)), None)
    columns = ("layout", "dp x tp", "params", "grads", "optimizer", *([frozen] if frozen else []),
               "activations (est.)", "total", "notes")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right" if column not in ("layout", "notes") else "left")
    for row in rows:
        if "params_bytes" not in row:
            table.add_row(row["layout"], *["-"] * (len(columns) - 2), "[red]cannot work: " + "; ".join(row["problems"]))
            continue
        table.add_row(
            row["layout"], f"{row['dp']} x {row['tp']}", _mib(row["params_bytes"]), _mib(row["grads_bytes"]),
            _mib(row["optimizer_bytes"]), *([_mib(row[f"{frozen}_bytes"])] if frozen else []),
            _mib(row["activation_bytes"]), _mib(row["total_bytes"]),
            "; ".join(row["problems"]),
        )  # fmt: skip
    return table


if __name__ == "__main__":
    main()
