"""CoNLL-2003 side by side: Hugging Face Trainer vs distrain, same model, data, epochs, batch and learning rate.

    python scripts/bench_conll.py --data-dir ../shared/data/conll2003 [--epochs 3] [--max-train-samples N]

Runs, one after the other on this machine: the HF Trainer reference (scripts/hf_reference_ner.py under torchrun,
2 processes) and `distrain train +experiment=conll_ner data.label_subwords=first` (2 processes, labelled like the
reference), then `distrain eval` on the test split.
Prints test F1, token accuracy, wall time and real tokens/s of both, and their ratios; writes bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from distrain.trainer.reporting import make_console

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def timed(command: list[str], log: Path, env: dict | None = None) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="runs/bench_conll")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--skip-hf", action="store_true", help="reuse <out>/hf/result.json")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).resolve())
    console = make_console()

    hf_dir = out / "hf"
    if not args.skip_hf:
        hf_cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(HERE / "hf_reference_ner.py"),
                  f"--data-dir={data_dir}", f"--out={hf_dir}", f"--epochs={args.epochs}", f"--batch={args.batch}",
                  f"--lr={args.lr}"]  # fmt: skip
        if args.max_train_samples:
            hf_cmd.append(f"--max-train-samples={args.max_train_samples}")
        hf_dir.mkdir(exist_ok=True)
        console.print("running the HF Trainer reference ...")
        hf_wall = timed(hf_cmd, out / "hf.log", env={**os.environ, "OMP_NUM_THREADS": "1"})
        (hf_dir / "wall.json").write_text(json.dumps({"wall_seconds": hf_wall}))
    hf = json.loads((hf_dir / "result.json").read_text())
    hf_wall = json.loads((hf_dir / "wall.json").read_text())["wall_seconds"]

    run = out / "distrain"
    train_cmd = [str(BIN / "distrain"), "train", "+experiment=conll_ner", f"data.dir={data_dir}",
                 "launcher.nproc_per_node=2", f"train.epochs={args.epochs}", f"train.micro_batch_size={args.batch}",
                 f"optim.lr={args.lr}", "train.export_weights=last", f"run.dir={run}",
                 "data.label_subwords=first"]  # fmt: skip
    # data.label_subwords=first: labelled as the HF reference is (first sub-words only), so the F1s compare
    if args.max_train_samples:
        train_cmd.append(f"data.max_train_samples={args.max_train_samples}")
    console.print("running distrain ...")
    distrain_wall = timed(train_cmd, out / "distrain.log")
    timed([str(BIN / "distrain"), "eval", f"ckpt={run / 'export'}", "split=test"], out / "distrain_eval.log")
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "export" / "eval_test.json").read_text())
    dev = [json.loads(x)["f1"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    ours = {
        "test_f1": report["f1"],
        "test_accuracy": report["accuracy"],
        "dev_f1": dev,
        "wall_seconds": distrain_wall,
        "real_tokens_per_s": summary["real_tokens"] / summary["step_seconds"],
        "steps": summary["step"],
    }
    theirs = {**hf, "wall_seconds": hf_wall}
    (out / "bench.json").write_text(json.dumps({"hf_trainer": theirs, "distrain": ours}, indent=1))

    table = Table(title=f"CoNLL-2003, MiniLM, 2 processes, {args.epochs} epochs, {args.batch}/rank, lr {args.lr}")
    for column in ("", "HF Trainer", "distrain", "distrain / HF"):
        table.add_column(column, justify="right")
    rows = (("test_f1", ".4f"), ("test_accuracy", ".4f"), ("wall_seconds", ".0f"), ("real_tokens_per_s", ".0f"))
    for key, fmt in rows:
        ratio = f"{ours[key] / theirs[key]:.3f}" if theirs[key] else "-"  # tiny smoke runs can score 0
        table.add_row(key, format(theirs[key], fmt), format(ours[key], fmt), ratio)
    table.add_row("steps", str(theirs["steps"]), str(ours["steps"]), "")
    console.print(table)
    console.print(f"test F1 difference (distrain - HF): {100 * (ours['test_f1'] - theirs['test_f1']):+.2f} points")


if __name__ == "__main__":
    main()
