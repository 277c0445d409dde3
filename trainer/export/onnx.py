"""`distrain export format=onnx`: the encoder tasks' weights (ner, classify, mlm) as an ONNX graph that ONNX Runtime
runs, optionally int8-quantized, each export checked against torch before it is marked done.

The graph comes from torch.onnx's dynamo exporter (dynamic batch and sequence axes), int8 from ONNX Runtime's own
quantizer; distrain writes no graph surgery of its own. `OrtModel` runs a folder's graph behind the interface the
tasks call (`model(**inputs).logits`, `model.config`), so eval, predict and the NER raw-text path are the torch
ones, on exactly the file that ships.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from distrain.trainer import strict_json
from distrain.trainer.errors import UserError

GRAPH = "model.onnx"  # the shipped graph (weights in model.onnx.data beside it when not int8)
METADATA = "onnx_export.json"  # runtime, precision, max |logit diff|, dev metrics, sizes, status
FP32_TOLERANCE = 1e-4  # max |logit diff| ONNX fp32 vs torch on unpadded positions; beyond it the export fails
TASKS = ("ner", "classify", "mlm")  # encoder tasks; clm needs the key/value cache in the graph (not built yet)
QUANTIZE = ("none", "int8", "int8_static")


class ExportError(UserError):
    """The export cannot be made or failed its check; the message says which and what to do."""


class QuantizationLoss(ExportError):
    """int8 lost more than max_metric_drop on dev: the folder is written, marked failed (exit 1)."""


class LogitsOnly(torch.nn.Module):
    """The model's forward pass on (input_ids, attention_mask), returning the logits alone: the graph's signature
    (named arguments, which torch.export maps dynamic shapes onto; the encoder tasks take exactly these two)."""

    def __init__(self, model: torch.nn.Module, fixed: dict[str, Any]):
        super().__init__()
        self.model, self.fixed = model, fixed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.fixed).logits


INPUTS = ("input_ids", "attention_mask")


def export_graph(model: torch.nn.Module, fixed: dict[str, Any], sample: dict[str, torch.Tensor], path: Path) -> None:
    """Trace `model` on `sample` with torch.onnx's dynamo exporter into `path` (+ `path`.data)."""
    import re
    import warnings

    from torch.export import Dim

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision ops
    warnings.filterwarnings("ignore", message=".*(LeafSpec|axis name).*")  # the exporter's notes to itself
    batch, seq = Dim("batch"), Dim("seq")
    shapes = {name: {0: batch, 1: seq} for name in INPUTS}
    try:
        torch.onnx.export(LogitsOnly(model, fixed).eval(), (), str(path), kwargs={n: sample[n] for n in INPUTS},
                          dynamo=True, dynamic_shapes=shapes, input_names=list(INPUTS), output_names=["logits"],
                          external_data=True, verbose=False)  # fmt: skip
    except Exception as error:  # the exporter's summary names the op or module it could not handle
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
        summary = text.split("## Exception summary", 1)[-1].strip().splitlines()
        raise ExportError(
            f"torch.onnx (dynamo) cannot export {type(model).__name__}: " + "\n".join(summary[:8])
        ) from None


def quantize(fp32: Path, out: Path, static_inputs: list[dict[str, Any]] | None = None) -> None:
    """int8 weights (per channel) with ONNX Runtime's quantizer: dynamic (activations quantized at run time), or
    static with activations calibrated on `static_inputs` (feeds of numpy arrays)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process, which fails on dynamo graphs
    try:
        if static_inputs is None:
            quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
            return

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = iter(static_inputs)

            def get_next(self):
                return next(self.feeds, None)

        quantize_static(str(fp32), str(out), Reader(), per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QInt8)  # fmt: skip
    except Exception as error:
        raise ExportError(f"onnxruntime.quantization could not quantize {fp32.name}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}") from None  # fmt: skip


def session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtOutput(dict):
    """What the tasks read of a model output: `.logits` (and ["logits"] for transformers' pipelines)."""

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]

    def to_tuple(self) -> tuple:
        return (self["logits"],)


