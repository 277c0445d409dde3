"""`distrain bench inference --ckpt DIR`: inference latency of torch fp32 eager, ONNX fp32 and ONNX int8 (dynamic)
on the same dev inputs.

    distrain bench inference --ckpt <run dir | checkpoint | export | ONNX export> [--threads 2] [--repeats 5]
                             [--batches 16] [--out FILE]

Each model runs --batches batches of 1 and of 8 dev examples (padded to the batch's longest, the data's
max_length at most) with torch and ONNX Runtime pinned to --threads intra-op threads; the three models take turns
(interleaved) for --repeats repetitions, so the machine's load hits all of them. Per model and batch size: the
medians over repetitions of p50 and p95 latency and of sentences/s. The ONNX graphs are exported into a temporary
folder (an ONNX export given as --ckpt is used as is for its own precision, and its metadata and model card get the
figures). Writes JSON (--out, default <weights>/bench_inference.json) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distrain.cli.bench import cpu_seconds, load_report
from distrain.cli.console import console, print_error
from distrain.trainer import strict_json
from distrain.trainer.errors import UserError

SIZES = (1, 8)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="distrain bench inference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="a run dir, checkpoint, export or ONNX export folder")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and ONNX Runtime")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--batches", type=int, default=16, help="timed batches per size and repetition")
    parser.add_argument("--out", default=None, help="the JSON file; default: <weights>/bench_inference.json")
    return parser.parse_args(argv)


def dev_batches(task: Any, dataset: Any, size: int, count: int) -> list[dict[str, Any]]:
    collate = task.collator(train=False)
    columns = [k for k in task.loader_columns if k in dataset.column_names]
    out = []
    for b in range(count):
        rows = [dataset[(b * size + i) % len(dataset)] for i in range(size)]
        batch = collate([{c: r[c] for c in columns} for r in rows])
        out.append({k: v for k, v in batch.items() if k in task.model_inputs})
    return out


def measure(call: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
    call(batches[0])  # warm-up (first-run allocations, ORT's lazy initialisation)
    times = []
    for batch in batches:
        start = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - start)
    times.sort()
    sentences = sum(int(b["input_ids"].shape[0]) for b in batches)
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return {"p50_ms": 1e3 * statistics.median(times), "p95_ms": 1e3 * p95, "sentences_per_s": sentences / sum(times)}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    import torch

    from distrain.trainer.export.onnx import GRAPH, METADATA, export_graph, ort_model, quantize, read_metadata
    from distrain.trainer.inference.load import load_for_inference, locate

    started = {"load_average": os.getloadavg(), "cpu": cpu_seconds()}  # the whole bench: seconds, not a call's ms
    given = locate(Path(args.ckpt).expanduser().resolve())
    onnx_folder = given.path if given.kind == "onnx" else None
    meta = read_metadata(onnx_folder) if onnx_folder else None
    weights = locate(Path(meta["source"])) if meta else given
    torch.set_num_threads(args.threads)
    cfg, env, _, task, model = load_for_inference(weights)
    if str(task.name) not in ("ner", "classify", "mlm"):
        raise UserError(f"task {task.name}: bench inference covers the encoder tasks (ner, classify, mlm)")
    dev = task.prepare(env).splits["dev"]
    with tempfile.TemporaryDirectory(prefix="distrain-bench-") as tmp:
        graphs = {"onnx_fp32": Path(tmp) / "fp32" / GRAPH, "onnx_int8": Path(tmp) / "int8" / GRAPH}
        if meta:  # the folder's own graph stands for its precision
            graphs[f"onnx_{meta['precision']}"] = onnx_folder / GRAPH
        if not graphs["onnx_fp32"].is_file():
            graphs["onnx_fp32"].parent.mkdir(parents=True)
            sample = dev_batches(task, dev, 2, 1)[0]
            export_graph(model, dict(task.forward_kwargs), sample, graphs["onnx_fp32"])
        if not graphs["onnx_int8"].is_file():
            graphs["onnx_int8"].parent.mkdir(parents=True)
            quantize(graphs["onnx_fp32"], graphs["onnx_int8"])
        models: dict[str, Any] = {"torch_fp32": model}
        models.update({name: ort_model(path, model.config, args.threads) for name, path in graphs.items()})

        def caller(m: Any) -> Any:
            def call(batch: dict[str, Any]) -> Any:
                with torch.inference_mode():
                    return m(**batch, **(task.forward_kwargs if m is model else {})).logits

            return call

        inputs = {size: dev_batches(task, dev, size, args.batches) for size in SIZES}
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for size in SIZES:
                for name, m in models.items():  # interleaved: every model in each repetition
                    runs.setdefault((name, size), []).append(measure(caller(m), inputs[size]))
        load = load_report(started, os.cpu_count() or 1)
    results = [{"model": name, "batch": size, **{k: statistics.median(r[k] for r in reps) for k in reps[0]}}
               for (name, size), reps in runs.items()]  # fmt: skip
    results.sort(key=lambda r: (r["batch"], list(models).index(r["model"])))
    lengths = [int(b["input_ids"].shape[1]) for size in SIZES for b in inputs[size]]
    report = {
        "date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
        "threads": args.threads, "repeats": args.repeats, "batches": args.batches,
        "seq_len": f"{min(lengths)}-{max(lengths)} (dev examples, padded per batch)", "weights": str(weights.path),
        "onnx_export": str(onnx_folder) if onnx_folder else None, "results": results, "load": load,
    }  # fmt: skip
    for r in results:
        base = next(x for x in results if x["batch"] == r["batch"] and x["model"] == "torch_fp32")
        r["speedup_vs_torch_p50"] = base["p50_ms"] / r["p50_ms"]
    if meta:  # the figures go into the export's metadata and card
        from distrain.trainer.export.onnx import onnx_card, write_json

        meta["latency"] = report
        write_json(onnx_folder / METADATA, meta)
        (onnx_folder / "README.md").write_text(onnx_card(cfg, task, meta), encoding="utf-8")
    return report


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    try:
        report = bench(args)
    except UserError as error:
        print_error("cannot bench inference", str(error))
        raise SystemExit(2) from None
    out = Path(args.out) if args.out else Path(report["onnx_export"] or report["weights"]) / "bench_inference.json"
    out.write_text(strict_json.dumps(report, indent=1) + "\n")
    console.print(f"{report['threads']} threads, median of {report['repeats']} interleaved repetitions, "
                  f"{report['batches']} batches each, lengths {report['seq_len']}", highlight=False)  # fmt: skip
    for r in report["results"]:
        line = (f"  batch {r['batch']}  {r['model']:<10} p50 {r['p50_ms']:8.2f} ms  p95 {r['p95_ms']:8.2f} ms  "
                f"{r['sentences_per_s']:8.1f} sentences/s  {r['speedup_vs_torch_p50']:.2f}x vs torch p50")  # fmt: skip
        console.print(line, highlight=False)
    if "warning" in report["load"]:
        console.print(f"[yellow]warning:[/yellow] {report['load']['warning']}", highlight=False)
    console.print(f"wrote {out}", highlight=False)


if __name__ == "__main__":
    main(sys.argv[1:])
