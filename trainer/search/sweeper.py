"""distrain's Hydra sweeper (`hparams_search=...`, which selects `hydra/sweeper=distrain`): an Optuna study that
survives its process, prunes hopeless trials and runs trials in parallel.

Each trial is one `distrain train` run with its own run dir, `<hydra.sweep.dir>/<trial number>`; its objective is
the run's best dev metric (summary.json). The sweeper alone asks the study for parameters and tells it the
results (Optuna's ask-and-tell); a trial's rank 0 reports each dev evaluation to the same study, whose pruner may
stop the run (status "pruned"). With Hydra's basic launcher each trial is a child process `distrain train`, up to
`sweep.n_jobs` at once, the CPU cores split between them; with another launcher (hydra/launcher=distrain_slurm)
batches of `sweep.n_jobs` trials go to it at once (SLURM jobs). Rerunning the same command continues the study:
finished trials stay, a trial whose sweeper died is marked failed and its parameters are tried again.
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from distrain.cli.console import console, print_error
from distrain.trainer.config import run_files

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a trial's child process: SIGTERM when the sweeper dies (even by SIGKILL); `distrain train` then writes a
    checkpoint and stops, instead of training on for a study nobody tells."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SweepInputError(Exception):
    """Bad sweep settings, found before the first trial: exit 2."""


class DistrainSweeper(Sweeper):
    def __init__(self) -> None:
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        try:
            plan = self._plan(arguments)
        except SweepInputError as error:
            print_error("invalid sweep", str(error))
            raise SystemExit(2) from None
        return run_study(plan, self.launcher)

    def _plan(self, arguments: list[str]) -> dict[str, Any]:
        """Everything checked before the first trial: the space, the sampler and the storage."""
        from distrain.cli.validate import validate
        from distrain.trainer.errors import ConfigError
        from distrain.trainer.search import space as spaces
        from distrain.trainer.search import study as studies

        cfg = self.config
        sweep = cfg.sweep
        try:
            space, fixed = spaces.split_arguments(dict(sweep.params), arguments)
        except ValueError as error:
            raise SweepInputError(str(error)) from None
        problems = spaces.key_problems(space)
        for key in ("n_trials", "n_jobs", "max_failures"):
            if sweep[key] < 1:
                problems.append(f"sweep.{key}: expected an integer >= 1, got {sweep[key]}")
        if sweep.min_resource is not None and sweep.min_resource < 1:
            problems.append(f"sweep.min_resource: expected null or an integer >= 1 (steps), got {sweep.min_resource}")
        if not space:
            problems.append("sweep.params: nothing to search; give keys with interval(a, b), choice(...) or range()")
        if sweep.trial is not None:
            problems.append("sweep.trial: set by the sweeper for each trial's run, not on the command line")
        if problems:
            raise SweepInputError("\n".join(problems))
        grid = None
        try:
            if str(sweep.sampler) == "grid":
                grid = {key: spaces.grid_values(key, o) for key, o in space.items()}
            distributions = {key: spaces.distribution(o) for key, o in space.items()}
        except ValueError as error:
            raise SweepInputError(str(error)) from None
        # The run config itself (paths, ranges), with the space's keys at their base values.
        try:
            validate(cfg)
        except ConfigError as error:
            raise SweepInputError("\n".join(error.problems)) from None
        # Then each searched key at the ends of its range (each choice): a value the run would refuse is found
        # here, not as a failed trial after another
        from distrain.cli.compose import config_groups

        problems = []
        for key, drawn in distributions.items():
            if key in config_groups():  # an option of a group composes a section: the trials check those
                continue
            for value in spaces.end_values(drawn):
                at_end = copy.deepcopy(cfg)
                OmegaConf.update(at_end, key, value, merge=False)
                try:
                    validate(at_end)
                except ConfigError as error:
                    named = [p for p in error.problems if p.startswith(key)]
                    if named:
                        problems.append(f"sweep.params: {key} can be drawn as {value}, which the run refuses: "
                                        f"{named[0]}")  # fmt: skip
                        break
        if problems:
            raise SweepInputError("\n".join(problems))
        # The storage last: a refused sweep leaves no study file behind
        sweep_dir = Path(cfg.hydra.sweep.dir).resolve()
        url = studies.resolve_storage(sweep.storage, sweep_dir)
        try:
            storage = studies.open_storage(url)
        except Exception as error:  # SQLAlchemy, the journal's file system: say which key and what it got
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SweepInputError(
                f"sweep.storage: cannot open {studies.display_url(url)!r} ({type(error).__name__}: {first}); "
                "expected null (SQLite in the sweep dir), journal, journal:PATH or an RDB URL such as "
                "postgresql://user@host/db that this machine can reach"
            ) from None
        from distrain.trainer.tasks import task_class

        lower = cfg.task.metric in task_class(cfg.task.name).lower_is_better
        return {"cfg": cfg, "sweep": sweep, "space": distributions, "grid": grid, "fixed": fixed,
                "sweep_dir": sweep_dir, "url": url, "storage": storage,
                "direction": "minimize" if lower else "maximize"}  # fmt: skip


def run_study(plan: dict[str, Any], launcher: Any) -> Any:
    """Create or continue the study, then ask, run and tell trials until n_trials are finished."""
    import optuna
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    from distrain.trainer.search import study as studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep, sweep_dir = plan["sweep"], plan["sweep_dir"]
    study = optuna.create_study(
        storage=plan["storage"],
        study_name=sweep.study_name,
        direction=plan["direction"],
        pruner=studies.build_pruner(sweep, plan["cfg"].train.eval_every),
        load_if_exists=True,
    )
    if study.direction.name.lower() != plan["direction"]:
        made = study.direction.name.lower()
        print_error(
            "invalid sweep",
            f"sweep.study_name: study {sweep.study_name!r} in {plan['url']} was made to "
            f"{made}; this sweep would {plan['direction']} dev {plan['cfg'].task.metric}: another name",
        )
        raise SystemExit(2)
    # A rerun must not draw the first run's values again: the seed moves on by the trials already in the study.
    study.sampler = studies.build_sampler(sweep, plan["grid"], sweep.seed + len(study.trials))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "study.json").write_text(
        json.dumps({"storage": studies.display_url(plan["url"]), "study_name": sweep.study_name}, indent=1)
    )
    for failed, retry in studies.recover(study):
        console.print(
            f"trial {failed} was running when its sweep died: marked failed, its parameters are trial {retry}",
            highlight=False,
        )
    n_trials = sweep.n_trials
    if plan["grid"] is not None:
        n_trials = min(n_trials, math.prod(len(v) for v in plan["grid"].values()))  # every combination once
        outside = off_grid(study, plan["grid"])
        if outside:  # its finished trials would count towards this grid's combinations, which would never run
            print_error("invalid sweep", f"sweep.params: study {sweep.study_name!r} in {plan['url']} has trials "
                        f"outside this grid (e.g. {outside}); a changed grid is a new study: another "
                        "sweep.study_name")  # fmt: skip
            raise SystemExit(2)
    done = studies.finished(study)
    console.print(
        f"[bold]study[/] {sweep.study_name} in {studies.display_url(plan['url'])}: {done} of "
        f"{n_trials} trials finished; sampler {sweep.sampler}, pruner {sweep.pruner}, {sweep.n_jobs} at once"
    )
    runner = LocalTrials(plan) if isinstance(launcher, BasicLauncher) else LauncherTrials(plan, launcher)
    failures = runner.run(study, n_trials)
    summarize(study, sweep_dir)
    if failures >= sweep.max_failures:
        print_error(
            "sweep stopped",
            f"{failures} trials failed in this run (sweep.max_failures="
            f"{sweep.max_failures}); logs in their run dirs under {sweep_dir}. Rerun the command to go on.",
        )
        raise SystemExit(1)
    return study


def off_grid(study: Any, grid: dict[str, list]) -> str | None:
    """A finished trial's parameters that are not in `grid` (key=value), or None."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        for key, value in trial.params.items():
            if key not in grid or value not in grid[key]:
                return f"trial {trial.number}: {key}={value}"
    return None


