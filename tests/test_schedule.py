"""The schedule of `Trainer.fit()`, in this process: when it evaluates, saves, stops early, and which weights it
exports.

No torchrun: the module joins a real one-process gloo group, so the loop's collectives (barrier, all-reduce,
broadcast) run as in a worker, and each test builds its trainer as a worker does (`+debug=tiny`: a tiny BERT on
WNUT-16) from a run dir the launcher's own functions wrote. To make the decisions deterministic, the dev metric
that the evaluator returns comes from a script keyed by step; the real evaluation still runs and is recorded.
(The "is it due" rules themselves are pure functions: tests/test_cadence.py.)
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import compose_train
from safetensors.torch import load_file

from distrain.cli.rundir import absolutize, write_run_dir
from distrain.cli.validate import validate
from distrain.trainer.config.schema import load_run_config
from distrain.trainer.errors import ConfigError, UserError
from distrain.trainer.inference.load import EvalError, load_for_inference, locate
from distrain.trainer.parallel.distributed import DistEnv
from distrain.trainer.train.batches import DataOrderChanged
from distrain.trainer.train.loop import Trainer
from distrain.trainer.worker import build_trainer

HANDLED = (signal.SIGTERM, signal.SIGUSR1)  # what build_trainer's StopRequest installs handlers for


@pytest.fixture(scope="module")
def process_group(tmp_path_factory) -> Iterator[None]:
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path_factory.mktemp("process-group") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Run:
    """A trainer built from a launcher-written run dir, whose dev metric (f1) is scripted by step; it records the
    steps at which the loop evaluated and saved."""

    def __init__(self, trainer: Trainer, script: dict[int, float]):
        self.trainer, self.run_dir, self.script = trainer, trainer.run_dir, script
        self.evaluated: list[int] = []
        self.saved: list[int] = []
        evaluate, save = trainer.evaluator.evaluate, trainer.checkpoints.save

        def scripted_evaluate(split: str, step: int) -> dict[str, float]:
            metrics = evaluate(split, step)  # the real evaluation, recorded in metrics.jsonl
            self.evaluated.append(step)
            return {**metrics, "f1": script[step]}  # KeyError: an evaluation at a step not scripted

        def recorded_save(step: int) -> Path:
            self.saved.append(step)
            return save(step)

        trainer.evaluator.evaluate = scripted_evaluate
        trainer.checkpoints.save = recorded_save

    def fit(self) -> dict[str, Any]:
        return self.trainer.fit()

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, filter(str.strip, lines)) if kind is None or r["kind"] == kind]

    def eval_steps(self) -> list[int]:
        return [r["step"] for r in self.records("eval")]

    def checkpoints(self) -> dict[int, Path]:
        """Complete checkpoints on disk, by step (read here, not with the Checkpointer)."""
        folders = (self.run_dir / "checkpoints").iterdir()
        found = {int(p.name.removeprefix("step_")): p for p in folders if p.name.startswith("step_")}
        assert all((p / "COMPLETE").is_file() for p in found.values()), sorted(found)
        assert not any(p.name.endswith(".partial") for p in found.values())
        return found

    def state(self, step: int) -> dict[str, Any]:
        return json.loads((self.run_dir / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())


@pytest.fixture
def start(process_group, tmp_path, cache_dir) -> Iterator[Callable[..., Run]]:
    """start(script, *overrides, run="run") -> a Run in tmp_path/<run>; the signal handlers build_trainer installs
    are undone afterwards."""
    previous = {s: signal.getsignal(s) for s in HANDLED}

    def make(script: dict[int, float], *overrides: str, run: str = "run") -> Run:
        overrides = ("+debug=tiny", f"run.dir={tmp_path / run}", f"data.cache_dir={cache_dir}",
                     "data.max_eval_samples=16", *overrides)  # fmt: skip
        cfg = compose_train(list(overrides))
        validate(cfg)
        absolutize(cfg)
        run_dir = write_run_dir(cfg, list(overrides))
        cfg = load_run_config(run_dir / "config.yaml")  # what workers read
        assert cfg.task.metric == "f1"  # the metric the script stands for
        return Run(build_trainer(cfg, run_dir, DistEnv(rank=0, world_size=1, local_rank=0)), script)

    yield make
    for number, handler in previous.items():
        signal.signal(number, handler)


def every_step(steps: int, value: float = 0.5) -> dict[int, float]:
    return dict.fromkeys(range(steps + 1), value)


def timeline(run: Run) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in run.records() if r["kind"] in ("train", "eval")]


def expected_timeline(steps: int, evals: list[int]) -> list[tuple[str, int]]:
    """A train record at every step (train.log_every=1 in +debug=tiny), each evaluation right after its step."""
    out = [("eval", 0)] if 0 in evals else []
    for step in range(1, steps + 1):
        out += [("train", step), *([("eval", step)] if step in evals else [])]
    return out


# --- evaluation cadence --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("eval_every", "steps", "evals"), [(2, 6, [2, 4, 6]), (4, 6, [4, 6])])
def test_evaluates_every_eval_every_steps_and_at_the_end(start, eval_every, steps, evals):
    run = start(every_step(steps), f"train.eval_every={eval_every}", f"train.max_steps={steps}")
    result = run.fit()
    assert result["status"] == "finished" and result["step"] == steps
    assert run.eval_steps() == run.evaluated == evals
    assert timeline(run) == expected_timeline(steps, evals)
    assert all(r["split"] == "dev" and 0 <= r["f1"] <= 1 for r in run.records("eval"))  # the real metric


def test_eval_every_0_evaluates_at_each_epoch_end_and_at_the_end(start):
    # 48 samples in global batches of 16: an epoch is 3 steps; 7 steps end in the middle of the third epoch.
    run = start(every_step(7), "train.eval_every=0", "train.max_steps=7", "data.max_train_samples=48",
                "train.micro_batch_size=16")  # fmt: skip
    assert run.trainer.batches.steps_per_epoch == 3
    result = run.fit()
    assert result["status"] == "finished" and result["step"] == 7
    assert run.eval_steps() == run.evaluated == [3, 6, 7]
    assert timeline(run) == expected_timeline(7, [3, 6, 7])
    assert [r["epoch"] for r in run.records("train")] == pytest.approx([s / 3 for s in range(1, 8)])


def test_eval_at_start_is_recorded_at_step_0_and_never_the_best(start):
    # The baseline scores highest; were it a candidate it would be the best step (and have a checkpoint).
    run = start({0: 0.9, 2: 0.5, 4: 0.4}, "train.eval_at_start=true", "train.eval_every=2", "train.max_steps=4")
    result = run.fit()
    assert run.records()[0]["kind"] == "eval" and run.records()[0]["step"] == 0  # before any train record
    assert run.eval_steps() == run.evaluated == [0, 2, 4]
    assert timeline(run) == expected_timeline(4, [0, 2, 4])
    assert (result["best_step"], result["best_metric"]) == (2, 0.5)
    assert run.saved == [2, 4]  # the best (step 2) and the end; nothing at step 0
    assert sorted(run.checkpoints()) == [2, 4]
    assert (run.state(4)["best_step"], run.state(4)["best_metric"]) == (2, 0.5)


# --- checkpoints ---------------------------------------------------------------------------------------------------
def test_saves_every_save_every_steps_at_each_new_best_and_at_the_end_keeping_last_and_best(start):
    script = {2: 0.5, 4: 0.7, 6: 0.6, 8: 0.65}  # new bests at 2 and 4; 6 and 8 are worse than 4
    run = start(script, "train.save_every=3", "train.keep_last=1", "train.eval_every=2", "train.max_steps=8")
    result = run.fit()
    assert (result["best_step"], result["best_metric"]) == (4, 0.7)
    # 2 and 4: new bests; 3 and 6: save_every; 8: the end.
    assert run.saved == [2, 3, 4, 6, 8]
    # keep_last=1 keeps the newest; the best is kept besides it (step 4 exists only because it was a new best).
    assert sorted(run.checkpoints()) == [4, 8]
    assert run.state(4)["step"] == 4 and run.state(8)["step"] == 8
    assert (run.state(8)["best_step"], run.state(8)["best_metric"]) == (4, 0.7)


# --- early stopping ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("script", "stop", "best"),
    [
        # best at 2, then 2 evaluations without improvement: stop at 4 (step 5 would have been better)
        ({1: 0.5, 2: 0.7, 3: 0.6, 4: 0.65, 5: 0.9}, 4, (2, 0.7)),
        # step 3 improves (the count starts again); equal is no improvement: stop at 5
        ({1: 0.5, 2: 0.4, 3: 0.6, 4: 0.6, 5: 0.55, 6: 0.9}, 5, (3, 0.6)),
    ],
)
def test_early_stopping_after_patience_evaluations_without_improvement(start, script, stop, best, capsys):
    run = start(
        script, "train.early_stopping_patience=2", "train.eval_every=1", "train.max_steps=10", "train.log_every=100"
    )  # the stop, not the cadence, writes the last train record
    result = run.fit()
    assert result["status"] == "early stopped" and result["step"] == stop
    assert (result["best_step"], result["best_metric"]) == best
    assert run.eval_steps() == run.evaluated == list(range(1, stop + 1))
    assert [r["step"] for r in run.records("train")] == [stop]
    assert stop in run.checkpoints() and run.saved[-1] == stop  # stopping writes a checkpoint
    assert run.state(stop)["evals_without_improvement"] == 2
    assert (run.run_dir / "export" / "model.safetensors").is_file()  # an early stop is a finished run
    # A rerun of the same command: the run stays stopped (no step trained, no new record but the resume's)
    records = len(run.records())
    rerun = start(script, "train.early_stopping_patience=2", "train.eval_every=1", "train.max_steps=10")
    assert rerun.fit()["status"] == "early stopped" and [r["kind"] for r in run.records()[records:]] == ["resume"]
    assert f"the run was already complete at step {stop} (early stopped): nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize("stop_at", [2, 4])
def test_a_stop_request_at_a_due_evaluation_is_evaluated_first_by_the_resumed_run(start, stop_at):
    """The stop's time goes to the checkpoint; the rerun evaluates that step before training on, so its best step,
    early stopping and records are the uninterrupted run's (step 2 a new best, step 4 the early stop)."""
    script = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.65, 5: 0.9}
    settings = ("train.early_stopping_patience=2", "train.eval_every=1", "train.max_steps=10")
    stopped = start(script, *settings)
    step = stopped.trainer.stepper.run

    def stop_after(micro_batches, number):  # a STOP file, as a user or the launcher writes it, during the step
        if number == stop_at:
            (stopped.run_dir / "STOP").touch()
        return step(micro_batches, number)

    stopped.trainer.stepper.run = stop_after
    assert stopped.fit()["status"] == f"preempted at step {stop_at}"
    assert stopped.eval_steps() == list(range(1, stop_at))
    (stopped.run_dir / "STOP").unlink()  # as the launcher does before a rerun

    result = start(script, *settings).fit()
    assert result["status"] == "early stopped" and result["step"] == 4
    assert (result["best_step"], result["best_metric"]) == (2, 0.7)
    assert stopped.eval_steps() == [1, 2, 3, 4]  # each once
    assert stopped.state(4)["evals_without_improvement"] == 2 and stopped.state(2)["best_step"] == 2


