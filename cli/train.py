"""`distrain train`: compose (Hydra) -> validate -> write the run dir -> torchrun workers -> their status.

Hydra runs here only, once per job; workers read the resolved config.yaml. Under `-m` each job of the sweep
gets its own run dir (`<hydra.sweep.dir>/<job number>`, unless run.dir is swept) and its own torchrun, and
returns its best dev metric to the sweeper.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig

from distrain.cli.compose import check_overrides_or_exit, compose_checked
from distrain.cli.console import console, print_error
from distrain.trainer.config import run_files
from distrain.trainer.config.schema import register_configs
from distrain.trainer.errors import ConfigError, UserError

register_configs()


def register_sweeper() -> None:
    """Hydra finds plugins by walking the `hydra_plugins` namespace package's folders, which misses a module that an
    editable install maps there (`make install`); Hydra's public register() adds distrain's sweeper by name."""
    from hydra.core.plugins import Plugins
    from hydra_plugins.distrain_sweeper import DistrainSweeper

    Plugins.instance().register(DistrainSweeper)


def start_run(cfg: DictConfig, overrides: list[str]) -> Path:
    """Validate, write the run dir, train with torchrun workers. Raises ConfigError or TrainingFailed."""
    # Imported here: `--cfg job`, `--help` and a config Hydra rejects need neither torch nor the checks.
    from distrain.cli.launch import launch, rdzv_id
    from distrain.cli.rundir import absolutize, run_dir_lock, write_run_dir
    from distrain.cli.validate import validate

    validate(cfg)
    absolutize(cfg)
    run_dir = Path(cfg.run.dir)
    refuse_incompatible_resume(cfg, run_dir)
    with run_dir_lock(run_dir, rdzv_id(cfg.launcher, run_dir)):  # before anything in it is written
        write_run_dir(cfg, overrides)
        console.print(f"[bold]distrain train[/] run dir: {run_dir}")
        launch(cfg.launcher, run_dir, cfg.train.device, cfg.task.name)
    return run_dir


def refuse_incompatible_resume(cfg: DictConfig, run_dir: Path) -> None:
    """Before any worker starts: a `checkpoint.step` with no complete checkpoint, or a rerun whose settings would
    train the checkpoint on other batches (another global batch, seed or length grouping), is a config error naming
    the keys. The workers check the data itself."""
    from distrain.trainer.checkpoint.store import (
        newest_readable_checkpoint,
        readable_trainer_state,
        starting_checkpoint,
    )
    from distrain.trainer.parallel.dims import ParallelDims
    from distrain.trainer.train.batches import config_order, order_problems, reorder_message

    root = run_dir / run_files.CHECKPOINTS
    try:
        checkpoint = starting_checkpoint(root, newest_readable_checkpoint(root), cfg.checkpoint.step)
    except UserError as error:
        raise ConfigError([str(error)]) from None
    if checkpoint is None:
        return
    dims, _ = ParallelDims.resolve(cfg.parallel, cfg.launcher.nproc_per_node * cfg.launcher.nnodes)
    saved = (readable_trainer_state(checkpoint) or {}).get("data_order") or {}
    problems = order_problems(saved, config_order(cfg, dims.dp)) if dims else []
    if problems:
        raise ConfigError([reorder_message(f"checkpoint {checkpoint}", problems, run_dir)])


FAILED_JOBS: list[tuple[str, str, int]] = []  # this multirun's failed jobs: (run dir, what, its exit code alone)


def run_or_exit(cfg: DictConfig, overrides: list[str], multirun: bool = False) -> Path | None:
    """start_run for a command line: a clear message, then exit 2 (bad config) or 1 (failed workers). In a
    multirun the sweep goes on instead: the job is recorded as failed in its run dir (for `distrain report` and a
    study's sweeper) and in FAILED_JOBS (for the sweep's exit code), and None is returned."""
    from distrain.cli.launch import RefusedByWorkers, TrainingFailed
    from distrain.cli.rundir import RunDirBusy

    run_dir = Path(cfg.run.dir)
    try:
        return start_run(cfg, overrides)
    except ConfigError as error:
        title, problems, code, summary = "invalid configuration", error.problems, 2, run_files.REFUSED
        started = isinstance(error, RefusedByWorkers)
    except RunDirBusy as error:
        title, problems, code, summary = "run dir in use", [str(error)], 1, None  # another launcher's dir
        started = False
    except TrainingFailed as error:
        title, problems, code, summary = f"training failed ({run_dir})", [str(error)], 1, run_files.FAILED
        started = True
    print_error(title, "\n".join(problems))
    # A sweep's job, or a run whose workers started: its dir says why, for `distrain report` (a single run refused
    # before its workers started is left as it was). The workers' own summary (diverged, ...) stays.
    if summary and (multirun or started) and not (run_dir / run_files.SUMMARY).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        if multirun:
            (run_dir / run_files.OVERRIDES).write_text(yaml.safe_dump(overrides, default_flow_style=False))
        (run_dir / run_files.SUMMARY).write_text(json.dumps({"status": summary, "problems": problems}, indent=1))
    if not multirun:
        raise SystemExit(code)
    FAILED_JOBS.append((str(run_dir), title.split(" (")[0], code))
    return None


@hydra.main(config_path="pkg://distrain.configs", config_name="train", version_base=None)
def train_job(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN and not any(o.startswith("run.dir=") for o in overrides):
        # One run dir per job: <hydra.sweep.dir>/<job number>, made by Hydra.
        cfg.run.dir = hydra_cfg.runtime.output_dir
    run_dir = run_or_exit(cfg, overrides, multirun=hydra_cfg.mode == RunMode.MULTIRUN)
    if run_dir is None:
        return None
    summary_path = run_dir / run_files.SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return summary.get("best_metric")


def check_command_line(args: list[str]) -> DictConfig | None:
    """Before Hydra: exit 2 naming the key (with the nearest real keys or options) on an unknown key or group
    option, also inside `-m` sweeps, and on a value of the wrong type when nothing is swept. Hydra alone would
    exit 1 and advise `+key=value`, which the schema refuses. Returns the composed config when it composed one."""
    from hydra._internal.utils import get_args_parser

    parsed, _ = get_args_parser().parse_known_args(args)
    if parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion:
        return None
    check_overrides_or_exit(parsed.overrides)
    swept = any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(parsed.overrides))
    if parsed.multirun or swept:
        return None  # each job's values are checked when Hydra composes it
    return compose_checked(parsed.overrides)  # the types; Hydra composes again for the run (a few hundred ms)


def main() -> None:
    check_command_line(sys.argv[1:])
    register_sweeper()
    train_job()
    if FAILED_JOBS:  # a multirun whose jobs all ran: each failure was printed as it happened
        print_error(f"{len(FAILED_JOBS)} job{'s' if len(FAILED_JOBS) > 1 else ''} of the sweep failed", "\n".join(
            f"{run_dir} ({what})" for run_dir, what, _ in FAILED_JOBS)
            + "\n`distrain report <sweep dir>` lists every job with its status")  # fmt: skip
        raise SystemExit(1 if any(code == 1 for *_, code in FAILED_JOBS) else 2)  # a failed training first


if __name__ == "__main__":
    main()
