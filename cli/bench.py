"""`distrain bench`: distrain vs Hugging Face Trainer on the same cores, data, model, batch and learning rate.

    distrain bench [--data-dir DIR] [--repeats 3] [--steps 60 [--warmup 5] | --samples N | --full]
                   [--precision fp32|bf16] [--out DIR] [overrides ...]

Training throughput: CoNLL-2003 NER, 2 processes (gloo), length-grouped batches of --batch per rank, at
--precision on both sides (bf16: distrain's precision=bf16, the Trainer's bf16=True; both autocast). Each
repetition runs `distrain train +experiment=conll_ner` and the HF Trainer peer (cli/bench_hf.py under torchrun),
one after the other (interleaved, so that the machine's load hits both), over the same window: --steps optimizer
steps after --warmup steps that are not counted (both sides' first steps carry one-off costs, the Trainer's more
than distrain's), or one epoch of the first --samples training sentences, or with --full 3 epochs and then each
one's test F1. Both count real (non-padding) tokens of every rank over the time of the counted training steps,
data loading included, logging, evaluation and checkpoints excluded. Trailing overrides go to `distrain train`
(e.g. launcher.threads_per_process=2).
Start-up: a tiny 2-rank distrain run (1 step, 16 eval samples, checkpoint, export); the time each job after the
first adds to a sweep of such runs (`distrain train -m`, one launcher for all its jobs); a bare torchrun of a
trivial gloo job; interleaved (--startup-repeats, default --repeats; 0 skips it).
`distrain bench inference --ckpt DIR`: inference latency of torch vs ONNX fp32/int8 (cli/bench_inference.py).
Prints the date, torch and transformers versions and the machine's load beside medians, min-max and ratios, and
warns when other processes' load made the figures unreliable; writes <out>/bench.json with the machine, the
conditions and every repetition's figures.
The data folder (train.txt, dev.txt, test.txt): --data-dir, else $DISTRAIN_CONLL2003_DIR, else
../shared/data/conll2003.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from distrain.cli.console import console, print_error
from distrain.trainer.config import run_files
from distrain.trainer.observe.reporting import read_metrics

BIN = Path(sys.executable).parent
SPLITS = ("train.txt", "dev.txt", "test.txt")
SWEEP_JOBS = 4  # of the start-up sweep
FULL_EPOCHS = 3  # --full: epochs of both sides (distrain passes it over conll_ner's own default)
BUSY_LIMIT = 0.5  # other processes' load, in cores per core, above which the figures are flagged unreliable
BARE_JOB = "import torch.distributed as d; d.init_process_group('gloo'); d.barrier(); d.destroy_process_group()"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="distrain bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=os.environ.get("DISTRAIN_CONLL2003_DIR", "../shared/data/conll2003"))
    parser.add_argument("--out", default=None, help="default: runs/bench/<time>")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (default 3)")
    window = parser.add_mutually_exclusive_group()
    window.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="with --steps: steps run first and not counted, on both sides (default 5)")  # fmt: skip
    window.add_argument("--samples", type=int, default=None, help="one epoch of the first N training sentences")
    window.add_argument(
        "--full", action="store_true", help=f"{FULL_EPOCHS} epochs on all the data, then the test F1 of each"
    )
    parser.add_argument("--model", default="minilm", help="a distrain model config (default minilm)")
    parser.add_argument("--batch", type=int, default=16, help="per rank (default 16)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--nproc", type=int, default=2, help="processes of each run (default 2)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="of both sides (default fp32)")
    parser.add_argument("--startup-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("overrides", nargs="*", help="passed to distrain train")
    args = parser.parse_args(argv)
    if args.steps is None and args.samples is None and not args.full:
        args.steps = 60
    counts = {k: getattr(args, k) for k in ("repeats", "steps", "samples", "batch", "nproc")}
    problems = [f"--{k}: expected a positive number, got {v}" for k, v in counts.items() if v is not None and v < 1]
    if args.warmup < 0:
        problems.append(f"--warmup: expected a number >= 0, got {args.warmup}")
    if not args.steps:
        args.warmup = 0  # an epoch or three: their first steps weigh little
    data = Path(args.data_dir).expanduser().resolve()
    missing = [name for name in SPLITS if not (data / name).is_file()]
    if missing:
        problems.append(
            f"--data-dir: {data} lacks {', '.join(missing)} (expected CoNLL-2003's {', '.join(SPLITS)}); pass "
            "--data-dir or set DISTRAIN_CONLL2003_DIR"
        )
    if problems:
        print_error("invalid argument", "\n".join(problems))
        raise SystemExit(2)
    args.data_dir = data
    return args


def run(command: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run to completion with its output in `log`; the wall seconds. Exit 1 with the log's tail if it fails."""
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        print_error("benchmark run failed", f"{' '.join(command)} exited {code}; its output: {log}\n{tail}")
        raise SystemExit(1)
    return time.perf_counter() - started


