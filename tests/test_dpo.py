"""Preference tuning (task=dpo): the loss against a hand computation, the masking of the prompt, chat rendering,
the bundled pairs, a real run, its validation; parity across strategies and stop/resume (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PARITY_STEPS, TINY, compose_train, run_distrain, run_parity, train_losses

DPO = ["+experiment=tiny_dpo", *TINY, "model=llama_tiny"]  # a tiny random-init Llama on the bundled pairs
ROOT = Path(__file__).resolve().parent.parent


def eval_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cache_dir):
    """The tiny run's task (its reference attached), data and policy model, built in this process as the worker
    builds them."""
    from distrain.trainer.model.build import build_model, model_source
    from distrain.trainer.model.tokenizer import ensure_run_tokenizer, load_tokenizer
    from distrain.trainer.parallel.distributed import DistEnv
    from distrain.trainer.tasks import build_task
    from distrain.trainer.train.reference import build_reference

    run_dir = tmp_path_factory.mktemp("dpo-run")
    cfg = compose_train([*DPO, f"data.cache_dir={cache_dir}", f"run.dir={run_dir}"])
    env = DistEnv()
    ensure_run_tokenizer(cfg, run_dir, env)
    tokenizer = load_tokenizer(cfg.model, env, run_dir)
    task = build_task(cfg, tokenizer)
    data = task.prepare(env)
    model = build_model(cfg.model, task.auto_model_class(), cfg.train.seed, model_source(cfg.model, env), tokenizer)
    task.reference = build_reference(cfg, env, task, tokenizer, model)
    return task, data, model


@torch.no_grad()
def hand_logp(model, ids: list[int], start: int) -> float:
    """log p(ids[start:] | ids[:start]) token by token, from the model's logits over the whole sequence."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return sum(float(logits[t - 1].log_softmax(-1)[ids[t]]) for t in range(start, len(ids)))


def test_loss_is_log2_at_the_start_and_matches_a_hand_computation_after_a_change(tiny):
    task, data, model = tiny
    rows = [data.splits["train"][i] for i in range(4)]
    batch = task.collate(rows)
    # Only the response tokens are targets: the chosen row's decode is the chosen topic and EOS, nothing of the prompt.
    raw = json.loads((ROOT / "trainer/data/assets/bbc_topics_dpo/train.jsonl").read_text().splitlines()[0])
    targets = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert task.tokenizer.decode(targets) == raw["chosen"] + task.tokenizer.eos_token
    assert task.num_targets(batch) == 4 and len(batch["input_ids"]) == 8  # 4 chosen rows, then 4 rejected
    with torch.no_grad():
        start = task.loss_sum(model(**task.model_batch(batch)).logits, batch) / 4
    assert float(start) == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: every reward is 0

    with torch.no_grad():  # move the policy away from its reference
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        loss = task.loss_sum(model(**task.model_batch(batch)).logits, batch) / 4
    reference = task.reference.model
    expected = 0.0
    for row in rows:
        logps = {}
        for key in ("chosen", "rejected"):
            ids, start_at = list(row[f"{key}_ids"]), int(row[f"{key}_start"])
            logps[key] = hand_logp(model, ids, start_at) - hand_logp(reference, ids, start_at)
        expected += -math.log(1 / (1 + math.exp(-task.beta * (logps["chosen"] - logps["rejected"]))))
    assert float(loss) == pytest.approx(expected / 4, rel=1e-5)
    assert abs(float(loss) - math.log(2)) > 1e-4
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training


def test_reward_metrics_from_pairs():
    from distrain.trainer.tasks.dpo import reward_metrics

    metrics = reward_metrics([(1.0, 0.0), (0.0, 0.0), (-1.0, 2.0), (0.5, 0.25)])
    assert metrics["reward_accuracy"] == 0.625  # right, tie (half), wrong, right
    assert metrics["reward_margin"] == pytest.approx((1 + 0 - 3 + 0.25) / 4)
    assert metrics["chosen_reward"] == pytest.approx(0.5 / 4) and metrics["rejected_reward"] == pytest.approx(2.25 / 4)
    margins = [1, 0, -3, 0.25]
    assert metrics["loss"] == pytest.approx(sum(-F.logsigmoid(torch.tensor(float(m))).item() for m in margins) / 4)