def ort_model(path: Path, config: Any, threads: int | None = None) -> torch.nn.Module:
    """An ONNX Runtime session behind a transformers model's interface: `model(**inputs).logits` as a torch tensor,
    `.config`, `.device`, `.dtype`, so predict_split, the tasks' taggers and transformers.pipeline run it as is."""
    from transformers import PreTrainedModel

    class OrtModel(PreTrainedModel):
        config_class = type(config)
        base_model_prefix = "onnx"
        main_input_name = "input_ids"
        _supports_sdpa = True  # transformers checks the attention implementation of any model; the graph has its own

        def __init__(self):
            super().__init__(copy.deepcopy(config))
            self.session = session(path, threads)
            self.input_names = [i.name for i in self.session.get_inputs()]
            # transformers reads .device/.dtype off the first parameter (pipelines do); the graph has the weights
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

        def forward(self, **inputs: Any) -> OrtOutput:
            feeds = {n: inputs[n].detach().cpu().numpy() for n in self.input_names}
            (logits,) = self.session.run(["logits"], feeds)
            return OrtOutput(logits=torch.from_numpy(logits))

        def can_generate(self) -> bool:
            return False

    # Named as the exported architecture: transformers.pipeline checks the class name against its task's models
    # (and logs an error listing them all otherwise); the graph is that architecture's forward pass.
    OrtModel.__name__ = OrtModel.__qualname__ = (getattr(config, "architectures", None) or ["OrtModel"])[0]
    return OrtModel().eval()


# --- the check of an export ---------------------------------------------------------------------------------------
def check_inputs(task: Any, dataset: Any, count: int = 8) -> list[dict[str, torch.Tensor]]:
    """Real inputs of several lengths with padding: a batch of `count` dev examples spread from the shortest to
    the longest (so most rows are padded), and the longest and shortest alone (no padding)."""
    lengths = list(dataset["length"]) if "length" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    spread = sorted({order[round(i * (len(order) - 1) / max(count - 1, 1))] for i in range(count)})
    collate = task.collator(train=False)
    columns = list(task.loader_columns)

    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [{k: dataset[i][k] for k in columns if k in dataset.column_names} for i in indices]
        return {k: v for k, v in collate(rows).items() if k in task.model_inputs}

    return [batch(spread), batch([order[-1]]), batch([order[0]])]


def max_logit_diff(torch_model: torch.nn.Module, onnx_model: torch.nn.Module, task: Any,
                   batches: list[dict[str, torch.Tensor]]) -> float:  # fmt: skip
    """Max |logit diff| of the two models on `batches`, over unpadded positions only (padded ones are undefined)."""
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = torch_model(**batch, **task.forward_kwargs).logits.float()
            got = onnx_model(**batch).logits.float()
            diff = (expected - got).abs()
            if diff.dim() >= 3 and "attention_mask" in batch:  # per-token logits: keep the real tokens
                diff = diff[batch["attention_mask"].bool()]
            worst = max(worst, float(diff.max()))
    return worst


def dev_metrics(model: torch.nn.Module, task: Any, dataset: Any, batch_size: int, env: Any) -> dict[str, float]:
    from distrain.trainer.model.forward import predict_split

    predictions = predict_split(model, task, dataset, batch_size, env, "fp32")
    return {k: float(v) for k, v in task.metrics(predictions, dataset).items()}


def folder_bytes(folder: Path, names: list[str]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def metric_drop(task: Any, metric: str, reference: float, value: float) -> float:
    """How much worse `value` is than `reference` (positive: worse), in the metric's own units."""
    return value - reference if metric in task.lower_is_better else reference - value


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(strict_json.dumps(record, indent=1) + "\n", encoding="utf-8")


def read_metadata(folder: Path) -> dict[str, Any]:
    return json.loads((folder / METADATA).read_text(encoding="utf-8"))


def graph_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(GRAPH))


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def replace(partial: Path, target: Path) -> None:
    """Move the finished `partial` folder onto `target` (an existing one only when overwrite was asked)."""
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


# --- the export ---------------------------------------------------------------------------------------------------
def default_output(weights: Any, quantize_mode: str) -> Path:
    """<run dir>/onnx_<precision>: beside the run's export/ and checkpoints/."""
    run_dir = weights.config.parent if weights.kind == "checkpoint" else weights.path.parent
    return run_dir / f"onnx_{'fp32' if quantize_mode == 'none' else quantize_mode}"


