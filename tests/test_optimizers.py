"""The optimizers (`optim=adamw|sgd|adagrad|rmsprop|adafactor`): the state `distrain plan` counts is what each
holds, kernel choices survive a load, unused keys are refused, and each trains the same across strategies and a
resharded stop/resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BERT_PARITY, PARITY_STEPS, run_distrain, run_parity, train_losses

from distrain.cli.compose import compose_train
from distrain.cli.validate import validate
from distrain.trainer.errors import ConfigError
from distrain.trainer.observe.accounting import held_bytes, planned_bytes
from distrain.trainer.optim.registry import OPTIMIZERS, build_optimizer, group_settings, restore_group_settings
from distrain.trainer.parallel.dims import ParallelDims

VARIANTS = [["optim=adamw"], ["optim=sgd"], ["optim=sgd", "optim.momentum=0"], ["optim=adagrad"], ["optim=rmsprop"],
            ["optim=rmsprop", "optim.momentum=0.9"], ["optim=adafactor"]]  # fmt: skip


def _model() -> torch.nn.Module:
    # An embedding and a linear matrix (Adafactor factors them), a bias and a norm weight (vectors, kept whole).
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "_".join(x.split("=")[1] for x in o))
def test_planned_optimizer_bytes_equal_what_each_optimizer_holds(overrides):
    cfg = compose_train(["model=bert_tiny", *overrides])
    model = _model()
    optimizer = build_optimizer(model, cfg.optim)
    model(torch.tensor([[1, 2, 3]])).square().sum().backward()
    optimizer.step()
    dims, _ = ParallelDims.resolve(cfg.parallel, 1)
    held, planned = held_bytes(model, optimizer).optimizer, planned_bytes(model, dims, cfg.optim).optimizer
    assert held == planned, (overrides, held, planned)
    assert (held == 0) == (overrides == ["optim=sgd", "optim.momentum=0"])  # plain SGD keeps no state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_loading_state_keeps_the_kernels_of_the_new_layout_and_the_settings_of_the_new_config(name):
    """A checkpoint written by a fused optimizer, loaded into one built for another layout (per-parameter
    kernel) and another config (a tenth of the lr, more weight decay): the state comes back, the settings and
    kernel choices stay the new ones, and the changed hyper-parameters are named."""
    cfg = compose_train(["model=bert_tiny", f"optim={name}"])
    model = _model()
    saver = build_optimizer(model, cfg.optim)
    model(torch.tensor([[1, 2, 3]])).square().sum().backward()
    saver.step()
    lr = cfg.optim.lr / 10
    for group in saver.param_groups:
        group["initial_lr"] = cfg.optim.lr  # as the schedule sets it
    loader = type(saver)([{**group, "params": group["params"], "lr": lr, "initial_lr": lr, "weight_decay": 0.5,
                           "fused": None, "foreach": False} for group in saver.param_groups])  # fmt: skip
    settings = group_settings(loader)
    loader.load_state_dict(saver.state_dict())
    assert loader.param_groups[0]["initial_lr"] == cfg.optim.lr  # torch brings back the saver's settings ...
    changed = restore_group_settings(loader, settings)
    # ... and distrain puts back this run's, naming the hyper-parameters that differed
    assert group_settings(loader) == settings and not any(g.get("fused") for g in loader.param_groups)
    assert sorted(changed) == [f"lr {cfg.optim.lr} -> {lr}", f"weight_decay {cfg.optim.weight_decay} -> 0.5"]
    assert loader.state_dict()["state"] == saver.state_dict()["state"]  # the moments and steps are the saver's


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim=sgd", "optim.betas=[0.9,0.99]"], "optim.betas: optim=sgd does not use it"),
        (["optim=adamw", "optim.momentum=0.9"], "optim.momentum: optim=adamw does not use it"),
        (["optim=adafactor", "optim.eps=1e-6"], "optim.eps: optim=adafactor does not use it"),
        (["optim=sgd", "optim.momentum=0", "optim.nesterov=true"], "optim.nesterov: needs optim.momentum > 0"),
        (["optim=rmsprop", "optim.alpha=1.5"], "optim.alpha: expected a number in (0, 1)"),
        (["optim=adafactor", "parallel=fsdp", "launcher.nproc_per_node=2"],
         "optim.name: adafactor cannot step sharded (DTensor) parameters"),
    ],
)  # fmt: skip
def test_bad_optimizer_settings_are_rejected_before_workers_start(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose_train(["model=bert_tiny", *overrides]))
    assert any(expected in problem for problem in error.value.problems), error.value.problems


def test_an_unused_optimizer_key_exits_2_naming_it(tmp_path):
    result = run_distrain("train", "+debug=tiny", "optim=sgd", "optim.betas=[0.9,0.99]", f"run.dir={tmp_path}/r",
                          check=False)  # fmt: skip
    assert result.returncode == 2 and "optim.betas: optim=sgd does not use it" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


SLOW = {"sgd": ["optim=sgd", "optim.nesterov=true"], "adagrad": ["optim=adagrad"],
        "rmsprop": ["optim=rmsprop", "optim.momentum=0.9"], "adafactor": ["optim=adafactor"]}  # fmt: skip
RESHARDED = {"rmsprop", "adafactor"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_each_optimizer_matches_across_layouts_the_plan_and_a_resharded_resume(name, tmp_path, cache_dir):
    """Parity across every layout the optimizer supports, `distrain plan`'s optimizer bytes equal to each run's
    memory record, and fsdp(2) -> single(1) -> tp(2) stop/resume equal to the uninterrupted single run
    (adafactor, which cannot step DTensors: ddp(2) -> single(1)). The resharded resume runs for rmsprop (two
    state tensors per parameter, like adamw's, which test_parallel_cli reshards) and adafactor (factored state);
    sgd's and adagrad's single state tensors reshard the same way."""
    sharded = OPTIMIZERS[name].sharded
    strategies = ["single", "ddp", "fsdp", "tp"] if sharded else ["single", "ddp"]
    run_parity(tmp_path, cache_dir, f"[{','.join(strategies)}]", *BERT_PARITY, *SLOW[name])
    report = json.loads((tmp_path / "parity.json").read_text())
    assert all(len(r["per_step"]) == PARITY_STEPS for r in report["strategies"].values()), report
    assert all(r["max_abs_diff"] <= 1e-5 for r in report["strategies"].values()), report

    plan = tmp_path / "plan.json"
    run_distrain("plan", *BERT_PARITY, *SLOW[name], f"data.cache_dir={cache_dir}", "parallel=ddp",
                 "launcher.nproc_per_node=2", f"output={plan}")  # fmt: skip
    rows = {row["layout"].removesuffix(" (chosen)"): row for row in json.loads(plan.read_text())}
    for strategy in strategies[1:]:
        lines = (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()
        (memory,) = [json.loads(x) for x in lines if '"memory"' in x]
        assert rows[strategy]["optimizer_bytes"] == memory["optimizer_bytes"][0], (strategy, rows[strategy], memory)

    if name not in RESHARDED:
        return
    run = tmp_path / "chain"
    common = [*BERT_PARITY, *SLOW[name], f"data.cache_dir={cache_dir}", f"train.max_steps={PARITY_STEPS}",
              "data.max_eval_samples=16", "train.save_every=0", "train.keep_last=5", f"run.dir={run}"]  # fmt: skip
    two = ["launcher.nproc_per_node=2", "train.micro_batch_size=4"]
    hops = ([(["parallel=fsdp", *two, "train.stop_at_step=2"], None), (["train.stop_at_step=3"], 2),
             (["parallel=tp", "launcher.nproc_per_node=2"], 3)] if sharded else
            [(["parallel=ddp", *two, "train.stop_at_step=2"], None), ([], 2)])  # fmt: skip
    for overrides, resumed_at in hops:
        result = run_distrain("train", *common, *overrides)
        assert resumed_at is None or f"at step {resumed_at}" in result.stdout, result.stdout
    resumed, reference = train_losses(run), train_losses(tmp_path / "single")
    assert sorted(resumed) == sorted(reference) == list(range(1, PARITY_STEPS + 1))
    assert all(abs(resumed[s] - reference[s]) <= 1e-5 for s in reference), (resumed, reference)