def test_chat_formatted_pairs_render_with_the_tokenizers_template(tiny):
    from distrain.trainer.tasks.dpo import render

    tokenizer = tiny[0].tokenizer
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip
    try:
        prompt = [{"role": "system", "content": "Name the topic."}, {"role": "user", "content": "Oil prices rise"}]
        prompt_ids, response_ids = render(tokenizer, prompt, "business")
        assert tokenizer.decode(prompt_ids).endswith("<|user|>Oil prices rise<|endoftext|><|assistant|>")
        assert tokenizer.decode(response_ids) == "business<|endoftext|>"  # the answer and its end-of-turn token
        as_messages = render(tokenizer, prompt, [{"role": "assistant", "content": "business"}])
        assert as_messages == (prompt_ids, response_ids)
    finally:
        tokenizer.chat_template = None


def test_the_bundled_pairs_are_the_scripts_output(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/make_preference_data.py"), str(tmp_path)], check=True,
                   capture_output=True)  # fmt: skip
    for split, size in (("train", 400), ("dev", 50), ("test", 50)):
        bundled = (ROOT / f"trainer/data/assets/bbc_topics_dpo/{split}.jsonl").read_text()
        assert (tmp_path / f"{split}.jsonl").read_text() == bundled
        rows = [json.loads(line) for line in bundled.splitlines()]
        assert len(rows) == size and all(r["chosen"] != r["rejected"] for r in rows)


def test_a_dpo_run_starts_at_log2_and_chance_and_exports(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_distrain("train", *DPO, f"data.cache_dir={cache_dir}", "train.eval_at_start=true", "data.max_eval_samples=16",
                 f"run.dir={run}")  # fmt: skip
    first = eval_records(run)[0]
    assert first["step"] == 0 and first["reward_accuracy"] == 0.5 and first["reward_margin"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-9)
    assert train_losses(run)[1] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the reference = the start
    last = eval_records(run)[-1]
    assert last["step"] == 10 and set(last) >= {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"}
    assert (run / "export" / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_metric"] == max(r["reward_accuracy"] for r in eval_records(run) if r["step"] > 0)


@pytest.mark.slow  # the default suite's budget: the same messages are checked in process below
def test_dpo_settings_and_data_are_checked_before_any_worker_starts(tmp_path):
    data = tmp_path / "pairs"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "Q: 2+2?\\nA:", "chosen": " 4", "rejected": " 5"}\n')
    (data / "dev.jsonl").write_text('{"prompt": "Q: 1+1?\\nA:", "chosen": " 2"}\n')
    result = run_distrain("train", *DPO, f"data.dir={data}", "~data.files.test", "dpo.beta=0",
                          f"dpo.reference={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'run'}",
                          check=False)  # fmt: skip
    assert result.returncode == 2
    out = " ".join((result.stdout + result.stderr).split())
    assert "dpo.beta: expected a finite number > 0, got 0" in out
    assert f"dpo.reference: expected a run dir, checkpoint, export or Hugging Face model folder, {tmp_path}" in out
    assert f"data.files.dev: {data / 'dev.jsonl'}:1: no column 'rejected'" in out
    assert "Traceback" not in out and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ([*DPO, "dpo.beta=0"], "dpo.beta: expected a finite number > 0, got 0"),
    ([*DPO, "dpo.reference=/nowhere"], "dpo.reference: expected a run dir, checkpoint, export or Hugging Face model"),
    (["task=ner", "dpo.beta=0.5"], "dpo.beta: only read with task=dpo (task=ner); drop it"),
    ([*DPO, "adapter=lora", "dpo.reference=."], "dpo.reference: with adapter=lora the reference is the frozen base"),
    ([*DPO, "data.labels=[a]"], "data.labels: dpo has no labels; expected null"),
    ([*DPO, "parallel=tp", "launcher.nproc_per_node=2"], "parallel.name: expected single, ddp or fsdp with task=dpo"),
])  # fmt: skip
def test_dpo_rules_name_their_key(overrides, message):
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        validate(compose_train(overrides))
    assert any(p.startswith(message) for p in error.value.problems), error.value.problems


def test_a_data_file_without_a_column_is_named_by_file_and_line(tmp_path):
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    (tmp_path / "train.jsonl").write_text('{"prompt": "Q: 2+2?\\nA:", "chosen": " 4", "rejected": " 5"}\n')
    (tmp_path / "dev.jsonl").write_text('{"prompt": "Q: 1+1?\\nA:", "chosen": " 2"}\n')
    with pytest.raises(ConfigError) as error:
        validate(compose_train([*DPO, f"data.dir={tmp_path}", "~data.files.test"]))
    assert error.value.problems == [
        f"data.files.dev: {tmp_path / 'dev.jsonl'}:1: no column 'rejected' (task=dpo "
        "reads ['prompt', 'chosen', 'rejected']); the record has ['chosen', 'prompt']"
    ]


