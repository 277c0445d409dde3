"""`distrain export format=onnx` on a tiny NER run, then `distrain eval`/`predict`/`bench inference` on what ships.

One tiny NER run (module fixture), its fp32 and int8 exports; each check compares the ONNX Runtime result with the
torch weights' through the real commands (the metrics, the predictions file, the JSON lines), read back with json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from conftest import DISTRAIN, run_distrain
from test_ner_raw_text import conll_sentences

PREDICT_LINES = "Barack Obama visited Paris\n\nThe European Union met in Brussels on Monday\n"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """A tiny NER run trained to tag entities (the generated sentences of test_ner_raw_text), its ONNX fp32
    export, and `distrain eval` of the ONNX folder on dev (the export measured torch's dev metrics in its check)."""
    root = tmp_path_factory.mktemp("onnx")
    data, run = root / "data", root / "run"
    data.mkdir()
    for split, (count, seed) in {"train": (400, 0), "dev": (40, 1), "test": (80, 2)}.items():
        (data / f"{split}.txt").write_text(conll_sentences(count, seed), encoding="utf-8")
    # data.max_eval_samples keeps the run's own evaluations short; what ships is scored on the whole dev split
    run_distrain("train", "model=bert_tiny", "data=conll2003", f"data.dir={data}", f"data.cache_dir={cache_dir}",
                 "train.max_steps=25", "train.log_every=25", "optim.lr=5e-3", "data.max_eval_samples=20",
                 f"run.dir={run}")  # fmt: skip
    out = {"run": run, "fp32": root / "fp32", "int8": root / "int8", "root": root}
    out["fp32_log"] = run_distrain("export", f"ckpt={run}", "format=onnx", f"output={out['fp32']}").stdout
    run_distrain("eval", f"ckpt={out['fp32']}", "split=dev", f"output={root / 'eval_fp32'}")
    return out


@pytest.fixture(scope="module")
def int8(shipped) -> Path:
    """The same run exported with dynamic int8; eval on test of the torch weights and of both ONNX folders."""
    shipped["int8_log"] = run_distrain("export", f"ckpt={shipped['run']}", "quantize=int8",
                                       f"output={shipped['int8']}").stdout  # fmt: skip
    for name in ("run", "fp32", "int8"):
        run_distrain("eval", f"ckpt={shipped[name]}", "split=test", f"output={shipped['root'] / ('eval_' + name)}")
    return shipped["int8"]


def report(shipped, name: str, split: str = "test") -> dict:
    return json.loads((shipped["root"] / f"eval_{name}" / f"eval_{split}.json").read_text())


def test_the_export_is_checked_against_torch_and_says_so(shipped):
    meta = json.loads((shipped["fp32"] / "onnx_export.json").read_text())
    assert meta["status"] == "ok" and meta["precision"] == "fp32" and meta["runtime"] == "onnxruntime"
    assert meta["max_abs_logit_diff"]["onnx_fp32"] < 1e-4
    assert len(meta["check_lengths"]) >= 2  # several lengths, a padded batch among them
    assert "max |logit diff|" in shipped["fp32_log"]
    files = {p.name for p in shipped["fp32"].iterdir()}
    assert {"model.onnx", "config.json", "distrain_config.yaml", "onnx_export.json", "README.md"} <= files
    assert "tokenizer.json" in files or "vocab.txt" in files
    assert not (shipped["fp32"].parent / "fp32.partial").exists()
    graph = onnx.load(str(shipped["fp32"] / "model.onnx"))
    onnx.checker.check_model(graph)
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert all(isinstance(a, str) and isinstance(b, str) for a, b in dims), dims  # dynamic batch and sequence
    card = (shipped["fp32"] / "README.md").read_text()
    assert "fp32" in card and "max abs logit diff" in card
    # Scored on all 40 dev sentences (not the run's data.max_eval_samples=20), and the card says so; so is the
    # training export's card, which says its figures came from the first 20
    assert meta["dev_examples"] == 40 and "all 40 dev examples" in card
    trained_card = (shipped["run"] / "export" / "README.md").read_text()
    assert "on the first 20 dev examples (data.max_eval_samples)" in trained_card


@pytest.mark.slow  # five launches: the default suite's budget
def test_a_damaged_export_or_onnx_folder_is_named_and_nothing_runs_on_it(shipped, tmp_path, cache_dir):
    # Exports carry no digests: a cut file is found by its own format (safetensors' header, the ONNX graph and the
    # length of its external weights), as a user's copy interrupted midway leaves it.
    export, onnx_dir = tmp_path / "export", tmp_path / "onnx"
    shutil.copytree(shipped["run"] / "export", export)
    shutil.copytree(shipped["fp32"], onnx_dir)
    os.truncate(export / "model.safetensors", (export / "model.safetensors").stat().st_size // 2)
    os.truncate(onnx_dir / "model.onnx.data", 1000)
    # A folder missing a file transformers would quietly stand in for: an all-[UNK] tokenizer, or no config
    no_vocab, no_config = tmp_path / "no_vocab", tmp_path / "no_config"
    shutil.copytree(shipped["fp32"], no_vocab)
    shutil.copytree(shipped["run"] / "export", no_config)
    (no_vocab / "tokenizer.json").unlink()
    (no_config / "config.json").unlink()
    expected = {
        ("eval", no_vocab): f"onnx folder {no_vocab} is damaged: the tokenizer's vocabulary is missing",
        ("predict", no_config): f"export folder {no_config} is damaged: config.json (the model's architecture",
        ("eval", export): f"export folder {export} is damaged: model.safetensors: ",
        ("predict", export): f"export folder {export} is damaged: model.safetensors: ",
        ("export", export): f"export folder {export} is damaged: model.safetensors: ",
        ("eval", onnx_dir): f"onnx folder {onnx_dir} is damaged: model.onnx.data: 1,000 bytes, but model.onnx places ",
    }
    for (command, folder), message in expected.items():
        result = run_distrain(
            command,
            f"ckpt={folder}",
            *(["input=-"] if command == "predict" else []),
            *(["output=" + str(tmp_path / "out")] if command == "export" else []),
            check=False,
        )
        said = " ".join(result.stderr.split())
        assert result.returncode == 2 and message in said and "Traceback" not in said, (command, said)
    assert not (tmp_path / "out").exists()
    # ... and as the weights a run starts from: refused before the run dir exists
    run = tmp_path / "warm"
    result = run_distrain("train", "model=bert_tiny", "data=conll2003", f"data.dir={shipped['root'] / 'data'}",
                          f"data.cache_dir={cache_dir}", f"checkpoint.init_from={export}", f"run.dir={run}",
                          check=False)  # fmt: skip
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and f"checkpoint.init_from: export folder {export} is damaged" in said, said
    assert not run.exists()


@pytest.mark.slow
def test_int8_is_smaller_and_states_its_cost(shipped, int8):
    fp32 = json.loads((shipped["fp32"] / "onnx_export.json").read_text())
    meta = json.loads((int8 / "onnx_export.json").read_text())
    assert meta["status"] == "ok" and meta["precision"] == "int8"
    assert meta["bytes"]["onnx_int8"] < 0.6 * fp32["bytes"]["onnx_fp32"]
    assert set(meta["dev_metrics"]) == {"torch_fp32", "onnx_fp32", "onnx_int8"}
    torch_f1, int8_f1 = meta["dev_metrics"]["torch_fp32"]["f1"], meta["dev_metrics"]["onnx_int8"]["f1"]
    assert meta["metric_drop"] == pytest.approx((torch_f1 - int8_f1) / torch_f1)  # a fraction of torch's
    assert not (shipped["int8"] / "fp32").exists()  # the intermediate fp32 graph is not shipped
    assert "int8" in (int8 / "README.md").read_text()


def test_eval_of_the_onnx_folder_equals_the_torch_metrics_the_export_measured(shipped):
    """`distrain eval` of the ONNX folder on dev gives the dev metrics of the torch weights, which the export computed
    in-process with the same task metrics before writing the folder."""
    meta = json.loads((shipped["fp32"] / "onnx_export.json").read_text())
    onnx_dev, torch_dev = report(shipped, "fp32", "dev"), meta["dev_metrics"]["torch_fp32"]
    assert onnx_dev["examples"] == meta["dev_examples"] == 40  # both the whole split
    assert (onnx_dev["runtime"], onnx_dev["runtime_precision"]) == ("onnxruntime", "fp32")
    assert torch_dev["f1"] > 0.5, "the tiny model should tag entities, or this comparison proves nothing"
    for key in ("f1", "precision", "recall", "accuracy"):
        assert onnx_dev[key] == pytest.approx(torch_dev[key], abs=1e-4), key
    assert onnx_dev["predict_f1"] == pytest.approx(onnx_dev["f1"], abs=1e-12)  # the raw-text path ran on ORT too


@pytest.mark.slow
def test_eval_of_the_onnx_folder_equals_eval_of_the_torch_weights(shipped, int8):
    torch_report, fp32 = report(shipped, "run"), report(shipped, "fp32")
    assert (torch_report["runtime"], fp32["runtime"]) == ("torch", "onnxruntime")
    assert fp32["runtime_precision"] == "fp32"
    assert torch_report["f1"] > 0.5, "the tiny model should tag entities, or this comparison proves nothing"
    for key in ("f1", "precision", "recall", "accuracy", "predict_f1", "pipeline_f1"):
        assert fp32[key] == pytest.approx(torch_report[key], abs=1e-4), key
    predictions = {n: (shipped["root"] / f"eval_{n}" / "predictions_test.txt").read_text() for n in ("run", "fp32")}
    assert predictions["fp32"] == predictions["run"]


@pytest.mark.slow
def test_eval_of_the_int8_folder_reports_its_runtime_and_the_metric_of_its_export(shipped, int8):
    meta = json.loads((int8 / "onnx_export.json").read_text())
    evaluated = report(shipped, "int8")
    assert (evaluated["runtime"], evaluated["runtime_precision"]) == ("onnxruntime", "int8")
    assert abs(evaluated["f1"] - report(shipped, "run")["f1"]) <= 0.05
    torch_f1, int8_f1 = meta["dev_metrics"]["torch_fp32"]["f1"], meta["dev_metrics"]["onnx_int8"]["f1"]
    assert int8_f1 >= torch_f1 * (1 - meta["max_metric_drop"])


@pytest.mark.slow
def test_predict_on_the_onnx_folder_gives_the_torch_json_lines(shipped, tmp_path):
    (tmp_path / "in.txt").write_text(PREDICT_LINES, encoding="utf-8")
    lines = {}
    for name in ("run", "fp32"):
        result = run_distrain("predict", f"ckpt={shipped[name]}", f"input={tmp_path / 'in.txt'}")
        lines[name] = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines["fp32"]) == 3 and lines["fp32"][1] == {"input": "", "skipped": "empty line"}
    assert [r["input"] for r in lines["fp32"]] == PREDICT_LINES.splitlines()
    for torch_line, onnx_line in zip(lines["run"], lines["fp32"], strict=True):
        assert [(e["type"], e["start"], e["end"]) for e in onnx_line.get("entities", [])] == [
            (e["type"], e["start"], e["end"]) for e in torch_line.get("entities", [])
        ]
        for a, b in zip(onnx_line.get("entities", []), torch_line.get("entities", []), strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=2e-4)


@pytest.mark.slow
def test_bench_inference_times_the_three_models_and_fills_the_card(shipped, int8):
    result = run_distrain("bench", "inference", "--ckpt", str(int8), "--threads", "1", "--repeats", "2",
                          "--batches", "3")  # fmt: skip
    bench = json.loads((int8 / "bench_inference.json").read_text())
    assert bench["threads"] == 1
    assert {(r["model"], r["batch"]) for r in bench["results"]} == {
        (m, b) for m in ("torch_fp32", "onnx_fp32", "onnx_int8") for b in (1, 8)
    }
    assert all(0 < r["p50_ms"] <= r["p95_ms"] and r["sentences_per_s"] > 0 for r in bench["results"])
    assert "torch_fp32" in result.stdout
    assert json.loads((int8 / "onnx_export.json").read_text())["latency"]["threads"] == 1
    assert "## Latency" in (int8 / "README.md").read_text()
    assert "other_processes_cores" in bench["load"]

    # Two processes spinning on the cores meanwhile: the figures are flagged, on the console and in the card
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        busy = run_distrain("bench", "inference", "--ckpt", str(int8), "--threads", "1", "--repeats", "2",
                            "--batches", "3")  # fmt: skip
    finally:
        for spinner in spinners:
            spinner.kill()
    said = " ".join(busy.stdout.split())
    assert "warning: other processes kept" in said and "the figures are unreliable" in said, said
    assert "**Measured on a busy machine**: other processes kept" in (int8 / "README.md").read_text()


@pytest.mark.slow  # two more launches: the default suite's budget keeps the export and its eval only
def test_export_refuses_a_missing_checkpoint_and_an_existing_output(shipped, tmp_path):
    missing = run_distrain("export", f"ckpt={tmp_path / 'nope'}", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    exists = run_distrain("export", f"ckpt={shipped['run']}", f"output={shipped['fp32']}", check=False)
    assert exists.returncode == 2 and "overwrite=true" in exists.stderr and "Traceback" not in exists.stderr
    assert not list(shipped["root"].glob("*.partial")) and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_export_refuses_a_damaged_checkpoint_and_a_bad_key(shipped, tmp_path):
    damaged = tmp_path / "run" / "checkpoints" / "step_3"
    damaged.mkdir(parents=True)
    (damaged / ".metadata").write_bytes(b"")
    result = run_distrain("export", f"ckpt={damaged}", check=False)
    assert result.returncode == 2 and "incomplete checkpoint" in result.stderr and "Traceback" not in result.stderr
    bad = run_distrain("export", f"ckpt={shipped['run']}", "quantize=int4", check=False)
    assert bad.returncode == 2 and "quantize: expected one of" in bad.stderr
    assert not list(tmp_path.glob("**/*.partial"))


@pytest.mark.slow
def test_logits_beyond_the_fp32_tolerance_fail_the_export_and_leave_nothing(shipped, tmp_path):
    """The check is real: a tolerance below fp32 rounding fails it; the message names the key that ships anyway."""
    target = tmp_path / "strict"
    result = run_distrain("export", f"ckpt={shipped['run']}", "fp32_tolerance=1e-12", f"output={target}",
                          check=False)  # fmt: skip
    assert result.returncode == 2 and "ONNX fp32 logits differ from torch's by" in result.stderr, result.stderr
    assert "raise fp32_tolerance" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists() and not list(tmp_path.glob("*.partial"))
    bad = run_distrain("export", f"ckpt={shipped['run']}", "fp32_tolerance=0", check=False)
    assert bad.returncode == 2 and "fp32_tolerance: expected a number > 0, got 0" in bad.stderr


@pytest.mark.slow
def test_a_ctrl_c_during_an_export_leaves_nothing_and_says_so(shipped, tmp_path):
    target = tmp_path / "interrupted"
    partial = target.with_name(target.name + ".partial")
    # As from a terminal: a CI job may run in the background, where the shell starts everything with SIGINT ignored
    export = subprocess.Popen([DISTRAIN, "export", f"ckpt={shipped['run']}", f"output={target}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while not partial.exists() and export.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    export.send_signal(signal.SIGINT)
    out, err = export.communicate(timeout=120)
    said = " ".join(err.split())
    assert export.returncode == 130 and f"nothing was written to {target}" in said, out + err
    assert "Traceback" not in err and not target.exists() and not partial.exists()


@pytest.mark.slow
def test_int8_beyond_max_metric_drop_is_written_but_marked_failed(shipped, int8):
    """A threshold below the drop the int8 export measured (the same weights, the same deterministic quantizer):
    the folder is written, marked failed, and the command exits 1 naming both numbers."""
    drop = json.loads((int8 / "onnx_export.json").read_text())["metric_drop"]
    target = shipped["root"] / "int8_strict"
    result = run_distrain("export", f"ckpt={shipped['run']}", "quantize=int8", f"max_metric_drop={drop - 0.01}",
                          f"output={target}", check=False)  # fmt: skip
    assert result.returncode == 1, result.stderr
    meta = json.loads((target / "onnx_export.json").read_text())
    assert meta["status"] == "failed" and meta["metric_drop"] == pytest.approx(drop)
    assert "torch fp32" in result.stderr and "ONNX int8" in result.stderr and "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())  # both as percentages: the drop and the threshold
    assert f"int8 loses {drop:.2%} of dev f1" in said and f"max_metric_drop={drop - 0.01} ({drop - 0.01:.2%})" in said
    assert "status **failed**" in (target / "README.md").read_text()
    # Used anyway when asked, with a warning that says so
    (shipped["root"] / "one.txt").write_text("Paris is nice\n")
    used = run_distrain("predict", f"ckpt={target}", f"input={shipped['root'] / 'one.txt'}")
    assert f"warning: {target} failed its export check (int8 loses" in " ".join(used.stderr.split()), used.stderr


@pytest.mark.slow
def test_an_mlm_export_matches_torch(tmp_path, cache_dir):
    """Masked LM: logits over the vocabulary, within the tolerance; eval of the folder reports ORT's perplexity."""
    run = tmp_path / "mlm"
    run_distrain("train", "+experiment=minilm_mlm", "model=bert_tiny", "parallel=single", "launcher.nproc_per_node=1",
                 "data.max_train_samples=64", "data.max_eval_samples=16", "train.max_steps=3", "train.eval_every=0",
                 f"data.cache_dir={cache_dir}", f"run.dir={run}")  # fmt: skip
    # max_samples: the first 24 dev blocks score the three models (the whole split takes a minute more)
    run_distrain("export", f"ckpt={run}", "quantize=int8", "max_samples=24", f"output={tmp_path / 'onnx'}")
    meta = json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())
    assert meta["status"] == "ok" and meta["max_abs_logit_diff"]["onnx_fp32"] < 1e-4
    assert meta["dev_examples"] == 24 < meta["dev_split_examples"]
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert f"the first 24 of {meta['dev_split_examples']} dev examples (max_samples)" in card
    perplexity = {name: metrics["perplexity"] for name, metrics in meta["dev_metrics"].items()}
    assert perplexity["onnx_fp32"] == pytest.approx(perplexity["torch_fp32"], rel=1e-4)
    # int8 passes the default threshold as a fraction of the perplexity (in its units, 0.01 would refuse any LM)
    assert meta["metric_drop"] == pytest.approx(
        (perplexity["onnx_int8"] - perplexity["torch_fp32"]) / perplexity["torch_fp32"]
    )
    assert meta["metric_drop"] <= meta["max_metric_drop"] == 0.01


@pytest.fixture(scope="module")
def clm(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """A tiny Llama trained 20 steps on bundled Shakespeare (packed blocks) and its ONNX fp32 export with the cache."""
    root = tmp_path_factory.mktemp("onnx_clm")
    run, onnx_dir = root / "run", root / "onnx"
    run_distrain("train", "+experiment=shakespeare_clm", "+debug=tiny", "model=llama_tiny", "parallel=single",
                 "launcher.nproc_per_node=1", "data.max_length=64", "data.max_train_samples=64",
                 "data.max_eval_samples=8", "train.max_steps=20", "train.eval_every=0", f"data.cache_dir={cache_dir}",
                 f"run.dir={run}")  # fmt: skip
    log = run_distrain("export", f"ckpt={run}", "max_samples=16", f"output={onnx_dir}").stdout
    return {"root": root, "run": run, "onnx": onnx_dir, "log": log}


@pytest.mark.slow
def test_a_causal_lm_exports_with_its_cache_and_generates_the_torch_tokens(clm):
    """One graph (past key/values in, present out; an empty past for the prompt), checked on a padded prompt and
    decode steps; `distrain predict` through ONNX Runtime generates greedily the torch model's tokens, one by one."""
    meta = json.loads((clm["onnx"] / "onnx_export.json").read_text())
    assert meta["status"] == "ok" and meta["task"] == "clm" and meta["max_abs_logit_diff"]["onnx_fp32"] < 1e-4
    assert "2 decode steps with the cache" in " ".join(clm["log"].split())  # rich wraps long lines
    graph = onnx.load(str(clm["onnx"] / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["past_key_values.0.key"][::2] == ["batch", "past_sequence"]  # (batch, heads, past, head size)
    assert {o.name for o in graph.output} == {"logits", *(f"present.{n}.{k}" for n in (0, 1) for k in ("key", "value"))}
    prompts = "To be, or not to be\n\nThe king is\nWhat say you, my lord\n"
    (clm["root"] / "in.txt").write_text(prompts, encoding="utf-8")
    lines = {}
    for name in ("run", "onnx"):
        result = run_distrain("predict", f"ckpt={clm[name]}", f"input={clm['root'] / 'in.txt'}", "max_new_tokens=30")
        lines[name] = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines["onnx"] == lines["run"]
    assert lines["onnx"][1] == {"input": "", "skipped": "empty line"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(clm["onnx"])
    generated = [len(tokenizer(r["continuation"], add_special_tokens=False)["input_ids"]) for r in lines["onnx"][::2]]
    assert max(generated) >= 20, generated  # greedy ran through the cache for many steps, not one


@pytest.mark.slow
def test_eval_of_a_causal_lm_folder_reports_the_torch_perplexity(clm):
    """Packed dev blocks (documents attend within themselves): ONNX Runtime's perplexity equals torch's."""
    run_distrain("eval", f"ckpt={clm['onnx']}", "split=dev", "max_samples=16", f"output={clm['root'] / 'eval'}")
    evaluated = json.loads((clm["root"] / "eval" / "eval_dev.json").read_text())
    torch_dev = json.loads((clm["onnx"] / "onnx_export.json").read_text())["dev_metrics"]["torch_fp32"]
    assert (evaluated["runtime"], evaluated["runtime_precision"]) == ("onnxruntime", "fp32")
    assert evaluated["perplexity"] == pytest.approx(torch_dev["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_an_architecture_the_exporter_cannot_handle_is_named_and_leaves_nothing(tmp_path, cache_dir):
    """A tiny Mixtral (mixture of experts): torch.onnx has no ONNX function for transformers' grouped expert matmul.
    The export fails with that operator's name, exit 2, and no folder (nor its .partial) is left."""
    run = tmp_path / "moe"
    run_distrain("train", "+experiment=shakespeare_clm", "+debug=tiny", "model=llama_tiny", "parallel=single",
                 "launcher.nproc_per_node=1", "model.architecture.model_type=mixtral",
                 "+model.architecture.num_local_experts=4", "+model.architecture.num_experts_per_tok=2",
                 "data.max_length=32", "data.max_train_samples=16", "data.max_eval_samples=4", "train.max_steps=1",
                 "train.eval_every=0", f"data.cache_dir={cache_dir}", f"run.dir={run}")  # fmt: skip
    result = run_distrain("export", f"ckpt={run}", f"output={tmp_path / 'onnx'}", check=False)
    assert result.returncode == 2, result.stderr
    assert "cannot export MixtralForCausalLM" in result.stderr and "grouped_mm" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "onnx.partial").exists()
