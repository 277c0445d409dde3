"""`distrain export format=onnx`: a run's weights (ner, classify, mlm, clm) as an ONNX graph that ONNX Runtime runs,
optionally int8-quantized, each export checked against torch before it is marked done.

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
TASKS = ("ner", "classify", "mlm", "clm")
QUANTIZE = ("none", "int8", "int8_static")


class ExportError(UserError):
    """The export cannot be made or failed its check; the message says which and what to do."""


class LogitsOnly(torch.nn.Module):
    """The model's forward pass on (input_ids, attention_mask), returning the logits alone: the graph's signature
    (named arguments, which torch.export maps dynamic shapes onto; the encoder tasks take exactly these two)."""

    def __init__(self, model: torch.nn.Module, fixed: dict[str, Any]):
        super().__init__()
        self.model, self.fixed = model, fixed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.fixed).logits


INPUTS = ("input_ids", "attention_mask")


def export_graph(model: torch.nn.Module, fixed: dict[str, Any], sample: dict[str, Any], path: Path) -> None:
    """Trace `model` on `sample` with torch.onnx's dynamo exporter into `path` (+ `path`.data); a causal LM (a
    `sample` holding its past) with the key/value cache as inputs and outputs (CausalLMWithCache)."""
    import re
    import warnings

    from torch.export import Dim

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision ops
    warnings.filterwarnings("ignore", message=".*(LeafSpec|axis name).*")  # the exporter's notes to itself
    batch, seq = Dim("batch"), Dim("sequence")
    if "past" in sample:
        module: torch.nn.Module = CausalLMWithCache(model)
        past = Dim("past_sequence")
        names = cache_names(len(sample["past"]) // 2)
        shapes: dict[str, Any] = {
            "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.DYNAMIC},  # past + new tokens
            "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past} for _ in names],
        }  # fmt: skip
        inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in names)]
        outputs = ["logits", *(f"present.{n}" for n in names)]
    else:
        module, shapes = LogitsOnly(model, fixed), {name: {0: batch, 1: seq} for name in INPUTS}
        inputs, outputs, sample = list(INPUTS), ["logits"], {n: sample[n] for n in INPUTS}
    try:
        torch.onnx.export(module.eval(), (), str(path), kwargs=dict(sample), dynamo=True, dynamic_shapes=shapes,
                          input_names=inputs, output_names=outputs, external_data=True, verbose=False)  # fmt: skip
    except Exception as error:  # the exporter's summary names the op or module it could not handle
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
        summary = [line for line in text.split("## Exception summary", 1)[-1].strip().splitlines()
                   if line.strip() and line.strip() != "⬆️" and not line.startswith("(Refer to")]  # fmt: skip
        raise ExportError(
            f"torch.onnx (dynamo) cannot export {type(model).__name__}: "
            + "\n".join(summary[:8])
            + "\nExport another architecture, or ship the Hugging Face export/ and run it with torch"
        ) from None


# --- causal LMs: the key/value cache in the graph ------------------------------------------------------------------
# One graph serves the prompt and every generated token: the past key/values are inputs (of length 0 for the prompt,
# which ONNX Runtime runs as empty tensors) and the present ones outputs, so no prefill/decode pair of graphs with
# duplicated weights is needed.
class CausalLMWithCache(torch.nn.Module):
    """The causal LM's forward pass on flat tensors: (input_ids, attention_mask over past + new tokens, position_ids,
    past = [key_0, value_0, key_1, ...]) -> (logits, key_0, value_0, ...) of the past and new tokens."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:  # fmt: skip
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)  # fmt: skip
        return out.logits, *to_tensors(out.cache)


def cache_names(layers: int) -> list[str]:
    return [f"{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def to_tensors(cache: Any) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def from_tensors(tensors: list[torch.Tensor]) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(zip(tensors[0::2], tensors[1::2], strict=True)))


def causal_sample(model: torch.nn.Module) -> dict[str, Any]:
    """Inputs to trace a causal LM on: batch 2, 3 new tokens after a past of 2 (sizes 0 and 1 would be specialised
    into the graph by torch.export; the graph still runs past length 0, the prompt)."""
    ids = torch.tensor([[1, 2], [3, 4]]) % model.config.vocab_size
    with torch.no_grad():
        past = to_tensors(model(input_ids=ids, use_cache=True).cache)
    return {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]]) % model.config.vocab_size,
            "attention_mask": torch.ones(2, 5, dtype=torch.long), "position_ids": torch.arange(2, 5).expand(2, 3),
            "past": [t.detach() for t in past]}  # fmt: skip