def run_distrain(args: argparse.Namespace, run_dir: Path) -> dict:
    command = [str(BIN / "distrain"), "train", "+experiment=conll_ner", f"data.dir={args.data_dir}",
               f"model={args.model}", f"launcher.nproc_per_node={args.nproc}", f"train.micro_batch_size={args.batch}",
               f"optim.lr={args.lr}", "data.label_subwords=first", "logger=[]", f"run.dir={run_dir}",
               "train.export_weights=last", f"precision={args.precision}"]  # fmt: skip
    # data.label_subwords=first: labelled as the HF peer is (first sub-words only), so the F1s compare
    if args.steps:  # a record at the end of the warm-up, so that the steps after it can be counted alone
        command += [f"train.max_steps={args.warmup + args.steps}", f"train.log_every={args.warmup or args.steps}",
                    "data.max_eval_samples=64"]  # fmt: skip
    elif args.samples:
        command += [f"data.max_train_samples={args.samples}", "train.epochs=1", "data.max_eval_samples=64"]
    else:
        command.append(f"train.epochs={FULL_EPOCHS}")  # conll_ner's own default differs
    wall = run(command + args.overrides, run_dir.with_suffix(".log"))
    summary = json.loads((run_dir / run_files.SUMMARY).read_text())
    records = read_metrics(run_dir / run_files.METRICS)
    counted = [r for r in records if r["kind"] == "train" and r["step"] > args.warmup]
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in counted)
    positions = sum(r["tokens_per_s"] * r["seconds"] / (1.0 - r["padding"]) for r in counted)
    seconds = sum(r["seconds"] for r in counted)
    result = {
        "real_tokens": tokens,
        "step_seconds": seconds,
        "real_tokens_per_s": tokens / seconds,
        "padding": 1.0 - tokens / positions,  # of the counted steps' positions
        "steps": summary["step"],
        "counted_steps": summary["step"] - args.warmup,
        "all_steps_real_tokens_per_s": summary["real_tokens"] / summary["step_seconds"],
        "wall_seconds": wall,
    }
    if args.full:
        run(
            [str(BIN / "distrain"), "eval", f"ckpt={run_dir / 'export'}", "split=test"],
            run_dir.with_suffix(".eval.log"),
        )
        report = json.loads((run_dir / f"{run_files.EXPORT}_eval" / "eval_test.json").read_text())
        result["test_f1"], result["test_accuracy"] = report["f1"], report["accuracy"]
    return result


def threads(nproc: int) -> str:
    from distrain.cli.launch import default_threads  # imports torch: not at `distrain bench --help`

    return str(default_threads(nproc))  # what `distrain train` gives each worker


def torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}"]


def run_hf(args: argparse.Namespace, out: Path) -> dict:
    command = [*torchrun(args.nproc), "-m", "distrain.cli.bench_hf", f"--data-dir={args.data_dir}", f"--out={out}",
               f"--model={args.model}", f"--batch={args.batch}", f"--lr={args.lr}"]  # fmt: skip
    if args.precision == "bf16":
        command.append("--bf16")
    if args.steps:
        command += [f"--steps={args.warmup + args.steps}", f"--warmup={args.warmup}"]
    elif args.samples:
        command += [f"--max-train-samples={args.samples}", "--epochs=1"]
    else:
        command += [f"--epochs={FULL_EPOCHS}", "--test"]
    wall = run(command, out.with_suffix(".log"), env={**os.environ, "OMP_NUM_THREADS": threads(args.nproc)})
    return {**json.loads((out / "result.json").read_text()), "wall_seconds": wall}


def tiny_overrides(args: argparse.Namespace) -> list[str]:
    return ["+debug=tiny", "parallel=ddp", f"launcher.nproc_per_node={args.nproc}", "train.max_steps=1",
            "data.max_eval_samples=16", "logger=[]"]  # fmt: skip


def run_tiny(args: argparse.Namespace, run_dir: Path) -> dict:
    command = [str(BIN / "distrain"), "train", *tiny_overrides(args), f"run.dir={run_dir}"]
    return {"seconds": run(command, run_dir.with_suffix(".log"))}