def trial_overrides(plan: dict[str, Any], trial: Any) -> list[str]:
    from distrain.trainer.search.space import as_override

    run_dir = plan["sweep_dir"] / str(trial.number)
    return [*plan["fixed"], *(as_override(k, v) for k, v in trial.params.items()), f"run.dir={run_dir}",
            f"sweep.trial={trial.number}", f"sweep.storage={plan['url']}",
            f"sweep.study_name={plan['sweep'].study_name}"]  # fmt: skip


def outcome(run_dir: Path) -> tuple[str, float | None, str]:
    """(complete | pruned | fail, the objective, what happened) from the trial's run dir."""
    path = run_dir / run_files.SUMMARY
    if not path.exists():
        return "fail", None, f"no {run_files.SUMMARY} (logs: {run_dir / run_files.LOGS})"
    summary = json.loads(path.read_text())
    status, value = summary["status"], summary.get("best_metric")
    if status == run_files.PRUNED:
        return "pruned", value, summary.get("pruned", status)
    if not run_files.is_complete(status):
        return "fail", value, f"status {status!r}"
    if value is None:
        return "fail", None, "no dev evaluation: no metric to optimize"
    return "complete", value, status


def tell(study: Any, trial: Any, run_dir: Path, exit_code: int | None = 0) -> bool:
    """Tell the study how a trial's run ended; False when it failed."""
    from optuna.trial import TrialState

    from distrain.trainer.search.study import told

    state, value, what = outcome(run_dir) if exit_code == 0 else ("fail", None, f"exit code {exit_code}")
    if state == "complete":
        told(study, trial, value)
    elif state == "pruned":
        told(study, trial, state=TrialState.PRUNED)
    else:
        told(study, trial, state=TrialState.FAIL)
    shown = "-" if value is None else f"{value:.4g}"
    console.print(f"trial {trial.number} {state}: dev {shown} ({what}); {trial.params}", highlight=False)
    return state != "fail"