def causal_check(torch_model: torch.nn.Module, onnx_model: torch.nn.Module, dataset: Any, count: int = 4) -> float:
    """Max |logit diff| on a left-padded batch of `count` dev prefixes of different lengths (the prompt, real tokens
    only) and on two decode steps with the cache (each model fed its own cache and the same next tokens)."""
    rows = [list(dataset[i]["input_ids"]) for i in range(min(count, len(dataset)))]
    width = max(2, min(len(r) for r in rows))
    rows = [r[: max(1, width - 3 * i)] for i, r in enumerate(rows)]  # lengths width, width-3, ...
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    worst = 0.0
    caches: list[Any] = [None, None]
    with torch.no_grad():
        for step in range(3):
            outs = [m(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=c, use_cache=True)
                    for m, c in zip((torch_model, onnx_model), caches, strict=True)]  # fmt: skip
            diff = (outs[0].logits.float() - outs[1].logits.float()).abs()
            worst = max(worst, float((diff[mask[:, -ids.shape[1] :].bool()] if step == 0 else diff).max()))
            caches = [o.cache for o in outs]
            ids = outs[0].logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            position_ids = position_ids[:, -1:] + 1
    return worst


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
    `.config`, `.device`, `.dtype`, so predict_split, the tasks' taggers and transformers.pipeline run it as is. A
    causal LM's graph (past key/values among its inputs) also returns its `.cache` and generates through
    transformers' GenerationMixin (greedy, sampling: the run's generation options), one graph call per token."""
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

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

    class OrtCausalLM(OrtModel, GenerationMixin):
        def __init__(self):
            super().__init__()
            self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
            if (path.parent / "generation_config.json").is_file():  # the run's, as the torch export loads it
                self.generation_config = GenerationConfig.from_pretrained(path.parent)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, cache: Any = None, **_: Any) -> Any:  # fmt: skip
            batch, length = input_ids.shape
            if cache is None or cache.get_seq_length() == 0:  # the prompt: an empty past
                heads = [(i.shape[1], i.shape[3]) for i in self.past_inputs]
                past = [torch.zeros(batch, h, 0, d) for h, d in heads]
                if attention_mask is None and position_ids is not None and (position_ids[:, 1:] == 0).any():
                    return self.packed(input_ids, position_ids)
            else:
                past = to_tensors(cache)
            start = past[0].shape[2]
            if attention_mask is None:
                attention_mask = torch.ones(batch, start + length, dtype=torch.long)
            if position_ids is None:  # as the torch model: positions follow the cache, whatever the padding
                position_ids = torch.arange(start, start + length).expand(batch, length)
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
            feeds.update((i.name, t) for i, t in zip(self.past_inputs, past, strict=True))
            outs = self.session.run(None, {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()})
            logits, present = torch.from_numpy(outs[0]), [torch.from_numpy(t) for t in outs[1:]]
            return CausalLMOutputWithPast(logits=logits, cache=from_tensors(present))

        def packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> CausalLMOutputWithPast:
            """Packed blocks (position ids restarting at each document, no attention mask): the torch model attends
            within each document only; the graph takes a 2-D mask, so each document runs as its own padded row."""
            spans = []
            for row in range(input_ids.shape[0]):
                starts = [0, *(int(i) + 1 for i in (position_ids[row, 1:] == 0).nonzero().flatten())]
                spans += [(row, a, b) for a, b in zip(starts, [*starts[1:], input_ids.shape[1]], strict=True)]
            width = max(b - a for _, a, b in spans)
            ids = torch.zeros(len(spans), width, dtype=input_ids.dtype)
            mask = torch.zeros(len(spans), width, dtype=torch.long)
            for n, (row, a, b) in enumerate(spans):
                ids[n, : b - a], mask[n, : b - a] = input_ids[row, a:b], 1
            logits = self(ids, mask, torch.arange(width).expand(len(spans), width)).logits
            out = torch.zeros(*input_ids.shape, logits.shape[-1])
            for n, (row, a, b) in enumerate(spans):
                out[row, a:b] = logits[n, : b - a]
            return CausalLMOutputWithPast(logits=out)

        def can_generate(self) -> bool:
            return True

    cls = OrtCausalLM if is_causal(path) else OrtModel
    # Named as the exported architecture: transformers.pipeline checks the class name against its task's models
    # (and logs an error listing them all otherwise); the graph is that architecture's forward pass.
    cls.__name__ = cls.__qualname__ = (getattr(config, "architectures", None) or ["OrtModel"])[0]
    return cls().eval()


# --- the check of an export ---------------------------------------------------------------------------------------
def check_inputs(task: Any, dataset: Any, count: int = 8) -> list[dict[str, torch.Tensor]]:
    """Real inputs of several lengths with padding: a batch of `count` dev examples spread from the shortest to
    the longest (so most rows are padded), the longest and shortest alone (no padding), and the spread batch with
    its rows cut to decreasing lengths (when every dev example has the same length, as truncated documents do,
    the only inputs of other lengths)."""
    lengths = list(dataset["length"]) if "length" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    spread = sorted({order[round(i * (len(order) - 1) / max(count - 1, 1))] for i in range(count)})
    collate = task.collator(train=False)
    columns = list(task.loader_columns)

    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [{k: dataset[i][k] for k in columns if k in dataset.column_names} for i in indices]
        return {k: v for k, v in collate(rows).items() if k in task.model_inputs}

    spread_batch = batch(spread)
    if "attention_mask" not in spread_batch:  # clm: full blocks; causal_check adds a padded prompt
        return [spread_batch, batch([order[-1]]), batch([order[0]])]
    cut = dict(spread_batch)
    real = cut["attention_mask"].sum(1)
    keep = [max(1, int(n) * (count - i) // count) for i, n in enumerate(real)]  # row i keeps (count - i) / count
    cut["attention_mask"] = (torch.arange(cut["attention_mask"].shape[1]) < torch.tensor(keep)[:, None]).long()
    cut["attention_mask"] &= spread_batch["attention_mask"]  # (padding stays padding)
    return [spread_batch, batch([order[-1]]), batch([order[0]]), cut]


def real_lengths(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    """The unpadded lengths of the rows of `batches`."""
    lengths = (b["attention_mask"].sum(1) if "attention_mask" in b else [b["input_ids"].shape[1]] for b in batches)
    return sorted({int(n) for rows in lengths for n in rows})


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
    """How much worse `value` is than `reference` (positive: worse), as a fraction of `reference`: one threshold
    means the same for an F1 near 0.9 and a perplexity near 800 (in the metric's units, 0.01 would refuse any
    int8 language model)."""
    worse = value - reference if metric in task.lower_is_better else reference - value
    return worse / abs(reference) if reference else worse


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


def partial_of(target: Path) -> Path:
    """Where the export of `target` is written until it is complete."""
    return target.with_name(target.name + ".partial")


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
                batch_size: int | None, fp32_tolerance: float, say: Any = print,
                max_samples: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Export, check and write the whole folder for `target` into partial_of(`target`), for `replace` to move into
    place; the metadata. The dev scores are on the whole dev split, or its first `max_samples`. A logit check beyond
    `fp32_tolerance` (max |logit diff| ONNX fp32 vs torch on unpadded positions) leaves nothing; int8 beyond
    `max_metric_drop` is written marked failed (its status and failure)."""
    from distrain.trainer.config.schema import load_run_config
    from distrain.trainer.export.model_card import distrain_version
    from distrain.trainer.inference.load import load_for_inference

    name = str(load_run_config(weights.config).task.name)
    if name not in TASKS:  # before any weights load
        raise ExportError(f"task {name}: ONNX export covers {list(TASKS)}")
    if name == "clm" and quantize_mode == "int8_static":  # calibration would need past key/values of each sample
        raise ExportError("quantize: int8_static covers the encoder tasks; a causal LM ships quantize=int8 (dynamic)")
    cfg, env, tokenizer, task, model = load_for_inference(weights)
    cfg.data.max_train_samples = cfg.data.max_eval_samples = None  # the artefact is scored on the whole dev split
    data = task.prepare(env)
    dev = data.splits["dev"]
    dev_split_examples = len(dev)
    if max_samples and max_samples < len(dev):
        dev = dev.select(range(max_samples))
    size = batch_size or cfg.train.eval_batch_size or 2 * cfg.train.micro_batch_size
    partial = partial_of(target)
    shutil.rmtree(partial, ignore_errors=True)
    fp32_dir = partial if quantize_mode == "none" else partial / "fp32"
    fp32_dir.mkdir(parents=True)
    try:
        batches = check_inputs(task, dev)
        causal = name == "clm"
        sample = causal_sample(model) if causal else batches[0]
        _, seconds = timed(lambda: export_graph(model, dict(task.forward_kwargs), sample, fp32_dir / GRAPH))

        def check(onnx_model: torch.nn.Module) -> float:  # clm: also a left-padded prompt and decode steps
            diff = max_logit_diff(model, onnx_model, task, batches)
            return max(diff, causal_check(model, onnx_model, dev)) if causal else diff

        fp32 = ort_model(fp32_dir / GRAPH, model.config)
        diff = check(fp32)
        lengths = real_lengths(batches)
        also = "; a padded prompt and 2 decode steps with the cache" if causal else ""
        say(f"exported {GRAPH} in {seconds:.1f} s; ONNX fp32 vs torch: max |logit diff| {diff:.3g} on dev inputs of "
            f"lengths {lengths} (unpadded positions{also}; tolerance {fp32_tolerance:g})")  # fmt: skip
        if not diff <= fp32_tolerance:
            raise ExportError(f"ONNX fp32 logits differ from torch's by {diff:.3g} > {fp32_tolerance:g} on dev inputs: "
                              "the exported graph does not compute the model; nothing was written (a deep model "
                              "with large logits can differ by fp32 rounding alone: SmolLM2-135M 4e-4; to ship it "
                              "anyway, raise fp32_tolerance)")  # fmt: skip
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
            "max_abs_logit_diff": {"onnx_fp32": diff}, "check_lengths": lengths, "fp32_tolerance": fp32_tolerance,
            "dev_metrics": metrics, "dev_examples": len(dev),
            "dev_split_examples": dev_split_examples, "bytes": sizes, "max_metric_drop": max_metric_drop,
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
            meta["max_abs_logit_diff"]["onnx_int8"] = check(int8)
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
            meta["failure"] = (f"int8 loses {meta['metric_drop']:.2%} of dev {metric} (torch fp32 "
                               f"{metrics['torch_fp32'][metric]:.4f}, ONNX int8 {metrics['onnx_int8'][metric]:.4f}) "
                               f"> max_metric_drop={max_metric_drop} ({max_metric_drop:.2%})")  # fmt: skip
        model.config.save_pretrained(partial)  # label names (id2label) and the architecture, for the tokenizer too
        if causal and model.generation_config is not None:  # the generation defaults, as in the Hugging Face export
            model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.copy(weights.config, partial / "distrain_config.yaml")
        write_json(partial / METADATA, meta)
        (partial / "README.md").write_text(onnx_card(cfg, task, meta), encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return meta


def _singles(task: Any, dataset: Any, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` examples, one per batch (their own lengths, no padding): calibration feeds."""
    collate = task.collator(train=False)
    columns = [k for k in task.loader_columns if k in dataset.column_names]
    return [{k: v for k, v in collate([{c: dataset[i][c] for c in columns}]).items() if k in task.model_inputs}
            for i in range(min(count, len(dataset)))]  # fmt: skip


def is_causal(path: Path) -> bool:
    """A causal LM's graph: the past key/values among its inputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(i.name.startswith("past_key_values.") for i in graph.input)


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _dev_scope(meta: dict[str, Any]) -> str:
    """Which dev examples the card's scores are on: all of them, or the first N (the export's max_samples)."""
    scored, split = meta["dev_examples"], meta.get("dev_split_examples", meta["dev_examples"])
    if scored == split:
        return f"all {scored} dev examples"
    return f"the first {scored} of {split} dev examples (max_samples)"


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
        f"## Measured cost\n\nDev {metric} ({task.direction(metric)}; {_dev_scope(meta)}), graph size and max |logit "
        f"diff| against the torch model on dev inputs of lengths {meta['check_lengths']} (unpadded positions):\n\n"
        f"| model | dev {metric} | size | max abs logit diff |\n|---|---|---|---|\n" + "\n".join(rows),
    ]
    if meta.get("latency"):
        lat = meta["latency"]
        lines = [f"| {r['model']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['sentences_per_s']:.1f} |"
                 for r in lat["results"]]  # fmt: skip
        parts.append(
            f"## Latency\n\n`distrain bench inference` on {lat['cpu']}, {lat['threads']} threads, {lat['repeats']} "
            f"interleaved repetitions (median), lengths {lat['seq_len']}, {lat['date']}:\n\n"
            "| model | batch | p50 ms | p95 ms | sentences/s |\n|---|---|---|---|---|\n"
            + "\n".join(lines)
            + (
                f"\n\n**Measured on a busy machine**: {lat['load']['warning']}."
                if lat.get("load", {}).get("warning")
                else ""
            )
        )
    if str(task.name) == "clm":
        parts.append(
            "## Use it\n\nOne graph with the key/value cache: inputs `input_ids`, `attention_mask` (past and new "
            "tokens), `position_ids`, `past_key_values.<layer>.key|value` (batch, heads, past length, head size; "
            "length 0 for the prompt); outputs `logits` and `present.<layer>.key|value`, the next call's past. "
            "`distrain predict ckpt=<this folder> input=FILE` generates with it through ONNX Runtime (greedy, or the "
            "predict options' sampling), `distrain eval ckpt=<this folder> split=test` reports its perplexity."
        )
        return "\n\n".join(parts) + "\n"
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
