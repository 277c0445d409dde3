"""Real tokens/s with and without data.pack_examples, interleaved (off, on, off, on, ...: load hits both alike).

    python scripts/bench_packing.py [--repeats 3] [--out DIR] +experiment=conll_ner data.dir=... train.max_steps=40

Each run is a `distrain train` with the given overrides, a train record every 5 steps and a dev evaluation at the
end; its figure is the median tokens_per_s (real tokens of all ranks per second of training steps) of the records
after step 5 (the first steps warm up). The table shows the median over the repeats of each side, their ratio,
the padding fraction and the dev metric of each run; everything goes to <out>/bench_packing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES = {"padded": "data.pack_examples=false", "packed": "data.pack_examples=true"}


def run(overrides: list[str], run_dir: Path) -> dict:
    command = [str(Path(sys.executable).parent / "distrain"), "train", *overrides, "train.log_every=5",
               "train.save_every=0", f"run.dir={run_dir}"]  # fmt: skip
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr}")
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    train = [r for r in records if r["kind"] == "train" and r["step"] > 5]
    dev = [r for r in records if r["kind"] == "eval" and r.get("split") == "dev"]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in train),
        "padding": statistics.median(r["padding"] for r in train),
        "dev": {k: v for k, v in dev[-1].items() if isinstance(v, float)} if dev else {},
        "seconds": time.time() - started,
        "load": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(f"runs/bench_packing/{time.strftime('%Y-%m-%d_%H-%M-%S')}"))
    args, overrides = parser.parse_known_args()
    out = args.out.resolve()
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        for side, setting in SIDES.items():
            runs[side].append(run([*overrides, setting], out / f"{side}_{repeat}"))
            print(f"{side} {repeat}: {json.dumps(runs[side][-1])}", flush=True)
    medians = {side: statistics.median(r["tokens_per_s"] for r in rs) for side, rs in runs.items()}
    summary = {"command": overrides, "repeats": args.repeats, "median_tokens_per_s": medians,
               "packed_over_padded": medians["packed"] / medians["padded"], "runs": runs}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_packing.json").write_text(json.dumps(summary, indent=1))
    print(f"real tokens/s, median of {args.repeats}: padded {medians['padded']:.1f}, packed {medians['packed']:.1f}, "
          f"packed/padded {summary['packed_over_padded']:.3f}; {out / 'bench_packing.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
