"""Pruning. Magnitude (prune=magnitude): the cubic schedule, global and per-layer masks, the same run under single
and fsdp with the zeros in the export and the sparsity on its model card, stop/resume, and bad settings.
Structured (prune=structured): the least important feed-forward neurons of BERT and Llama blocks masked, kept
pruned, and removed without changing a logit; the same run under single and fsdp exporting a smaller model that
transformers and `distrain eval` load and score as the run did."""

from __future__ import annotations

import pytest
import torch
from conftest import BERT_PARITY, PARITY_STEPS, TINY, compose_train, run_distrain, run_parity, train_losses
from safetensors.torch import load_file

# masks chosen at steps 1, 3 and 4 (the end), zeros kept at steps 2 and 5
PRUNE = ["prune=magnitude", "prune.sparsity=0.5", "prune.scope=layer", "prune.start_step=1", "prune.end_step=4",
         "prune.every=2"]  # fmt: skip


def test_the_schedule_is_zhu_and_gupta_cubic_ramp():
    from distrain.trainer.train.prune import chooses, target_sparsity

    prune = compose_train([*TINY, "prune=magnitude", "prune.sparsity=0.8", "prune.start_step=10",
                           "prune.end_step=20"]).prune  # fmt: skip
    assert [target_sparsity(t, prune, 30) for t in (0, 9, 10, 20, 25)] == [0, 0, 0, 0.8, 0.8]
    assert target_sparsity(15, prune, 30) == pytest.approx(0.8 * (1 - 0.5**3))
    assert [chooses(t, prune, 30) for t in (9, 10, 11, 20, 21)] == [False, True, False, True, False]
    prune.every = 4
    assert [t for t in range(30) if chooses(t, prune, 30)] == [10, 14, 18, 20]
    prune.end_step = None  # the run's last step
    assert target_sparsity(30, prune, 30) == pytest.approx(0.8) and target_sparsity(29, prune, 30) < 0.8


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_masks_zero_the_smallest_base_weights_only(scope):
    from transformers import BertConfig, BertForTokenClassification

    from distrain.trainer.train.prune import Pruner, pruned_modules

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)  # fmt: skip
    model = BertForTokenClassification(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune = compose_train([*TINY, "prune=magnitude", "prune.sparsity=0.6", f"prune.scope={scope}"]).prune
    pruner = Pruner(model, prune, total_steps=10)
    pruner.before_step(10)
    pruner.apply(10)
    names = {f"{name}.weight" for name, _ in pruned_modules(model)}
    assert len(names) == 2 * 6  # q, k, v, attention output, intermediate, output per block (no pooler here)
    after = model.state_dict()
    pruned = torch.cat([after[n].flatten() for n in sorted(names)])
    assert (pruned == 0).float().mean().item() == pytest.approx(0.6, abs=1e-3)
    for name in names:
        zero = after[name] == 0
        if scope == "layer":  # each matrix on its own
            assert zero.float().mean().item() == pytest.approx(0.6, abs=1 / zero.numel() + 1e-6), name
        # kept weights are untouched, and every zeroed one was no larger than every kept one of its scope
        assert torch.equal(after[name][~zero], before[name][~zero])
    smallest_kept = min(before[n][after[n] != 0].abs().min() for n in names)
    largest_zeroed = max(before[n][after[n] == 0].abs().max() for n in names)
    if scope == "global":
        assert largest_zeroed <= smallest_kept
    for name in set(after) - names:  # embeddings, norms, biases, the classifier
        assert torch.equal(after[name], before[name]), name
    # after the schedule's end, an update (here: noise on every weight) leaves the zeros where they were
    zeros = {name: after[name] == 0 for name in names}
    pruner.before_step(11)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    pruner.apply(11)
    assert all(torch.equal(model.state_dict()[name] == 0, zeros[name]) for name in names)


STRUCTURED = ["prune=structured", "prune.sparsity=0.5", "prune.start_step=1", "prune.end_step=4", "prune.every=2"]


def _tiny(family: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "bert":
        return BertForTokenClassification(
            BertConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=3,
            )
        )
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64))  # fmt: skip


