"""The goals of issue #26, measured with the real `distrain train` sweeps (hparams_search=ner_optuna on the tiny BERT):

1. Crash and continue: a study of --kill-trials trials is SIGKILLed once --kill-after trials have finished (read from
   its storage), then the same command is rerun; the trial states before and after, from the study itself, and
   whether the study ends with exactly --kill-trials finished trials and no repeated parameter set.
2. Pruning: two studies of --prune-trials trials with the random sampler and the same seed (so the same parameter
   sets in the same order), sweep.pruner=asha and sweep.pruner=none: wall time and best dev metric of each.

    python scripts/sweep_bench.py [--kill-trials 8 --kill-after 3 --prune-trials 12 --steps 30 --eval-every 5]
                                  [--parts kill,prune] [--out DIR] [overrides ...]

Extra overrides go to every trial (e.g. data.cache_dir=/tmp/cache). Minutes on a CPU: every trial is a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.table import Table

from distrain.trainer.observe.reporting import make_console

console = make_console()
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DISTRAIN = shutil.which("distrain") or str(Path(sys.executable).parent / "distrain")


def base(args: argparse.Namespace) -> list[str]:
    return ["+debug=tiny", "hparams_search=ner_optuna", "task.metric=accuracy", "data.max_eval_samples=64",
            f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}",
            "optim.lr=tag(log, interval(1e-5, 1e-2))", "train.micro_batch_size=choice(8,16)",
            *args.overrides]  # fmt: skip


def load(sweep: Path) -> optuna.Study:
    return optuna.load_study(study_name="ner_optuna", storage=f"sqlite:///{sweep}/study.db")


def states(sweep: Path) -> list[str]:
    try:
        return [f"{t.number}:{t.state.name}" for t in load(sweep).trials]
    except Exception:  # not created yet
        return []


def kill_and_rerun(args: argparse.Namespace, out: Path) -> dict:
    sweep = out / "kill"
    command = [DISTRAIN, "train", *base(args), f"sweep.n_trials={args.kill_trials}", f"hydra.sweep.dir={sweep}"]
    started = time.perf_counter()
    with open(out / "kill-first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while first.poll() is None:
            now = states(sweep)
            if sum(s.endswith(("COMPLETE", "PRUNED")) for s in now) >= args.kill_after and any(
                "RUNNING" in s for s in now
            ):
                os.kill(first.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
        first.wait()
    before = states(sweep)
    with open(out / "kill-rerun.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    study = load(sweep)
    finished = [t for t in study.trials if t.state in FINISHED]
    return {"before": before, "after": states(sweep), "rerun exit code": code, "finished": len(finished),
            "distinct param sets": len({tuple(sorted(t.params.items())) for t in finished}),
            "wall s": round(time.perf_counter() - started, 1)}  # fmt: skip


def pruning(args: argparse.Namespace, out: Path, pruner: str) -> dict:
    sweep = out / f"prune-{pruner}"
    command = [DISTRAIN, "train", *base(args), f"sweep.n_trials={args.prune_trials}", "sweep.sampler=random",
               f"sweep.pruner={pruner}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    started = time.perf_counter()
    with open(out / f"prune-{pruner}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - started
    study = load(sweep)
    pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
    return {"pruner": pruner, "wall s": round(wall, 1), "best dev accuracy": round(study.best_value, 4),
            "best trial": study.best_trial.number, "pruned trials": pruned,
            "steps trained": sum(json.loads((sweep / str(t.number) / "summary.json").read_text())["step"]
                                 for t in study.trials)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-trials", type=int, default=8)
    parser.add_argument("--kill-after", type=int, default=3)
    parser.add_argument("--prune-trials", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--parts", default="kill,prune", help="which measurements: kill, prune or both")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"cores {os.cpu_count()}, output in {out}", highlight=False)

    parts = args.parts.split(",")
    kill = kill_and_rerun(args, out) if "kill" in parts else {}
    table = Table(title=f"kill after {args.kill_after} of {args.kill_trials} trials (SIGKILL), then rerun")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in kill.items():
        table.add_row(key, " ".join(value) if isinstance(value, list) else str(value))
    if kill:
        console.print(table)
    if "prune" not in parts:
        print(json.dumps({"kill": kill}))  # one line, whatever its length: the smoke test reads it
        return
    results = [pruning(args, out, "none"), pruning(args, out, "asha")]
    table = Table(title=f"{args.prune_trials} trials, random sampler seed 0, with and without ASHA")
    for column in results[0]:
        table.add_column(column)
    for row in results:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    ratio = results[1]["wall s"] / results[0]["wall s"]
    console.print(f"asha/none wall time {ratio:.2f}; best dev accuracy {results[1]['best dev accuracy']} vs "
                  f"{results[0]['best dev accuracy']}", highlight=False)  # fmt: skip
    print(json.dumps({"kill": kill, "pruning": results, "wall_ratio": round(ratio, 3)}))  # one line


if __name__ == "__main__":
    main()