def export_onnx(weights: Any, target: Path, quantize_mode: str, max_metric_drop: float, calibration_samples: int,
                batch_size: int | None, say: Any = print) -> dict[str, Any]:  # fmt: skip
    """Export, check and write `target` (via `target`.partial); the metadata. A failed logit check leaves nothing;
    int8 beyond `max_metric_drop` leaves the folder marked failed (status) and raises ExportError."""
    from distrain.trainer.config.schema import load_run_config
    from distrain.trainer.export.model_card import distrain_version
    from distrain.trainer.inference.load import load_for_inference

    name = str(load_run_config(weights.config).task.name)
    if name not in TASKS:  # before any weights load
        raise ExportError(
            f"task {name}: ONNX export covers {list(TASKS)}; a causal LM needs its key/value cache in the graph, "
            "which distrain does not export yet: use the Hugging Face export/"
        )
    cfg, env, tokenizer, task, model = load_for_inference(weights)
    data = task.prepare(env)
    dev = data.splits["dev"]
    size = batch_size or cfg.train.eval_batch_size or 2 * cfg.train.micro_batch_size
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    fp32_dir = partial if quantize_mode == "none" else partial / "fp32"
    fp32_dir.mkdir(parents=True)
    try:
        batches = check_inputs(task, dev)
        _, seconds = timed(lambda: export_graph(model, dict(task.forward_kwargs), batches[0], fp32_dir / GRAPH))
        fp32 = ort_model(fp32_dir / GRAPH, model.config)
        diff = max_logit_diff(model, fp32, task, batches)
        lengths = sorted({int(b["input_ids"].shape[1]) for b in batches})
        say(f"exported {GRAPH} in {seconds:.1f} s; ONNX fp32 vs torch: max |logit diff| {diff:.3g} on dev inputs of "
            f"lengths {lengths} (unpadded positions; tolerance {FP32_TOLERANCE:g})")  # fmt: skip
        if not diff <= FP32_TOLERANCE:
            raise ExportError(f"ONNX fp32 logits differ from torch's by {diff:.3g} > {FP32_TOLERANCE:g} on dev inputs: "
                              "the exported graph does not compute the model; nothing was written")  # fmt: skip
        metric = str(cfg.task.metric)
        metrics = {
            "torch_fp32": dev_metrics(model, task, dev, size, env),
            "onnx_fp32": dev_metrics(fp32, task, dev, size, env),
        }
        sizes = {"torch_fp32": sum(p.numel() * p.element_size() for p in model.parameters()),
                 "onnx_fp32": folder_bytes(fp32_dir, graph_files(fp32_dir))}  # fmt: skip
        meta: dict[str, Any] = {
            "format": "onnx", "runtime": "onnxruntime", "precision": "fp32" if quantize_mode == "none" else "int8",
            "quantize": quantize_mode, "task": str(task.name), "metric": metric, "source": str(weights.path),
            "source_kind": weights.kind, "opset": _opset(fp32_dir / GRAPH), "export_seconds": round(seconds, 2),
            "max_abs_logit_diff": {"onnx_fp32": diff}, "check_lengths": lengths, "fp32_tolerance": FP32_TOLERANCE,
            "dev_metrics": metrics, "bytes": sizes, "max_metric_drop": max_metric_drop,
            "distrain_version": distrain_version(),
        }  # fmt: skip
        del fp32  # its session holds the graph's files open
        if quantize_mode != "none":
            feeds = None
            if quantize_mode == "int8_static":
                feeds = [{k: v.numpy() for k, v in b.items()} for b in _singles(task, dev, calibration_samples)]
                meta["calibration_samples"] = len(feeds)
            _, qseconds = timed(lambda: quantize(fp32_dir / GRAPH, partial / GRAPH, feeds))
            int8 = ort_model(partial / GRAPH, model.config)
            meta["max_abs_logit_diff"]["onnx_int8"] = max_logit_diff(model, int8, task, batches)
            metrics["onnx_int8"] = dev_metrics(int8, task, dev, size, env)
            del int8
            sizes["onnx_int8"] = folder_bytes(partial, graph_files(partial))
            shutil.rmtree(fp32_dir)
            drop = metric_drop(task, metric, metrics["torch_fp32"][metric], metrics["onnx_int8"][metric])
            meta["metric_drop"] = drop
            say(f"quantized ({quantize_mode}) in {qseconds:.1f} s: {sizes['onnx_fp32'] / 2**20:.1f} MiB -> "
                f"{sizes['onnx_int8'] / 2**20:.1f} MiB; dev {metric} torch fp32 {metrics['torch_fp32'][metric]:.4f}, "
                f"ONNX int8 {metrics['onnx_int8'][metric]:.4f}")  # fmt: skip
        failed = quantize_mode != "none" and not meta["metric_drop"] <= max_metric_drop
        meta["status"] = "failed" if failed else "ok"
        if failed:
            meta["failure"] = (f"int8 loses {meta['metric_drop']:.4f} dev {metric} (torch fp32 "
                               f"{metrics['torch_fp32'][metric]:.4f}, ONNX int8 {metrics['onnx_int8'][metric]:.4f}) "
                               f"> max_metric_drop={max_metric_drop}")  # fmt: skip
        model.config.save_pretrained(partial)  # label names (id2label) and the architecture, for the tokenizer too
        tokenizer.save_pretrained(partial)
        shutil.copy(weights.config, partial / "distrain_config.yaml")
        write_json(partial / METADATA, meta)
        (partial / "README.md").write_text(onnx_card(cfg, task, meta), encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace(partial, target)
    if failed:
        raise QuantizationLoss(f"{meta['failure']}: {target} is written but marked failed in {METADATA}; raise "
                          "max_metric_drop to accept it, or ship quantize=none")  # fmt: skip
    return meta


def _singles(task: Any, dataset: Any, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` examples, one per batch (their own lengths, no padding): calibration feeds."""
    collate = task.collator(train=False)
    columns = [k for k in task.loader_columns if k in dataset.column_names]
    return [{k: v for k, v in collate([{c: dataset[i][c] for c in columns}]).items() if k in task.model_inputs}
            for i in range(min(count, len(dataset)))]  # fmt: skip


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def onnx_card(cfg: Any, task: Any, meta: dict[str, Any]) -> str:
    """The export's README.md: what it is, its precision and what that cost (logit diff, dev metric, bytes,
    latency when `distrain bench inference` measured it), and how to run it."""
    metric = meta["metric"]
    diffs, sizes = meta["max_abs_logit_diff"], meta["bytes"]
    rows = [f"| {name} | {values[metric]:.4f} | {sizes.get(name, 0) / 2**20:.1f} MiB | {diffs.get(name, 0.0):.3g} |"
            for name, values in meta["dev_metrics"].items()]  # fmt: skip
    parts = [
        "---\n" + f"library_name: onnx\npipeline_tag: {task.pipeline_task}\ntags: [distrain, {task.name}, onnx]\n---",
        f"# {cfg.run.name} ({meta['precision']}, ONNX)\n\nA `{task.name}` model exported by distrain "
        f"{meta['distrain_version']} from `{meta['source']}` with torch.onnx (dynamo, opset {meta['opset']}); "
        f"precision **{meta['precision']}** (quantize={meta['quantize']}); status **{meta['status']}**"
        + (f": {meta['failure']}" if meta.get("failure") else "")
        + ".",
        f"## Measured cost\n\nDev {metric} ({task.direction(metric)}), graph size and max |logit diff| against the "
        f"torch model on dev inputs of lengths {meta['check_lengths']} (unpadded positions):\n\n"
        f"| model | dev {metric} | size | max abs logit diff |\n|---|---|---|---|\n" + "\n".join(rows),
    ]
    if meta.get("latency"):
        lat = meta["latency"]
        lines = [f"| {r['model']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['sentences_per_s']:.1f} |"
                 for r in lat["results"]]  # fmt: skip
        parts.append(
            f"## Latency\n\n`distrain bench inference` on {lat['cpu']}, {lat['threads']} threads, {lat['repeats']} "
            f"interleaved repetitions (median), lengths {lat['seq_len']}, {lat['date']}:\n\n"
            "| model | batch | p50 ms | p95 ms | sentences/s |\n|---|---|---|---|---|\n" + "\n".join(lines)
        )
    parts.append(
        "## Use it\n\n```python\nimport onnxruntime as ort\nfrom transformers import AutoTokenizer\n\n"
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")\n'
        'session = ort.InferenceSession("<this folder>/model.onnx")\n'
        f'inputs = tokenizer([{task.card_example!r}], return_tensors="np")\n'
        f'logits = session.run(["logits"], {{k: inputs[k] for k in {list(task.model_inputs)}}})[0]\n```\n\n'
        "Or `distrain eval ckpt=<this folder> split=test` and `distrain predict ckpt=<this folder> input=FILE`, which "
        "run this graph through ONNX Runtime with the task's own metrics and output. Label names: `config.json`."
    )
    return "\n\n".join(parts) + "\n"