@torch.no_grad()
def update(model: torch.nn.Module) -> None:
    """What an optimizer step does to pruned weights too (momentum): move every weight."""
    for parameter in model.parameters():
        parameter.add_(0.01 * torch.randn_like(parameter))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_structured_pruning_removes_the_least_important_neurons_without_changing_a_logit(family):
    from distrain.trainer.train.prune import NeuronPruner, feed_forwards, shrunk_state

    model = _tiny(family).eval()
    prune = compose_train([*TINY, "prune=structured", "prune.sparsity=0.5", "prune.start_step=0",
                           "prune.end_step=10", "prune.every=5"]).prune  # fmt: skip
    pruner = NeuronPruner(model, prune, total_steps=10)
    layers = feed_forwards(model)
    assert len(layers) == 2 and len(layers[0].inputs) == (1 if family == "bert" else 2)

    def pruned() -> list[torch.Tensor]:
        return [(layer.output.weight == 0).all(dim=0) for layer in layers]

    def importance(layer) -> torch.Tensor:
        score = layer.output.weight.norm(dim=0)
        for linear in layer.inputs:
            score = score * linear.weight.norm(dim=1)
        return score

    scores = [importance(layer) for layer in layers]
    pruner.before_step(5)
    pruner.apply(5)  # s_5 = 0.5 * (1 - 0.5^3): 28 of 64 neurons in each layer
    first = pruned()
    for layer, gone, score in zip(layers, first, scores, strict=True):
        assert int(gone.sum()) == 28
        assert score[gone].max() <= score[~gone].min()  # the least important ones
        for linear in layer.inputs:  # their rows (and biases) are zero too; the others untouched
            assert (linear.weight[gone] == 0).all() and (linear.weight[~gone] != 0).all()
            assert linear.bias is None or (linear.bias[gone] == 0).all()
    pruner.before_step(10)
    update(model)
    pruner.apply(10)  # the end: 32 pruned, the 28 of before among them
    second = pruned()
    assert all(int(gone.sum()) == 32 and bool(gone[before].all()) for gone, before in zip(second, first, strict=True))
    pruner.before_step(11)
    update(model)
    pruner.apply(11)  # after the end: the same neurons stay pruned
    assert all(torch.equal(a, b) for a, b in zip(pruned(), second, strict=True))

    state, size = shrunk_state(model.state_dict(), model)
    assert size == 32
    config = model.config.__class__(**{**model.config.to_dict(), "intermediate_size": 32})
    smaller = type(model)(config).eval()
    smaller.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(smaller(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_structured_pruning_runs_alike_under_single_and_fsdp_and_exports_a_smaller_model(tmp_path, cache_dir):
    import json

    from transformers import AutoModelForTokenClassification, pipeline

    run_parity(tmp_path, cache_dir, "[single,fsdp]", *BERT_PARITY, *STRUCTURED, "data.max_eval_samples=16")
    exports = [tmp_path / strategy / "export" for strategy in ("single", "fsdp")]
    sizes = [json.loads((export / "config.json").read_text())["intermediate_size"] for export in exports]
    assert sizes == [32, 32]  # bert_tiny's 64 neurons per layer, half removed
    a, b = (load_file(export / "model.safetensors") for export in exports)
    assert a["bert.encoder.layer.0.intermediate.dense.weight"].shape[0] == 32
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert "keeps 32 of its 64 feed-forward neurons" in (exports[1] / "README.md").read_text()
    model = AutoModelForTokenClassification.from_pretrained(exports[1])
    assert model.config.intermediate_size == 32
    assert isinstance(pipeline("token-classification", model=str(exports[1]))("Paris"), list)
    # the smaller model scores the dev set as the run's masked full-size model did at its last step
    # (token accuracy: after 5 steps the tiny model finds no entity, so its entity F1 is 0 either way)
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    run_dev = [r for r in records if r["kind"] == "eval" and r.get("split") == "dev"][-1]
    run_distrain("eval", f"ckpt={exports[1]}", "split=dev", "max_samples=16", f"output={tmp_path / 'eval'}")
    smaller_dev = json.loads((tmp_path / "eval" / "eval_dev.json").read_text())
    assert 0 < run_dev["accuracy"] < 1 and smaller_dev["accuracy"] == pytest.approx(run_dev["accuracy"], abs=1e-9)
    assert smaller_dev["f1"] == pytest.approx(run_dev["f1"], abs=1e-9)


@pytest.mark.slow
def test_pruning_agrees_across_single_and_fsdp_and_the_export_holds_the_zeros(tmp_path, cache_dir):
    run_parity(tmp_path, cache_dir, "[single,fsdp]", *BERT_PARITY, *PRUNE)
    for strategy in ("single", "fsdp"):
        export = tmp_path / strategy / "export"
        weights = load_file(export / "model.safetensors")
        pruned = [k for k in weights if k.startswith("bert.") and k.endswith(".weight") and weights[k].dim() == 2
                  and "embeddings" not in k]  # fmt: skip
        assert len(pruned) == 2 * 6
        for name in pruned:  # per layer: exactly half (ties at the threshold could only add zeros)
            assert 0.5 <= (weights[name] == 0).float().mean().item() <= 0.5 + 2 / weights[name].numel(), name
        assert (weights["classifier.weight"] != 0).all()
        card = (export / "README.md").read_text()
        assert "## Pruning" in card and "| bert.encoder.layer.0.attention.self.query.weight | 0.5" in card
    from transformers import pipeline

    assert isinstance(pipeline("token-classification", model=str(tmp_path / "fsdp" / "export"))("Paris"), list)


@pytest.mark.parametrize(("overrides", "message"), [
    (["prune.sparsity=1.0"], "prune.sparsity: expected a number in [0, 1)"),
    (["prune.sparsity=-0.1"], "prune.sparsity: expected a number in [0, 1)"),
    (["prune.every=0"], "prune.every: expected an integer >= 1"),
    (["adapter=lora"], "prune.name: expected none with adapter=lora"),
    (["prune.end_step=11"], "prune.end_step: expected at most train.max_steps (10), got 11"),
    (["prune.start_step=5", "prune.end_step=5"], "prune.start_step: expected less than prune.end_step (5), got 5"),
    (["prune.start_step=10"], "prune.start_step: expected less than prune.end_step (10), got 10"),
])  # fmt: skip
def test_bad_pruning_settings_are_refused_before_spawn(overrides, message):
    _refused([*TINY, "prune=magnitude", *overrides], message)


@pytest.mark.parametrize(("overrides", "message"), [
    (["prune.sparsity=0.3"], "prune.sparsity: prune=none: no pruning; choose prune=magnitude or structured; drop it"),
    (["distill.alpha=0.9"], "distill.alpha: distill.teacher is null: no distillation; drop it"),
    (["sweep.n_trials=5"], "sweep.n_trials: only read by a search (hparams_search=...); drop it"),
])  # fmt: skip
def test_a_setting_of_a_switched_off_method_is_refused_not_ignored(overrides, message):
    _refused([*TINY, *overrides], message)


@pytest.mark.parametrize(("overrides", "message"), [
    (["prune.scope=global"], "prune.scope: expected layer with prune=structured"),
    (["model.architecture.model_type=gpt2"], "structured pruning of a 'gpt2' model, whose feed-forward layers"),
])  # fmt: skip
def test_bad_structured_pruning_settings_are_refused_before_spawn(overrides, message):
    _refused([*TINY, "prune=structured", *overrides], message)


def _refused(overrides: list[str], message: str) -> None:
    from distrain.cli.validate import validate
    from distrain.trainer.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        validate(compose_train(overrides))
    assert any(message in problem for problem in error.value.problems), error.value.problems


@pytest.mark.slow  # the messages are checked in process above; this is the command's exit code
def test_the_command_exits_2_on_a_bad_sparsity(tmp_path):
    result = run_distrain("train", *TINY, "prune=magnitude", "prune.sparsity=1", f"run.dir={tmp_path / 'run'}",
                          check=False)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "prune.sparsity: expected a number in [0, 1)" in " ".join((result.stdout + result.stderr).split())
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["magnitude", "structured"])
def test_a_pruned_ddp_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path, cache_dir, kind):
    prune = PRUNE if kind == "magnitude" else STRUCTURED
    run_parity(tmp_path / "parity", cache_dir, "[ddp]", *BERT_PARITY, *prune)
    run = tmp_path / "resumed"
    args = [*BERT_PARITY, *prune, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
            "train.micro_batch_size=4", f"train.max_steps={PARITY_STEPS}", "data.max_eval_samples=16",
            "train.log_every=1", "train.export_weights=last", f"run.dir={run}"]  # fmt: skip
    assert "stopped at step 2" in run_distrain("train", *args, "train.stop_at_step=2").stdout
    assert "resumed from" in run_distrain("train", *args).stdout
    reference = train_losses(tmp_path / "parity" / "ddp")
    assert train_losses(run) == pytest.approx(reference, abs=1e-6)
    a = load_file(run / "export" / "model.safetensors")
    b = load_file(tmp_path / "parity" / "ddp" / "export" / "model.safetensors")
    assert all(torch.equal(a[k] == 0, b[k] == 0) for k in a)  # the same weights pruned
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_a_schedule_longer_than_an_epoch_based_run_is_refused_by_the_workers(tmp_path, cache_dir):
    result = run_distrain("train", *TINY, "prune=magnitude", "train.max_steps=null", "train.epochs=1",
                          "prune.end_step=1000", f"data.cache_dir={cache_dir}", f"run.dir={tmp_path / 'run'}",
                          check=False)  # fmt: skip
    assert result.returncode != 0
    out = " ".join((result.stdout + result.stderr).split())
    assert "prune.end_step: expected at most the run's" in out and "got 1000" in out, out
