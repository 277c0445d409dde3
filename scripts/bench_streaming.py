"""Measure streaming (data.streaming=true) on a generated corpus: peak RSS per rank on a big corpus vs a small one,
time to the first step (streaming vs map mode, which tokenizes everything first), stop/resume vs uninterrupted
losses, and the realised proportions of a 0.7/0.3 mixture over 1,000 samples.

    nice python scripts/bench_streaming.py --out /tmp/bench-streaming            # 1 GB vs 10 MB, 300 steps
    python scripts/bench_streaming.py --out /tmp/b --smoke                         # tiny sizes: a smoke test

The corpora are jsonl files of generated text written under --out (never into the repo). Every run is a real
`distrain train` (tiny Llama, clm, packing, 2 processes with ddp; the stream runs in each rank, data.num_workers=0,
so the rank's peak RSS covers it). Map mode is measured on the small corpus only (it tokenizes the whole training
split before step 1) and extrapolated to the big one in proportion to the bytes. Results: <out>/bench.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from distrain.trainer.observe.reporting import read_metrics

DISTRAIN = str(Path(sys.executable).parent / "distrain")
WORDS = [
    "the",
    "king",
    "queen",
    "sword",
    "crown",
    "castle",
    "night",
    "day",
    "love",
    "death",
    "river",
    "ship",
    "storm",
    "friend",
    "enemy",
    "gold",
    "hath",
    "thou",
    "shall",
    "fair",
    "sweet",
    "heart",
    "blood",
    "honour",
    "lord",
    "war",
]


def write_corpus(folder: Path, megabytes: float, shards: int, seed: int, column: str = "text") -> Path:
    """`shards` jsonl files of about `megabytes` in total, plus dev.jsonl (100 documents)."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(10, 200))) + "." for _ in range(5000)]
    lines = [json.dumps({column: doc}) + "\n" for doc in docs]
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = megabytes * 2**20 / shards
    for shard in range(shards):
        with open(folder / f"train-{shard:03d}.jsonl", "w") as f:
            written = 0
            while written < per_shard:
                chunk = "".join(rng.choices(lines, k=max(1, min(1000, int(per_shard / 2000)))))
                f.write(chunk)
                written += len(chunk)
    (folder / "dev.jsonl").write_text("".join(lines[:100]))
    return folder


def overrides(corpus: Path, run: Path, steps: int, streaming: bool, cache: Path) -> list[str]:
    return ["+debug=tiny", "model=llama_tiny", "task=clm", "task.metric=perplexity", "data=custom",
            f"data.dir={corpus}", "~data.files.test", "data.files.train=train-*.jsonl", "data.files.dev=dev.jsonl",
            "data.max_train_samples=null", "data.max_eval_samples=null", "data.packing=true", "data.max_length=64",
            f"data.streaming={str(streaming).lower()}", "data.num_workers=0", f"data.cache_dir={cache}",
            "parallel=ddp", "launcher.nproc_per_node=2", "train.micro_batch_size=8", f"train.max_steps={steps}",
            "train.log_every=1", "train.eval_every=0", "logger=[]", f"run.dir={run}"]  # fmt: skip


def train(args: list[str], run: Path) -> dict:
    """Run `distrain train`; the seconds from the launch to the first train record, and the records."""
    started = time.perf_counter()
    first_step = None
    metrics = run / "metrics.jsonl"
    # The output goes to a file, not a pipe: an unread pipe fills up and blocks rank 0's console.
    with open(run.with_name(f"{run.name}.log"), "a") as log:
        process = subprocess.Popen([DISTRAIN, "train", *args], stdout=log, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            if first_step is None and metrics.is_file() and '"kind": "train"' in metrics.read_text():
                first_step = time.perf_counter() - started
            time.sleep(0.1)
    if process.returncode != 0:
        raise SystemExit(f"distrain train {' '.join(args)} exited {process.returncode}: see {log.name}")
    records = read_metrics(metrics)
    train_records = [r for r in records if r["kind"] == "train"]
    return {
        "seconds_to_first_step": first_step,
        "wall_seconds": time.perf_counter() - started,
        "losses": {r["step"]: r["loss"] for r in train_records},
        "peak_rss_per_rank": max((r["max_memory_bytes"] for r in train_records), key=max),
        "last": train_records[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--big-mb", type=float, default=1024)
    parser.add_argument("--small-mb", type=float, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="tiny corpora and steps (a test of the script)")
    parser.add_argument("--parts", default="map,resume,mixture", help="besides RSS: map,resume,mixture")
    a = parser.parse_args()
    if a.smoke:
        a.big_mb, a.small_mb, a.steps = 4, 0.5, 6
    parts, out = set(a.parts.split(",")), a.out
    shutil.rmtree(out, ignore_errors=True)
    big = write_corpus(out / "big", a.big_mb, shards=16, seed=0)
    small = write_corpus(out / "small", a.small_mb, shards=1, seed=0)
    cache = out / "cache"
    result: dict = {"big_bytes": sum(p.stat().st_size for p in big.glob("train-*")),
                    "small_bytes": sum(p.stat().st_size for p in small.glob("train-*"))}  # fmt: skip
    runs = {name: train(overrides(corpus, out / name, a.steps, True, cache), out / name)
            for name, corpus in (("stream_big", big), ("stream_small", small))}  # fmt: skip
    result["cache_written"] = cache.exists()
    result["rss_ratio_big_over_small"] = max(
        b / s for b, s in zip(runs["stream_big"]["peak_rss_per_rank"], runs["stream_small"]["peak_rss_per_rank"],
                              strict=True)
    )  # fmt: skip
    if "map" in parts:
        runs["map_small"] = train(overrides(small, out / "map_small", a.steps, False, cache), out / "map_small")
        # Map mode tokenizes the whole split before step 1: extrapolate that preprocessing time by bytes.
        startup = runs["stream_small"]["seconds_to_first_step"]
        preprocessing = runs["map_small"]["seconds_to_first_step"] - startup
        ratio = result["big_bytes"] / result["small_bytes"]
        result["map_big_seconds_to_first_step_extrapolated"] = startup + preprocessing * ratio
    for name, run in runs.items():
        result[name] = {k: run[k] for k in ("seconds_to_first_step", "wall_seconds", "peak_rss_per_rank")}
    if "resume" in parts:  # stop at half, rerun: the losses of the uninterrupted stream_big
        resumed = out / "stream_big_resumed"
        train([*overrides(big, resumed, a.steps, True, cache), f"train.stop_at_step={max(a.steps // 2, 1)}"], resumed)
        rerun = train(overrides(big, resumed, a.steps, True, cache), resumed)
        reference = runs["stream_big"]["losses"]
        result["resume_max_abs_loss_diff"] = max(abs(rerun["losses"][s] - reference[s]) for s in reference)
        result["resume_steps_compared"] = len(reference)
    if "mixture" in parts:  # a 0.7/0.3 mixture over 1,000 samples: 1 process, 100 steps of 10
        mix = out / "mixture"
        mixture = (f"data.mixture=[{{name: a, weight: 0.7, dir: {small}, files: 'train-*.jsonl'}},"
                   f"{{name: b, weight: 0.3, dir: {big}, files: 'train-*.jsonl'}}]")  # fmt: skip
        mixed = train([*overrides(small, mix, 100, True, cache), mixture, "~data.files.train", "parallel=single",
                       "launcher.nproc_per_node=1", "train.micro_batch_size=10"], mix)  # fmt: skip
        counts = mixed["last"]["samples_by_source"]
        result["mixture_counts"] = counts
        result["mixture_proportions"] = {k: v / sum(counts.values()) for k, v in counts.items()}
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
