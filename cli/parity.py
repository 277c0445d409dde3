"""`distrain parity +experiment=... strategies=[single,ddp,fsdp,tp,fsdp_tp] steps=N`: does every strategy train
the same model the same way here?

Each strategy runs N steps with its own torchrun, from the same seed (same initial weights) and the same global
batches (each process's micro-batch is the reference micro-batch divided by the number of data shards), and logs
every step's loss. The table shows each strategy's largest per-step loss difference from `single` (the first
strategy listed is the reference); the command exits 1 when one exceeds the tolerance (fp32: 1e-5).

With `variant=KEY=VALUE` (e.g. variant=data.pack_examples=true) it compares a setting instead: the reference is the
first strategy without the override, and every listed strategy runs with it (a setting that must not change the
losses, such as packing, under each strategy).

Own keys: strategies (name, or name:DPxTP such as fsdp_tp:1x2), steps (5), tolerance (1e-5), nproc (processes for
the multi-process strategies, 2), variant (an override, default none), out (the folder of the runs; default
runs/parity/<run.name>/<time>).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from rich.table import Table

from distrain.cli.compose import compose_train, split_args
from distrain.cli.console import console, print_error
from distrain.cli.train import run_or_exit
from distrain.trainer import strict_json
from distrain.trainer.config import run_files
from distrain.trainer.config.schema import Strategy
from distrain.trainer.observe.reporting import read_metrics
from distrain.trainer.parallel.dims import ParallelDims

OWN = {"strategies": [s.value for s in Strategy], "steps": 5, "tolerance": 1e-5, "nproc": 2, "out": None}


def parse_strategy(spec: str, nproc: int) -> tuple[str, int, int | None, int | None]:
    """(strategy, processes, dp, tp) from "fsdp" or "fsdp_tp:1x2"."""
    name, _, degrees = spec.partition(":")
    if name == "single":
        return name, 1, None, None
    if degrees:
        dp, _, tp = degrees.partition("x")
        if not (dp.isdigit() and tp.isdigit()):
            raise ValueError(f"strategies: expected name or name:DPxTP (e.g. fsdp_tp:1x2), got {spec!r}")
        return name, int(dp) * int(tp), int(dp), int(tp)
    return name, nproc, None, None


def losses(run_dir: Path) -> dict[int, float | None]:
    """Each step's train loss; None where it was not finite (a skipped step: strict JSON writes null)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / run_files.METRICS) if r["kind"] == "train"}


def gap(mine: float | None, reference: float | None) -> float:
    """|mine - reference|: 0 where both steps were non-finite (the same skip), infinite where one alone was or
    the step is missing."""
    if mine is None or reference is None:
        return 0.0 if mine is None and reference is None else float("inf")
    return abs(mine - reference)