def run_sweep(args: argparse.Namespace, sweep_dir: Path) -> dict:
    """A Hydra sweep of SWEEP_JOBS tiny runs in one `distrain train -m`: "seconds" is the median time a job after
    the first adds (from one job's summary.json to the next's), when the launcher has its imports already."""
    seeds = ",".join(str(seed) for seed in range(1, SWEEP_JOBS + 1))
    command = [str(BIN / "distrain"), "train", "-m", *tiny_overrides(args), f"train.seed={seeds}",
               f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip
    wall = run(command, sweep_dir.with_suffix(".log"))
    ends = [(sweep_dir / str(job) / run_files.SUMMARY).stat().st_mtime for job in range(SWEEP_JOBS)]
    jobs = [end - previous for previous, end in itertools.pairwise(ends)]
    return {"seconds": statistics.median(jobs), "jobs_after_the_first": jobs, "sweep_seconds": wall}


def run_bare(args: argparse.Namespace, out: Path) -> dict:
    command = [*torchrun(args.nproc), "--no-python", sys.executable, "-c", BARE_JOB]
    return {"seconds": run(command, out.with_suffix(".log"))}


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict:
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []  # fmt: skip
    return {
        "cpu_model": models[0] if models else platform.processor(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cpu_seconds() -> dict[str, float] | None:
    """Busy CPU seconds of the whole machine (time the hypervisor stole included) and of this process with its
    finished children (torchrun waits for its workers, so theirs are counted), from Linux's /proc/stat."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.read_text().split()[1:9])
    ours = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "machine": (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
        "ours": sum(usage.ru_utime + usage.ru_stime for usage in ours),
        "wall": time.monotonic(),
    }


def load_report(start: dict, cores: int) -> dict:
    """The load the figures were measured under: load averages before and after, the cores other processes kept
    busy on average meanwhile (the machine's busy time minus ours: the load average at the end counts our own
    runs, which use every core), and a warning when the others' load makes the figures unreliable. The warning
    goes by the others' cores where /proc/stat gives them: a 1-minute load average still counts a job that ended
    just before the bench (it warned on an idle machine after one)."""
    report: dict = {"load_average_start": start["load_average"], "load_average_end": os.getloadavg()}
    end = cpu_seconds()
    if start["cpu"] and end:
        busy = (end["machine"] - start["cpu"]["machine"]) - (end["ours"] - start["cpu"]["ours"])
        report["other_processes_cores"] = max(0.0, busy / (end["wall"] - start["cpu"]["wall"]))
    limit = cores * BUSY_LIMIT
    causes = []
    if "other_processes_cores" in report:  # measured over the runs: what the lagging load average only hints at
        if report["other_processes_cores"] > limit:
            causes.append(f"other processes kept {report['other_processes_cores']:.2f} cores busy during them")
    elif start["load_average"][0] > limit:  # no /proc/stat: the load average before is all there is
        causes.append(f"load average {start['load_average'][0]:.2f} before the runs")
    if causes:
        report["warning"] = (
            f"{' and '.join(causes)}, over {limit:g} ({BUSY_LIMIT:g} x {cores} cores): the figures are unreliable "
            "(the absolute ones low and noisy; the ratio less so, as both sides were interleaved); rerun on an idle "
            "machine before quoting them"
        )
    return report


def interleaved(pairs: dict, repeats: int, out: Path, key: str) -> dict[str, list[dict]]:
    """Each side once per round, round after round; progress on the console."""
    results: dict[str, list[dict]] = {name: [] for name in pairs}
    for i in range(repeats):
        for name, fn in pairs.items():
            console.print(f"[{i + 1}/{repeats}] {name} ...", end=" ", highlight=False)
            result = fn(out / f"{name}_{i + 1}")
            results[name].append(result)
            figure = f"{result[key]:.1f} tokens/s" if key == "real_tokens_per_s" else f"{result[key]:.1f} s"
            console.print(figure, highlight=False)
    return results


def main() -> None:
    if sys.argv[1:2] == ["inference"]:  # `distrain bench inference ...`: latency of torch vs ONNX (bench_inference.py)
        from distrain.cli import bench_inference

        bench_inference.main(sys.argv[2:])
        return
    args = parse_args(sys.argv[1:])
    out = Path(args.out or f"runs/bench/{time.strftime('%Y-%m-%d_%H-%M-%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    full = f"full ({FULL_EPOCHS} epochs)"
    window = full if args.full else f"{args.samples} samples"
    if args.steps:
        window = f"{args.steps} steps after {args.warmup}"
    started = {"load_average": os.getloadavg(), "cpu": cpu_seconds()}
    report: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": {"data_dir": str(args.data_dir), "model": args.model, "nproc": args.nproc, "batch": args.batch,
                     "lr": args.lr, "window": window, "precision": args.precision, "repeats": args.repeats,
                     "overrides": args.overrides},
    }  # fmt: skip
    console.print(f"{conditions(report)}; load average {fmt_load(started['load_average'])}", highlight=False)
    console.print(f"training throughput: CoNLL-2003, {args.model}, {args.nproc} processes, {window}, {args.precision}, "
                  f"{args.batch}/rank, {args.repeats} runs each, interleaved", highlight=False)  # fmt: skip
    sides = {"distrain": lambda d: run_distrain(args, d), "hf_trainer": lambda d: run_hf(args, d)}
    runs = interleaved(sides, args.repeats, out, "real_tokens_per_s")
    throughput = {name: {**stats([r["real_tokens_per_s"] for r in rs]), "runs": rs} for name, rs in runs.items()}
    throughput["ratio"] = throughput["distrain"]["median"] / throughput["hf_trainer"]["median"]
    report["throughput"] = throughput
    startup_repeats = args.repeats if args.startup_repeats is None else args.startup_repeats
    if startup_repeats:
        console.print(f"start-up: a tiny {args.nproc}-rank distrain run, a job of a sweep of {SWEEP_JOBS} after its "
                      "first, and a bare torchrun of a trivial gloo job", highlight=False)  # fmt: skip
        sides = {"distrain_tiny": lambda d: run_tiny(args, d), "distrain_sweep_job": lambda d: run_sweep(args, d),
                 "torchrun_bare": lambda d: run_bare(args, d)}  # fmt: skip
        runs = interleaved(sides, startup_repeats, out, "seconds")
        startup = {name: {**stats([r["seconds"] for r in rs]), "runs": rs} for name, rs in runs.items()}
        startup["difference_seconds"] = startup["distrain_tiny"]["median"] - startup["torchrun_bare"]["median"]
        report["startup"] = startup
    report["load"] = load_report(started, report["machine"]["cores"])
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print_report(report, out)


def conditions(report: dict) -> str:
    m = report["machine"]
    return (f"{report['date']}, torch {m['torch']}, transformers {m['transformers']}, {m['cores']} cores "
            f"({m['cpu_model']})")  # fmt: skip


def fmt_load(load: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min)"


def print_report(report: dict, out: Path) -> None:
    from rich.table import Table

    t = report["throughput"]
    settings = report["settings"]
    table = Table(title=f"real tokens/s over the training steps ({settings['window']}, {settings['precision']})")
    for column in ("", "median", "min - max", "runs", "padding"):
        table.add_column(column, justify="right")
    for name in ("distrain", "hf_trainer"):
        s = t[name]
        padding = ", ".join(sorted({f"{r['padding']:.1%}" for r in s["runs"]}))  # the same batches in every run
        table.add_row(name, f"{s['median']:.1f}", f"{s['min']:.1f} - {s['max']:.1f}", str(s["n"]), padding)
    table.add_row("distrain / HF", f"{t['ratio']:.3f}", "", "", "")
    console.print(table)
    if "test_f1" in t["distrain"]["runs"][0]:
        for name in ("distrain", "hf_trainer"):
            f1s = ", ".join(f"{r['test_f1']:.4f}" for r in t[name]["runs"])
            console.print(f"test F1 {name}: {f1s}", highlight=False)
    if "startup" in report:
        s = report["startup"]
        table = Table(title="start-up: wall seconds")
        for column in ("", "median", "min - max", "runs"):
            table.add_column(column, justify="right")
        for name in ("distrain_tiny", "distrain_sweep_job", "torchrun_bare"):
            table.add_row(name, f"{s[name]['median']:.2f}", f"{s[name]['min']:.2f} - {s[name]['max']:.2f}",
                          str(s[name]["n"]))  # fmt: skip
        table.add_row("tiny run - bare torchrun", f"{s['difference_seconds']:.2f}", "", "")
        console.print(table)
    load = report["load"]
    others = load.get("other_processes_cores")
    console.print(f"distrain / HF {t['ratio']:.3f} at {settings['precision']}: {conditions(report)}; load average "
                  f"before {fmt_load(load['load_average_start'])}, after {fmt_load(load['load_average_end'])}"
                  + (f"; other processes kept {others:.2f} cores busy on average" if others is not None else ""),
                  highlight=False)  # fmt: skip
    if "warning" in load:
        console.print(f"[yellow]warning:[/yellow] {load['warning']}", highlight=False)
    console.print(f"written: {out / 'bench.json'}", highlight=False)


if __name__ == "__main__":
    main()