# --- the export ----------------------------------------------------------------------------------------------------
def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, loaded as `distrain eval` loads them."""
    *_, model = load_for_inference(locate(path))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize(("export_weights", "exported_step", "other_step"), [("best", 4, 6), ("last", 6, 4)])
def test_the_export_holds_the_best_or_the_last_weights(start, export_weights, exported_step, other_step):
    # best at step 4, the run ends at step 6
    run = start({2: 0.5, 4: 0.8, 6: 0.6}, f"train.export_weights={export_weights}", "train.eval_every=2",
                "train.max_steps=6")  # fmt: skip
    result = run.fit()
    assert result["status"] == "finished" and (result["best_step"], result["step"]) == (4, 6)
    checkpoints = run.checkpoints()
    assert sorted(checkpoints) == [4, 6]  # keep_last=2
    exported = load_file(run.run_dir / "export" / "model.safetensors")
    expected, other = checkpoint_weights(checkpoints[exported_step]), checkpoint_weights(checkpoints[other_step])
    parameters = {name for name, _ in run.trainer.model.named_parameters()}
    assert parameters <= set(exported) <= set(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in exported), export_weights
    assert not all(torch.equal(exported[k], other[k]) for k in exported)  # two steps of training apart


# --- non-finite steps ----------------------------------------------------------------------------------------------
def strict_records(run: Run) -> list[dict[str, Any]]:
    """metrics.jsonl read as strict JSON readers do: NaN and Infinity tokens are an error."""

    def refuse(token: str) -> None:
        raise AssertionError(f"metrics.jsonl holds the non-JSON token {token}")

    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines if line.strip()]


def test_a_diverging_run_skips_its_nonfinite_steps_then_stops_as_diverged_without_saving_them(start):
    # The run: a huge learning rate without clipping gives non-finite losses from step 3 on.
    run = start(every_step(12), "optim.lr=1e30", "optim.max_grad_norm=null", "train.max_steps=12",
                "train.save_every=1", "train.keep_last=20", "train.eval_every=100")  # fmt: skip
    result = run.fit()
    assert result["status"] == "diverged"
    last_bad = result["step"]  # the step that ended the run, skipped and logged like the two before it
    message = result["error"]
    assert f"diverged at step {last_bad}: loss " in message and "train.max_nonfinite_steps=3" in message, message
    assert re.search(r"loss (nan|-?inf)|gradient norm (nan|-?inf)", message), message
    records = strict_records(run)
    train = [r for r in records if r["kind"] == "train"]
    skipped = [r["step"] for r in train if r["skipped_steps"]]
    assert skipped == [last_bad - 2, last_bad - 1, last_bad], train
    assert all(r["loss"] is None for r in train if r["skipped_steps"]), train
    # A checkpoint per step before the stop (save_every=1), every one finite; those after skipped steps hold the
    # weights of the last applied step. No export.
    checkpoints = run.checkpoints()
    assert sorted(checkpoints) == list(range(1, last_bad)), sorted(checkpoints)
    weights = {step: checkpoint_weights(path) for step, path in checkpoints.items()}
    assert all(torch.isfinite(t).all() for w in weights.values() for t in w.values())
    last_applied = last_bad - 3
    for step in skipped[:-1]:
        assert all(torch.equal(weights[step][k], weights[last_applied][k]) for k in weights[step]), step
    assert not (run.run_dir / "export").exists()


def test_a_single_nonfinite_step_is_skipped_and_the_run_goes_on(start):
    run = start(every_step(6), "train.max_steps=6", "train.eval_every=100")
    trainer, loss_sum = run.trainer, run.trainer.task.loss_sum

    def overflow_at_step_3(logits, batch):  # a real non-finite loss (as an fp32 overflow gives) in step 3 only
        loss = loss_sum(logits, batch)
        return loss * float("inf") if trainer.state.step == 2 else loss

    trainer.task.loss_sum = overflow_at_step_3
    result = run.fit()
    assert result["status"] == "finished" and result["step"] == 6
    train = {r["step"]: r for r in strict_records(run) if r["kind"] == "train"}
    assert [train[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]
    assert train[3]["loss"] is None and train[3]["grad_norm"] is None
    assert all(isinstance(train[s]["loss"], float) for s in (1, 2, 4, 5, 6))
    # Not applied: the optimizer took 5 steps, and the schedule waited (step 4 ran at step 3's learning rate).
    state = trainer.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {5}
    assert trainer.scheduler.last_epoch == 5


# --- damaged checkpoints -------------------------------------------------------------------------------------------
def largest_shard(checkpoint: Path) -> Path:
    return max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_newest_good_one(start, capsys):
    overrides = ("train.max_steps=6", "train.save_every=2", "train.keep_last=3", "train.eval_every=100",
                 "train.export_weights=last")  # fmt: skip
    reference = start(every_step(6), *overrides)
    assert reference.fit()["status"] == "finished"
    expected = load_file(reference.run_dir / "export" / "model.safetensors")
    checkpoints = reference.run_dir / "checkpoints"

    def damage_and_rerun(how: str) -> str:
        shard = largest_shard(checkpoints / "step_6")
        if how == "truncated":
            with open(shard, "r+b") as f:
                f.truncate(shard.stat().st_size // 2)
        else:  # flipped bytes, same size
            data = bytearray(shard.read_bytes())
            data[len(data) // 2 : len(data) // 2 + 8] = bytes(
                b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8]
            )
            shard.write_bytes(bytes(data))
        capsys.readouterr()
        rerun = start(every_step(6), *overrides)
        assert rerun.fit()["status"] == "finished"
        resumed = load_file(rerun.run_dir / "export" / "model.safetensors")
        assert max((resumed[k] - expected[k]).abs().max().item() for k in expected) == 0.0
        return capsys.readouterr().out

    out = damage_and_rerun("truncated")
    assert f"checkpoint step_6 skipped: {checkpoints / 'step_6' / '__0_0.distcp'} has " in out, out
    assert "truncated" in out and "renamed to step_6.damaged for inspection" in out and "at step 4" in out, out
    out = damage_and_rerun("flipped")
    assert "checkpoint step_6 skipped: " in out and "does not match the SHA-256" in out and "at step 4" in out, out
    damaged = sorted(p.name for p in checkpoints.iterdir() if ".damaged" in p.name)
    assert len(damaged) == 2 and damaged[0] == "step_6.damaged", damaged  # both kept, neither deleted
    assert sorted(p.name for p in checkpoints.iterdir() if ".damaged" not in p.name) == ["step_2", "step_4", "step_6"]

    # eval and predict refuse a damaged checkpoint, naming the file
    with pytest.raises(EvalError, match=r"step_6\.damaged/__0_0\.distcp (has|does not match)"):
        locate(checkpoints / "step_6.damaged")


# --- where a run starts: checkpoint.step, checkpoint.init_from, the data order ------------------------------------
def export_weights(run: Run) -> dict[str, torch.Tensor]:
    return load_file(run.run_dir / "export" / "model.safetensors")


def test_checkpoint_step_goes_back_keeps_the_newer_ones_and_a_rerun_continues_from_there(start, capsys):
    overrides = ("train.max_steps=6", "train.save_every=2", "train.keep_last=5", "train.eval_every=100",
                 "train.export_weights=last")  # fmt: skip
    first = start(every_step(6), *overrides)
    assert first.fit()["status"] == "finished"
    expected = export_weights(first)
    checkpoints = first.run_dir / "checkpoints"

    capsys.readouterr()
    again = start(every_step(6), *overrides, "checkpoint.step=2")
    result = again.fit()
    out = capsys.readouterr().out
    assert f"resumed from {checkpoints / 'step_2'} at step 2" in out, out
    assert result["status"] == "finished" and again.saved == [4, 6]
    resumed = export_weights(again)
    assert max((resumed[k] - expected[k]).abs().max().item() for k in expected) == 0.0  # the same steps again
    superseded = sorted(p.name.split(".")[0] for p in checkpoints.iterdir() if ".superseded-" in p.name)
    assert superseded == ["step_4", "step_6"], sorted(p.name for p in checkpoints.iterdir())  # kept, renamed
    assert again.state(6)["restarted_from"] == 2

    # The same command once more (a requeue): it resumes the continuation, not step 2 again.
    rerun = start(every_step(6), *overrides, "checkpoint.step=2")
    assert rerun.fit()["step"] == 6 and rerun.saved == []
    assert f"resumed from {checkpoints / 'step_6'} at step 6" in capsys.readouterr().out

    with pytest.raises(UserError, match=r"checkpoint.step=3: no complete checkpoint step_3 .*complete: 2, 4, 6"):
        start(every_step(6), *overrides, "checkpoint.step=3").fit()


def test_a_rewind_with_another_lr_trains_at_it_on_the_same_schedule(start, capsys):
    # Going back to an earlier checkpoint with a lower lr (after a loss spike, say): the config's lr and weight
    # decay apply from there on (torch's load_state_dict would bring back the checkpoint's), the schedule keeps
    # its place, and the output says what changed.
    overrides = ("train.max_steps=6", "train.save_every=2", "train.keep_last=5", "train.eval_every=100")
    first = start(every_step(6), *overrides, "optim.lr=5e-4", "optim.weight_decay=0.01")
    assert first.fit()["status"] == "finished"
    capsys.readouterr()
    lowered = ("optim.lr=1e-5", "optim.weight_decay=0.1")
    again = start(every_step(6), *overrides, *lowered, "checkpoint.step=2")
    assert again.fit()["status"] == "finished"
    out = capsys.readouterr().out
    assert "the optimizer's settings are this run's config from step 2 on, not the checkpoint's: " in out, out
    assert "lr 0.0005 -> 1e-05" in out and "weight_decay 0.01 -> 0.1" in out, out
    fresh = start(every_step(6), *overrides, *lowered, run="fresh")  # the same schedule at the new lr from step 0
    assert fresh.fit()["status"] == "finished"
    lrs = {r["step"]: r["lr"] for r in again.records("train")}
    assert [lrs[step] for step in range(3, 7)] == [r["lr"] for r in fresh.records("train")][2:]
    assert [g["weight_decay"] for g in again.trainer.optimizer.param_groups] == [0.1, 0.0]
    # An unchanged config says nothing of the kind (and an exact resume is tested above)
    capsys.readouterr()
    rerun = start(every_step(6), *overrides, *lowered, "checkpoint.step=4", run="fresh")
    assert rerun.fit()["status"] == "finished"
    assert "optimizer's settings" not in capsys.readouterr().out


def test_a_run_extended_by_max_steps_says_its_lr_now_follows_the_longer_schedule(start, capsys):
    overrides = ("train.save_every=2", "train.eval_every=100", "optim.lr=1e-3", "optim.warmup_ratio=0")
    assert start(every_step(4), "train.max_steps=4", *overrides).fit()["status"] == "finished"
    capsys.readouterr()
    assert start(every_step(4), "train.max_steps=4", *overrides).fit()["status"] == "finished"
    said = " ".join(capsys.readouterr().out.split())
    assert "the run was already complete at step 4 (all 4 steps): nothing to train; to train on, raise " \
           "train.max_steps or train.epochs" in said, said  # fmt: skip
    longer = start(every_step(8), "train.max_steps=8", *overrides)
    assert longer.fit()["status"] == "finished"
    said = " ".join(capsys.readouterr().out.split())
    # linear decay to 0: the lr of step 5 is 1e-3 x 4/8 on 8 steps, 0 on the finished 4-step schedule
    assert ("the learning-rate schedule spans 8 steps now, the checkpoint's 4 (train.max_steps or train.epochs "
            "changed): the lr of step 5 is 0.0005 on it, 0 on the checkpoint's") in said, said  # fmt: skip
    assert {r["step"]: r["lr"] for r in longer.records("train")}[5] == pytest.approx(5e-4)


def model_weights(run: Run) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in run.trainer.model.state_dict().items()}


def test_init_from_warm_starts_with_weights_only_from_a_checkpoint_or_an_export(start, capsys):
    source = start(every_step(4), "train.max_steps=4", "train.eval_every=100", "train.export_weights=last",
                   run="source")  # fmt: skip
    assert source.fit()["status"] == "finished"
    trained = model_weights(source)
    for where in (source.run_dir / "checkpoints" / "step_4", source.run_dir / "export", source.run_dir):
        run = start(every_step(4), "train.max_steps=4", f"checkpoint.init_from={where}", run=f"warm-{where.name}")
        fresh = model_weights(run)
        assert run.trainer.checkpoints.restore() == 0  # a fresh run: step 0, no optimizer state, a new schedule
        warm = model_weights(run)
        assert all(torch.equal(warm[k], trained[k]) for k in trained), where
        assert not all(torch.equal(fresh[k], trained[k]) for k in trained)
        assert run.trainer.optimizer.state_dict()["state"] == {} and run.trainer.scheduler.last_epoch == 0
        assert "warm start: weights from" in capsys.readouterr().out

    # The weights must fit the model: a narrower BERT is refused, naming a tensor and both shapes.
    narrow = start(every_step(4), "train.max_steps=4", "model.architecture.hidden_size=16",
                   f"checkpoint.init_from={source.run_dir / 'export'}", run="narrow")  # fmt: skip
    with pytest.raises(UserError, match=r"does not fit this model:\n  - .*\(.*32.*\) there, \(.*16.*\) here"):
        narrow.trainer.checkpoints.restore()

    # A run dir with checkpoints of its own resumes them (a requeued warm-started job must not start over).
    warm = start(every_step(4), "train.max_steps=4", "train.stop_at_step=2",
                 f"checkpoint.init_from={source.run_dir}", run="warm-own")  # fmt: skip
    warm.fit()
    capsys.readouterr()
    again = start(every_step(4), "train.max_steps=4", f"checkpoint.init_from={source.run_dir}", run="warm-own")
    assert again.trainer.checkpoints.restore() == 2
    assert "warm start" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("train.micro_batch_size=8", "train.micro_batch_size x train.grad_accum_steps x data-parallel processes: "
                                     "the checkpoint has 16, this run 8"),
        ("data.max_train_samples=128", "the training samples (data.*: files, max_train_samples, max_length): "
                                       "the checkpoint has 256, this run 128"),
        ("train.seed=1", "train.seed: the checkpoint has 0, this run 1"),
    ],
)  # fmt: skip
def test_a_resume_on_another_order_of_the_data_is_refused_naming_what_changed(start, change, named):
    overrides = ("train.max_steps=6", "train.stop_at_step=2", "train.eval_every=100")
    assert start(every_step(6), *overrides).fit()["status"] == "stopped at step 2"
    with pytest.raises(DataOrderChanged) as error:
        start(every_step(6), *overrides, change).fit()
    assert named in str(error.value) and "checkpoint.init_from=" in str(error.value), str(error.value)


def test_new_head_takes_the_body_of_a_run_on_another_label_set(start, capsys, tmp_path):
    # Transfer (CoNLL-2003's tags to WNUT-16's): the source knows fewer labels than the new run.
    source = start(every_step(4), "train.max_steps=4", "train.eval_every=100", "train.export_weights=last",
                   run="source")  # fmt: skip
    assert source.fit()["status"] == "finished"
    trained = model_weights(source)
    id2label = json.loads((source.run_dir / "head.json").read_text())["id2label"]
    labels = [id2label[k] for k in sorted(id2label, key=int)] + ["B-extra", "I-extra"]
    more_labels = f"data.labels=[{','.join(labels)}]"

    refused = start(every_step(4), more_labels, f"checkpoint.init_from={source.run_dir}", run="refused")
    with pytest.raises(UserError, match=r"classifier.weight: \(\d+, 32\) there, \(\d+, 32\) here(.|\n)*"
                                        r"checkpoint.new_head=true takes only the body"):  # fmt: skip
        refused.trainer.checkpoints.restore()

    head = {"classifier.weight", "classifier.bias"}
    for where in (source.run_dir / "checkpoints" / "step_4", source.run_dir / "export"):
        run = start(every_step(4), "train.max_steps=4", more_labels, f"checkpoint.init_from={where}",
                    "checkpoint.new_head=true", run=f"new-head-{where.name}")  # fmt: skip
        fresh = model_weights(run)
        assert run.trainer.checkpoints.restore() == 0
        warm = model_weights(run)
        assert warm["classifier.weight"].shape[0] == len(labels)
        assert all(torch.equal(warm[k], fresh[k]) for k in head)  # the seeded new head, untouched
        assert all(torch.equal(warm[k], trained[k]) for k in trained if k not in head), where
        assert "the task head (classifier.bias, classifier.weight) starts afresh" in capsys.readouterr().out
        assert run.fit()["status"] == "finished"

    # Refused before spawn: without init_from, and for a task whose head is the vocabulary.
    for overrides, expected in (
        ([], "checkpoint.new_head: expected false without checkpoint.init_from"),
        (["task=clm", f"checkpoint.init_from={source.run_dir}"], "checkpoint.new_head: expected false for task=clm"),
    ):
        cfg = compose_train(["+debug=tiny", f"run.dir={tmp_path / 'bad'}", "checkpoint.new_head=true", *overrides])
        with pytest.raises(ConfigError, match=expected):
            validate(cfg)