def main() -> None:
    # variant=KEY=VALUE is taken as written (Hydra's override grammar has no second `=` in a value)
    variants = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("variant=")]
    own, overrides = split_args([arg for arg in sys.argv[1:] if not arg.startswith("variant=")], OWN, __doc__)
    base = compose_train(overrides)
    out = Path(own["out"] or f"runs/parity/{base.run.name}/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    micro, accum = base.train.micro_batch_size, base.train.grad_accum_steps
    runs: dict[str, tuple[Path, str]] = {}
    variant = variants[-1] if variants else None
    specs = [(str(spec), []) for spec in own["strategies"]]
    if variant is not None:  # the reference without the override, then every strategy with it
        if "=" not in variant:
            print_error("invalid argument", f"variant: expected KEY=VALUE (data.pack_examples=true), got {variant!r}")
            raise SystemExit(2)
        specs = [(f"{specs[0][0]} (reference)", []), *((f"{spec} {variant}", [variant]) for spec, _ in specs)]
    planned = []
    for label, extra in specs:
        spec = label.split(" ", 1)[0]
        try:
            name, processes, dp, tp = parse_strategy(str(spec), own["nproc"])
        except ValueError as error:
            print_error("invalid argument", str(error))
            raise SystemExit(2) from None
        run_dir = out / re.sub(r"[^\w.-]+", "_", label).strip("_")
        strategy_overrides = [
            *overrides,
            *extra,
            f"parallel={name}",
            f"launcher.nproc_per_node={processes}",
            f"train.max_steps={own['steps']}",
            "train.log_every=1",
            "train.save_every=0",
            "data.max_eval_samples=16",  # training is what is compared; keep the final evaluation short
            f"run.dir={run_dir}",
        ]
        if dp is not None:
            strategy_overrides += [f"parallel.dp={dp}", f"parallel.tp={tp}"]
        cfg = compose_train(strategy_overrides)
        dims, problems = ParallelDims.resolve(cfg.parallel, processes)
        if dims is not None and micro % dims.dp:
            problems = [f"train.micro_batch_size={micro} does not split over {dims.dp} data shards"]
        if problems:
            print_error(f"invalid strategy {spec}", "\n".join(problems))
            raise SystemExit(2)
        # The same global batch everywhere: the reference micro-batch, split over the data shards.
        strategy_overrides.append(f"train.micro_batch_size={micro // dims.dp}")
        cfg.train.micro_batch_size = micro // dims.dp
        planned.append((label, cfg, strategy_overrides, run_dir, f"{dims.dp}x{dims.tp}"))
    for label, cfg, strategy_overrides, run_dir, layout in planned:  # every spec checked before the first trains
        run_or_exit(cfg, strategy_overrides)
        runs[label] = (run_dir, layout)

    reference_name = next(iter(runs))
    reference = losses(runs[reference_name][0])
    table = Table(
        title=f"loss parity over {own['steps']} steps, against {reference_name} (global batch {micro * accum})"
    )
    for column in ("strategy", "dp x tp", "max |loss - reference|", "per step", "within " + f"{own['tolerance']:g}"):
        table.add_column(column, justify="right")
    worst = 0.0
    report = {}
    for spec, (run_dir, layout) in runs.items():
        mine = losses(run_dir)
        diffs = [gap(mine[step], loss) if step in mine else float("inf") for step, loss in sorted(reference.items())]
        worst = max(worst, max(diffs))
        ok = max(diffs) <= own["tolerance"]
        report[spec] = {"max_abs_diff": max(diffs), "per_step": diffs, "run_dir": str(run_dir)}
        worst_step = diffs.index(max(diffs)) + 1
        steps = " ".join(f"{d:.0e}" for d in diffs) if len(diffs) <= 10 else f"largest at step {worst_step}"
        table.add_row(spec, layout, f"{max(diffs):.2e}", steps, "[green]yes" if ok else "[red]NO")
    console.print(table)
    if skipped := [step for step, loss in sorted(reference.items()) if loss is None]:
        console.print(f"[yellow]warning:[/] the loss of step(s) {', '.join(map(str, skipped))} was not finite in "
                      f"{reference_name} (the step was skipped); a strategy agrees there only when it skipped it too. "
                      "Lower optim.lr for a run whose losses can be compared", highlight=False)  # fmt: skip
    (out / "parity.json").write_text(strict_json.dumps({"reference": reference_name, "tolerance": own["tolerance"],
                                                  "strategies": report}, indent=1))  # fmt: skip
    console.print(f"runs and parity.json in {out}")
    if worst > own["tolerance"]:
        if str(base.precision.name) in ("bf16", "fp16"):  # the layouts sum in other orders, each rounded to 16 bits
            console.print(f"[yellow]note:[/] at precision={base.precision.name} the strategies' losses also differ "
                          "by 16-bit rounding: compare them with a tolerance above it (tolerance=1e-3), or at "
                          "precision=fp32 with the default 1e-5", highlight=False)  # fmt: skip
        raise SystemExit(1)


if __name__ == "__main__":
    main()