# --- slow: strategies and resume ------------------------------------------------------------------------------
PARITY = [*DPO, "train.micro_batch_size=4", "data.max_length=48"]


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_dpo_agrees_across_single_ddp_and_fsdp(tmp_path, cache_dir, adapter):
    # The frozen copy (adapter=none) and the adapters-off base (lora), each under the three layouts; `distrain
    # parity` exits 1 (run_parity fails) when a step's loss differs by more than 1e-5.
    run_parity(tmp_path, cache_dir, "[single,ddp,fsdp]", *PARITY, f"adapter={adapter}", "optim.lr=1e-2")
    report = json.loads((tmp_path / "parity.json").read_text())
    assert all(s["max_abs_diff"] <= 1e-5 for s in report["strategies"].values())
    losses = train_losses(tmp_path / "single")
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6) and losses[PARITY_STEPS] != losses[1]


@pytest.mark.slow
def test_a_stopped_dpo_run_resumes_exactly_like_the_uninterrupted_one(tmp_path, cache_dir):
    args = [*PARITY, "parallel=fsdp", "launcher.nproc_per_node=2", "train.micro_batch_size=2",
            f"train.max_steps={PARITY_STEPS}", "data.max_eval_samples=16", f"data.cache_dir={cache_dir}"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_distrain("train", *args, f"run.dir={whole}")
    assert "stopped at step 2" in run_distrain("train", *args, f"run.dir={parts}", "train.stop_at_step=2").stdout
    assert "resumed from" in run_distrain("train", *args, f"run.dir={parts}").stdout
    assert train_losses(parts) == train_losses(whole)  # exactly: same weights, reference and batches
    assert eval_records(parts)[-1]["reward_accuracy"] == eval_records(whole)[-1]["reward_accuracy"]
    report = run_distrain("eval", f"ckpt={parts}", "split=dev", "max_samples=16").stdout  # the run's 16
    assert "reward accuracy" in report
    # The export's rewards, against the same rebuilt reference (not the export itself: loss log 2, margin 0), are
    # the run's last evaluation's
    evaluated, last = json.loads((parts / "export_eval" / "eval_dev.json").read_text()), eval_records(parts)[-1]
    assert evaluated["reward_accuracy"] == pytest.approx(last["reward_accuracy"])
    assert evaluated["reward_margin"] == pytest.approx(last["reward_margin"], abs=1e-5) != 0
    assert evaluated["loss"] == pytest.approx(last["loss"], abs=1e-5)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Headline: Oil prices rise again. Topic:\n")
    line = run_distrain("predict", f"ckpt={parts}", f"input={prompts}", "max_new_tokens=3").stdout.splitlines()[-1]
    assert set(json.loads(line)) == {"input", "continuation"}  # the export is a plain causal LM


def test_plan_counts_the_reference_and_both_answers_of_a_pair(tmp_path):
    from distrain.cli.plan import _frozen_model, meta_model_and_task
    from distrain.trainer.observe.accounting import activation_bytes

    out = tmp_path / "plan.json"
    run_distrain("plan", *DPO, "parallel=ddp", "launcher.nproc_per_node=2", f"output={out}")
    rows = {row["layout"].split()[0]: row for row in json.loads(out.read_text())}
    # the reference: a frozen fp32 copy of the starting model, replicated under ddp and sharded under fsdp
    assert rows["ddp"]["reference_bytes"] == rows["ddp"]["params_bytes"] > 0
    assert rows["fsdp"]["reference_bytes"] == rows["fsdp"]["params_bytes"] < rows["ddp"]["params_bytes"]
    assert "a tensor-parallel reference is not built" in " ".join(rows["tp"]["problems"])
    # activations: a micro-batch of 8 pairs is 16 rows (chosen and rejected), each with its logits over the vocab
    cfg = compose_train([*DPO, f"run.dir={tmp_path / 'run'}"])
    model, task = meta_model_and_task(cfg)
    rows16 = activation_bytes(model.config, 2 * cfg.train.micro_batch_size, cfg.data.max_length, 1, False,
                              vocab_logits=True)  # fmt: skip
    assert rows["ddp"]["activation_bytes"] == rows16
    lora = compose_train([*DPO, "adapter=lora", f"run.dir={tmp_path / 'run'}"])
    assert _frozen_model(lora, meta_model_and_task(lora)[0], task.auto_model_class()) is None  # the base, adapters off
