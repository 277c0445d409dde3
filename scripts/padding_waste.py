"""Padding waste of causal-LM batches with and without packing, measured on the real data pipeline.

    python scripts/padding_waste.py [+experiment=shakespeare_clm] [overrides ...]

For each setting it builds the training split exactly as `distrain train` would (same tokenizer, cache,
sampler, collator) and counts, over one epoch of global batches, the fraction of processed token positions that
are padding. The same number appears as `padding` in the train records of metrics.jsonl.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.table import Table

from distrain.cli.compose import compose_config
from distrain.trainer.data.sampler import GlobalBatchSampler
from distrain.trainer.model.tokenizer import ensure_run_tokenizer, load_tokenizer
from distrain.trainer.observe.reporting import make_console
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.tasks import build_task


def padding_fraction(overrides: list[str], run_dir: Path) -> tuple[float, int]:
    cfg = compose_config(overrides)
    env = DistEnv()
    ensure_run_tokenizer(cfg, run_dir, env)
    task = build_task(cfg, load_tokenizer(cfg.model, env, run_dir))
    train = task.prepare(env).splits["train"]
    t = cfg.train
    sampler = GlobalBatchSampler(train["length"], t.micro_batch_size, t.grad_accum_steps, 0, 1, t.seed,
                                 cfg.data.group_by_length)  # fmt: skip
    collate = task.collator(train=True)
    columns = list(task.loader_columns)
    real = slots = 0
    for indices in sampler:
        batch = collate([{k: train[i][k] for k in columns} for i in indices])
        real += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
    return 1 - real / slots, slots


def main() -> None:
    base = sys.argv[1:] or ["+experiment=shakespeare_clm"]
    table = Table(title=f"padding waste: {' '.join(base)}")
    for column in ("setting", "padding fraction", "token positions per epoch"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        settings = (
            ("packing", ["data.packing=true"]),
            ("no packing", ["data.packing=false"]),
            ("no packing, length-grouped batches", ["data.packing=false", "data.group_by_length=true"]),
        )
        for name, extra in settings:
            fraction, slots = padding_fraction([*base, *extra], Path(tmp))
            table.add_row(name, f"{fraction:.4f}", f"{slots:,}")
    make_console().print(table)


if __name__ == "__main__":
    main()
