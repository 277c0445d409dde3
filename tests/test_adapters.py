"""LoRA adapters (adapter=lora) on the tiny Llama: the same losses under single and fsdp (one `distrain parity`
call, shared by every test here; ddp in the slow stage), checkpoints of the adapters only, the merged and adapter
exports (read with transformers and peft themselves), eval and predict on both, and the launcher's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LLAMA_PARITY, PARITY_STEPS, compose_train, run_distrain, run_parity, train_losses
from torch.distributed.checkpoint import FileSystemReader

from distrain.cli.validate import validate
from distrain.trainer.errors import ConfigError

# Tied embeddings (as SmolLM2's): the frozen output layer must stay out of checkpoints under its second name too.
# A higher lr than the parity runs': the adapters start at B = 0.
LORA = [*LLAMA_PARITY, "model.architecture.tie_word_embeddings=true", "adapter=lora", "adapter.r=4", "optim.lr=1e-2"]
STRATEGIES = ["single", "fsdp"]  # ddp: the slow stage (with activation checkpointing)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("lora-parity")
    run_parity(out, cache_dir, f"[{','.join(STRATEGIES)}]", *LORA)
    return out


def test_lora_losses_match_across_single_and_fsdp(lora_runs):
    report = json.loads((lora_runs / "parity.json").read_text())
    assert set(report["strategies"]) == set(STRATEGIES)
    for name, result in report["strategies"].items():
        assert len(result["per_step"]) == PARITY_STEPS
        assert result["max_abs_diff"] <= 1e-5, (name, result)
    losses = train_losses(lora_runs / "single")
    assert losses[PARITY_STEPS] < losses[1]  # the adapters learn


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoints_hold_the_adapters_and_their_optimizer_state_only(lora_runs, strategy):
    run = lora_runs / strategy
    (checkpoint,) = (run / "checkpoints").glob("step_*")
    keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    model = {k: v for k, v in keys.items() if k.startswith("model.")}
    optim = {k: v for k, v in keys.items() if k.startswith("optim.state.")}
    assert model and all(".lora_A." in k or ".lora_B." in k for k in model), sorted(model)[:5]
    # AdamW state (two moments and a step counter) for exactly the adapters, nothing else.
    assert {k.split(".", 2)[2].rpartition(".")[0] for k in optim} == {k.removeprefix("model.") for k in model}
    stored = sum(v.size.numel() for v in model.values())
    moments = sum(v.size.numel() for k, v in optim.items() if k.endswith((".exp_avg", ".exp_avg_sq")))
    memory = next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"memory"' in x)
    summary = json.loads((run / "summary.json").read_text())
    assert stored == memory["trainable_params"] == summary["trainable_params"] and moments == 2 * stored
    assert memory["total_params"] == summary["total_params"]
    assert stored < 0.15 * summary["total_params"]  # r=4 on the tiny Llama (10.5%); SmolLM2 at r=8: 1.8%
    dp = 2 if strategy == "fsdp" else 1  # FSDP shards the adapters' gradients and moments too
    assert sum(memory["grads_bytes"]) == 4 * stored * len(memory["grads_bytes"]) // dp


def _base_model(adapter: Path) -> torch.nn.Module:
    """The random-init base as transformers builds it from the run's architecture and seed (the run's recipe)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = yaml.safe_load((adapter / "distrain_config.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    torch.manual_seed(cfg["train"]["seed"])
    config = AutoConfig.for_model(**cfg["model"]["architecture"], vocab_size=len(tokenizer), **ids)
    return AutoModelForCausalLM.from_config(config)


def test_the_merged_export_loads_in_a_pipeline_and_equals_base_plus_adapter_in_peft(lora_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    export = lora_runs / "fsdp" / "export"
    adapter = export / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert not (export / "adapter_config.json").exists()  # the top level is a plain transformers model
    generated = pipeline("text-generation", model=str(export))("To be or not", max_new_tokens=5, do_sample=False)
    assert generated[0]["generated_text"].startswith("To be or not")
    tokenizer = AutoTokenizer.from_pretrained(export)
    inputs = tokenizer(["Now is the winter of our discontent"], return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    base = _base_model(adapter).eval()
    with torch.no_grad():
        before = base(**inputs).logits
        with_adapter = PeftModel.from_pretrained(base, adapter).eval()(**inputs).logits
        after = merged(**inputs).logits
    assert torch.allclose(with_adapter, after, atol=1e-5), (with_adapter - after).abs().max()
    assert not torch.allclose(before, after, atol=1e-4)  # the adapters changed the model


@pytest.mark.slow
def test_eval_and_predict_accept_the_adapter_folder_and_a_checkpoint(lora_runs, tmp_path):
    from transformers import pipeline

    run = lora_runs / "fsdp"
    (checkpoint,) = (run / "checkpoints").glob("step_*")
    trained = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    for name, ckpt in {"adapter": run / "export" / "adapter", "checkpoint": checkpoint}.items():
        run_distrain("eval", f"ckpt={ckpt}", "split=dev", "max_samples=16", f"output={tmp_path / name}")  # parity's
        report = json.loads((tmp_path / name / "eval_dev.json").read_text())
        assert report["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-5), name  # the run's own eval
    prompts = ["To be or not", "Now is the winter"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    result = run_distrain("predict", f"ckpt={run / 'export' / 'adapter'}", f"input={tmp_path / 'prompts.txt'}",
                          "max_new_tokens=8")  # fmt: skip
    predicted = [json.loads(line)["continuation"] for line in result.stdout.splitlines()]
    merged = pipeline("text-generation", model=str(run / "export"))
    options = {"max_new_tokens": 8, "do_sample": False, "return_full_text": False}
    greedy = [merged(prompt, **options)[0]["generated_text"] for prompt in prompts]
    assert predicted == greedy


def test_plan_counts_gradients_and_optimizer_state_of_the_adapters_only(lora_runs, tmp_path, cache_dir):
    out = tmp_path / "plan.json"
    run_distrain("plan", *LORA, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
                 f"output={out}")  # fmt: skip
    rows = {row["layout"].removesuffix(" (chosen)"): row for row in json.loads(out.read_text())}
    (memory,) = [json.loads(x) for x in (lora_runs / "fsdp" / "metrics.jsonl").read_text().splitlines()
                 if '"memory"' in x]  # fmt: skip
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert rows["fsdp"][key] == memory[key][0], key
    assert rows["fsdp"]["trainable_params"] == memory["trainable_params"]
    assert any("adapter.name: lora is not supported with parallel=tp" in p for p in rows["tp"]["problems"])


def test_mfu_counts_no_weight_gradients_for_the_frozen_base(tmp_path):
    """A frozen weight still costs its forward and its input's gradient (4 FLOPs per weight and token) but not its
    own gradient (2 more): MFU of a LoRA run must not count a full fine-tune's 6 per weight."""
    from distrain.cli.plan import meta_model
    from distrain.trainer.observe.accounting import flops_per_token

    full, lora = (meta_model(compose_train([*LORA, f"run.dir={tmp_path}", *extra])) for extra in (["adapter=none"], []))
    matmul = lambda m: sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n)  # noqa: E731
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert 0 < adapters == matmul(lora) - matmul(full)  # the adapters are all that trains
    assert flops_per_token(lora, 64) - flops_per_token(full, 64) == 6 * adapters - 2 * matmul(full)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapter.r=0"], "adapter.r: expected an integer >= 1"),
        (["adapter.alpha=-1"], "adapter.alpha: expected a finite number > 0"),
        (["adapter.dropout=1.5"], "adapter.dropout: expected a number in [0, 1)"),
        (["adapter.target_modules=[]"], "adapter.target_modules: expected null (per model family) or a non-empty"),
        (["parallel=tp", "launcher.nproc_per_node=2"], "adapter.name: lora is not supported with parallel=tp"),
        (["parallel=fsdp_tp", "launcher.nproc_per_node=2", "parallel.tp=2"], "not supported with parallel=fsdp_tp"),
        (["model.architecture.model_type=gpt2"], "adapter.target_modules: no default for model type 'gpt2'"),
    ],
)
def test_bad_adapter_settings_are_refused_before_spawn(overrides, message, tmp_path):
    cfg = compose_train([*LORA, f"run.dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert any(message in problem for problem in error.value.problems), error.value.problems


@pytest.mark.slow
def test_a_resumed_lora_run_matches_an_uninterrupted_one_and_refuses_another_base(lora_runs, tmp_path, cache_dir):
    run = tmp_path / "resumed"
    args = [*LORA, f"data.cache_dir={cache_dir}", "parallel=fsdp", "launcher.nproc_per_node=2",
            "train.micro_batch_size=4", f"train.max_steps={PARITY_STEPS}", "data.max_eval_samples=16",
            f"run.dir={run}"]  # fmt: skip
    first = run_distrain("train", *args, "train.stop_at_step=2")
    assert "stopped at step 2" in first.stdout
    second = run_distrain("train", *args)
    assert "resumed from" in second.stdout
    assert train_losses(run) == pytest.approx(train_losses(lora_runs / "fsdp"), abs=1e-6)
    # Another initialisation: another random-init base under these adapters; the resume is refused, naming both.
    # (Not another train.seed: that also changes the data order, which the launcher refuses first.)
    other = run_distrain("train", *args, "train.max_steps=6", "+model.architecture.initializer_range=0.05",
                         check=False)  # fmt: skip
    assert other.returncode != 0
    assert "was trained on a base model with weights SHA-256" in other.stdout + other.stderr


@pytest.mark.slow
def test_lora_under_ddp_and_with_activation_checkpointing_gives_the_same_losses(lora_runs, tmp_path, cache_dir):
    """ddp and fsdp with activation checkpointing: each gives the plain single run's losses (the module's fixture)."""
    run_parity(tmp_path, cache_dir, "[ddp,fsdp]", *LORA, "train.activation_checkpointing=true")
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(lora_runs / "single"), abs=1e-5)
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(lora_runs / "fsdp"), abs=1e-6)