def ask(study: Any, plan: dict[str, Any]) -> Any:
    from distrain.trainer.search import study as studies

    trial = study.ask(plan["space"])
    trial.set_user_attr(studies.OWNER, studies.owner())
    return trial


class LocalTrials:
    """Trials as child processes `distrain train` on this machine, up to sweep.n_jobs at once."""

    def __init__(self, plan: dict[str, Any]):
        self.plan = plan
        sweep, cfg = plan["sweep"], plan["cfg"]
        self.extra = ["hydra.mode=RUN"]  # the child is one run, though hparams_search makes the command a sweep
        user_threads = any(o.startswith("launcher.threads_per_process=") for o in plan["fixed"])
        if sweep.n_jobs > 1 and not user_threads:
            cores = os.cpu_count() or 1
            per = max(1, cores // (sweep.n_jobs * cfg.launcher.nproc_per_node))
            self.extra.append(f"launcher.threads_per_process={per}")

    def start(self, trial: Any) -> subprocess.Popen:
        args = [sys.executable, "-m", "distrain.cli.main", "train", *trial_overrides(self.plan, trial), *self.extra]
        out = None
        if self.plan["sweep"].n_jobs > 1:  # one log per trial instead of interleaved lines
            out = open(self.plan["sweep_dir"] / f"trial_{trial.number}.log", "w")  # noqa: SIM115 (closed in run)
        console.print(f"trial {trial.number} started: {trial.params}", highlight=False)
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if out else None,
                                preexec_fn=_die_with_parent)  # fmt: skip

    def run(self, study: Any, n_trials: int) -> int:
        from distrain.trainer.search import study as studies

        sweep, failures = self.plan["sweep"], 0
        running: dict[int, tuple[Any, subprocess.Popen]] = {}
        # A shell starts a background job with SIGINT ignored, and Python then raises no KeyboardInterrupt: the
        # sweep must stop on it all the same (as `distrain train` does)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                while (len(running) < sweep.n_jobs and failures < sweep.max_failures
                       and studies.finished(study) + len(running) < n_trials):  # fmt: skip
                    trial = ask(study, self.plan)
                    running[trial.number] = (trial, self.start(trial))
                if not running:
                    return failures
                time.sleep(0.2)
                for number, (trial, process) in list(running.items()):
                    if process.poll() is not None:
                        del running[number]
                        if process.stdout:
                            process.stdout.close()
                        ok = tell(study, trial, self.plan["sweep_dir"] / str(number), process.returncode)
                        failures += not ok
        except KeyboardInterrupt:
            # The children write a checkpoint and stop: on the Ctrl-C they got too, or on their run dir's stop file
            # (the signal may have been sent to this process alone). Their trials are tried again.
            from optuna.trial import TrialState

            from distrain.trainer.config import run_files
            from distrain.trainer.search.study import told

            for number in running:
                run_dir = self.plan["sweep_dir"] / str(number)
                if run_dir.is_dir():  # a trial still composing its run has no dir: the Ctrl-C reached it, if any
                    (run_dir / run_files.STOP).touch()
            for number, (trial, process) in running.items():
                process.wait()
                told(study, trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={studies.RETRY_OF: number})
            console.print("interrupted: rerun the same command to continue the study", highlight=False)
            raise SystemExit(130) from None
        finally:
            signal.signal(signal.SIGINT, previous)


class LauncherTrials:
    """Trials through Hydra's configured launcher (hydra/launcher=distrain_slurm: SLURM jobs), sweep.n_jobs at
    once; each job's rank 0 reports to the shared study."""

    def __init__(self, plan: dict[str, Any], launcher: Any):
        self.plan, self.launcher = plan, launcher

    def run(self, study: Any, n_trials: int) -> int:
        from distrain.trainer.search import study as studies

        sweep, failures = self.plan["sweep"], 0
        while failures < sweep.max_failures:
            room = min(sweep.n_jobs, n_trials - studies.finished(study))
            if room <= 0:
                return failures
            batch = [ask(study, self.plan) for _ in range(room)]
            returns = self.launcher.launch([trial_overrides(self.plan, t) for t in batch],
                                           initial_job_idx=batch[0].number)  # fmt: skip
            for trial, ret in zip(batch, returns, strict=True):
                code = 0 if ret.status.name == "COMPLETED" else 1
                failures += not tell(study, trial, self.plan["sweep_dir"] / str(trial.number), code)
        return failures


def summarize(study: Any, sweep_dir: Path) -> None:
    """The best trial, printed and in <sweep dir>/optimization_results.yaml."""
    import yaml
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        console.print("no trial completed", highlight=False)
        return
    best = study.best_trial
    results = {"study_name": study.study_name, "best_trial": best.number, "best_value": best.value,
               "best_params": best.params, "run_dir": str(sweep_dir / str(best.number))}  # fmt: skip
    (sweep_dir / "optimization_results.yaml").write_text(yaml.safe_dump(results, sort_keys=False))
    console.print(f"best: trial {best.number}, dev {best.value:.4g}, {best.params}; `distrain report {sweep_dir}`",
                  highlight=False)  # fmt: skip
