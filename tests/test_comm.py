"""DDP communication hooks (`parallel.comm_hook=none|fp16|bf16|powersgd`), FSDP's reduce dtype (`comm_hook=fp16|bf16`)
and periodic syncs (`parallel.sync=local_sgd|diloco`): bytes per step in the train records, their state carried
exactly through a stop/resume, and the layouts that cannot take them refused before start."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BERT_PARITY, TINY, run_distrain, run_parity, train_losses
from safetensors.torch import load_file

from distrain.cli.compose import compose_train
from distrain.cli.validate import validate
from distrain.trainer.errors import ConfigError
from distrain.trainer.parallel.comm import row_sparse_embedding

STEPS = 6


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["parallel=fsdp", "launcher.nproc_per_node=2", "parallel.comm_hook=powersgd"],
         "parallel.comm_hook: powersgd is a DDP communication hook; parallel=fsdp reduce-scatters gradient shards and "
         "takes only fp16 or bf16"),
        (["parallel=fsdp_tp", "launcher.nproc_per_node=2", "parallel.tp=2", "parallel.comm_hook=powersgd"],
         "parallel.comm_hook: powersgd is a DDP communication hook; parallel=fsdp_tp reduce-scatters"),
        (["parallel=tp", "launcher.nproc_per_node=2", "parallel.comm_hook=fp16"],
         "parallel.comm_hook: fp16 changes how gradients are reduced between data-parallel ranks; parallel=tp has no "
         "such reduction"),
        (["parallel=fsdp", "launcher.nproc_per_node=2", "parallel.sync=local_sgd", "parallel.comm_hook=bf16"],
         "parallel.sync: local_sgd needs parallel=ddp"),
        (["parallel=ddp", "launcher.nproc_per_node=2", "parallel.powersgd.rank=0"],
         "parallel.powersgd.rank: expected an integer >= 1, got 0"),
        (["parallel=ddp", "launcher.nproc_per_node=2", "parallel.powersgd.start_step=1"],
         "parallel.powersgd.start_step: expected an integer >= 2"),
        (["parallel=ddp", "launcher.nproc_per_node=2", "parallel.sync=local_sgd", "parallel.sync_every=0"],
         "parallel.sync_every: expected an integer >= 1"),
        (["parallel=fsdp", "launcher.nproc_per_node=2", "parallel.sync=diloco"],
         "parallel.sync: diloco needs parallel=ddp"),
        (["parallel=ddp", "launcher.nproc_per_node=2", "parallel.sync=diloco", "parallel.comm_hook=powersgd"],
         "parallel.comm_hook: powersgd cannot combine with parallel.sync=diloco"),
        (["parallel=ddp", "launcher.nproc_per_node=2", "parallel.sync=local_sgd", "parallel.comm_hook=bf16"],
         "parallel.comm_hook: bf16 cannot combine with parallel.sync=local_sgd"),
    ],
)  # fmt: skip
def test_bad_communication_settings_are_rejected_before_workers_start(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose_train(["model=bert_tiny", *overrides]))
    assert any(expected in problem for problem in error.value.problems), error.value.problems


def _tiny(tied: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM

    if not tied:
        return BertForTokenClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, tie_word_embeddings=True))  # fmt: skip


@pytest.mark.parametrize(
    ("tied", "overrides", "expected"),
    [
        (False, [], "bert.embeddings.word_embeddings.weight"),
        (False, ["parallel.sparse_embedding_grads=false"], None),
        (False, ["parallel.comm_hook=fp16"], "bert.embeddings.word_embeddings.weight"),  # the hook takes the rest
        (False, ["parallel.comm_hook=powersgd"], "bert.embeddings.word_embeddings.weight"),
        (False, ["parallel.sync=local_sgd"], None),  # gradients stay on their rank between syncs
        (True, [], None),  # the output layer gives every row of a tied embedding a gradient
    ],
)  # fmt: skip
def test_which_embedding_ddp_leaves_to_the_row_sparse_all_reduce(tied, overrides, expected):
    parallel = compose_train(["model=bert_tiny", "parallel=ddp", "launcher.nproc_per_node=2", *overrides]).parallel
    model = _tiny(tied)
    assert row_sparse_embedding(model, parallel) == expected
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen (LoRA): no gradient to reduce
    assert row_sparse_embedding(model, parallel) is None


def test_the_row_sparse_embedding_all_reduce_gives_ddps_dense_result_for_fewer_bytes(tmp_path, cache_dir):
    """DDP with the word embedding's touched rows all-reduced apart (the default) against DDP's own dense
    all-reduce of every gradient: the same losses and the same final weights, bit for bit, and fewer bytes."""
    run_distrain("parity", *TINY, f"data.cache_dir={cache_dir}", "strategies=[ddp]", "steps=4",
                 "variant=parallel.sparse_embedding_grads=false", f"out={tmp_path}")  # fmt: skip
    sparse, dense = tmp_path / "ddp_reference", tmp_path / "ddp_parallel.sparse_embedding_grads_false"
    assert train_losses(sparse) == train_losses(dense) and len(train_losses(dense)) == 4
    weights = [load_file(run / "export" / "model.safetensors") for run in (sparse, dense)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    embedding = weights[0]["bert.embeddings.word_embeddings.weight"].numel()
    full = 4 * json.loads((dense / "summary.json").read_text())["trainable_params"]
    assert all(r["comm_bytes_per_step"] == full for r in _records(dense).values())
    for record in _records(sparse).values():  # the rest dense, the embedding's row mask, and some of its rows
        assert full - 4 * embedding < record["comm_bytes_per_step"] < full - 2 * embedding, record


def test_ddp_on_one_host_sums_gradients_through_shared_memory_as_gloo_does(tmp_path, cache_dir):
    """Gradient buckets summed through shared memory (the default for CPU ranks of one host) against gloo's
    all-reduce: with two ranks the same losses and final weights bit for bit (a + b = b + a). Each rank's log says
    which way its gradients went."""
    run_distrain("parity", *TINY, f"data.cache_dir={cache_dir}", "strategies=[ddp]", "steps=4",
                 "variant=parallel.shm_allreduce=false", f"out={tmp_path}")  # fmt: skip
    shared, gloo = tmp_path / "ddp_reference", tmp_path / "ddp_parallel.shm_allreduce_false"
    assert train_losses(shared) == train_losses(gloo) and len(train_losses(gloo)) == 4
    weights = [load_file(run / "export" / "model.safetensors") for run in (shared, gloo)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    for rank in (0, 1):
        assert "gradients all-reduced through shared memory (2 ranks" in _rank_log(shared, rank)
        assert "shared memory" not in _rank_log(gloo, rank)


def test_without_room_for_shared_memory_ddp_keeps_gloo_and_says_why(tmp_path, cache_dir, monkeypatch):
    """A rank that cannot make its shared-memory file (here the folder is a file) leaves every rank on gloo: the
    run trains as before, and each rank's log names the cause and the way out."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    for log in _ddp_logs_with_shm_dir(blocker, tmp_path, cache_dir, monkeypatch):
        assert f"gradients all-reduced by gloo, not through shared memory: Not a directory ({blocker}/distrain-" in log
        assert "set DISTRAIN_SHM_DIR to a tmpfs folder with room, or parallel.shm_allreduce=false" in log


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_tmpfs_leaves_ddp_on_gloo_and_no_file_behind(tmp_path, cache_dir, monkeypatch):
    """A tmpfs without room for the shared-memory files (1 MiB, each needs 8): posix_fallocate fails on every
    rank, each says so, the run trains on gloo, and the files it had begun are gone."""
    small = tmp_path / "small-shm"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        for log in _ddp_logs_with_shm_dir(small, tmp_path, cache_dir, monkeypatch):
            assert "gradients all-reduced by gloo, not through shared memory: No space left on device (" in log
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_three_ranks_summing_through_shared_memory_agree_with_gloo(tmp_path, cache_dir):
    """With three ranks the shared-memory sum adds in rank order and gloo's ring in another: the losses and final
    weights agree to rounding."""
    run_distrain("parity", *TINY, "train.micro_batch_size=6", f"data.cache_dir={cache_dir}", "strategies=[ddp]",
                 "steps=4", "nproc=3", "variant=parallel.shm_allreduce=false", f"out={tmp_path}")  # fmt: skip
    shared, gloo = tmp_path / "ddp_reference", tmp_path / "ddp_parallel.shm_allreduce_false"
    assert "gradients all-reduced through shared memory (3 ranks" in _rank_log(shared, 2)
    for step, loss in train_losses(gloo).items():
        assert math.isclose(train_losses(shared)[step], loss, rel_tol=1e-6), step
    weights = [load_file(run / "export" / "model.safetensors") for run in (shared, gloo)]
    assert all(torch.allclose(weights[0][name], weights[1][name], rtol=0, atol=1e-6) for name in weights[0])


def _ddp_logs_with_shm_dir(folder: Path, tmp_path: Path, cache_dir: str, monkeypatch) -> list[str]:
    """Both rank logs of a 2-step, 2-rank DDP run told to make its shared-memory files in `folder`, which trained."""
    monkeypatch.setenv("DISTRAIN_SHM_DIR", str(folder))
    run_dir = tmp_path / "run"
    run_distrain("train", *TINY, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
                 "train.max_steps=2", "data.max_eval_samples=8", f"run.dir={run_dir}")  # fmt: skip
    assert len(train_losses(run_dir)) == 2
    return [_rank_log(run_dir, rank) for rank in (0, 1)]


def _rank_log(run: Path, rank: int) -> str:
    return (run / "logs" / f"rank_{rank}.log").read_text()


def _records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "train"}


# FSDP reducing in bf16 against fp32: the losses' largest relative difference allowed (measured: 6e-7 over 5 steps)
FSDP_BF16_REL_TOL = 1e-4


def test_fsdp_reduces_in_bf16_with_half_the_bytes_and_nearly_the_fp32_losses(tmp_path, cache_dir):
    """`distrain parity strategies=[fsdp] variant=parallel.comm_hook=bf16`: the bf16 reduce-scatter trains within
    FSDP_BF16_REL_TOL of the fp32 one, not identically (the reduction really ran in bf16), and its reduce-scatter
    input is exactly half the fp32 one's: every gradient element (each tensor's first dimension padded to a
    multiple of the 2 ranks, as FSDP shards it) at 4 bytes, then 2."""
    run_parity(tmp_path, cache_dir, "[fsdp]", *BERT_PARITY, "variant=parallel.comm_hook=bf16", "tolerance=1e-3")
    fp32, bf16 = tmp_path / "fsdp_reference", tmp_path / "fsdp_parallel.comm_hook_bf16"
    reference, reduced = train_losses(fp32), train_losses(bf16)
    assert sorted(reduced) == sorted(reference) == [1, 2, 3, 4, 5]
    assert all(abs(reduced[s] - reference[s]) <= FSDP_BF16_REL_TOL * reference[s] for s in reference), reduced
    assert any(reduced[s] != reference[s] for s in reference), reduced

    shapes = [t.shape for t in load_file(fp32 / "export" / "model.safetensors").values()]
    assert sum(map(math.prod, shapes)) == json.loads((fp32 / "summary.json").read_text())["trainable_params"]
    padded = sum(math.ceil(shape[0] / 2) * 2 * math.prod(shape[1:]) for shape in shapes)
    assert {r["comm_bytes_per_step"] for r in _records(fp32).values()} == {4 * padded}
    assert {r["comm_bytes_per_step"] for r in _records(bf16).values()} == {2 * padded}


@pytest.mark.slow
def test_hooks_send_fewer_bytes_and_powersgd_resumes_exactly(tmp_path, cache_dir):
    """Every hook against plain DDP on the same global batches: fp16/bf16 send half the bytes, PowerSGD (rank 2
    after 3 plain steps, the word embedding's touched rows apart as shipped) far fewer, all with losses close to
    plain DDP's; PowerSGD stopped after step 4 (its error feedback and factors in the checkpoint) and resumed gives
    the uninterrupted losses exactly."""
    common = [*TINY, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
              "train.micro_batch_size=4", f"train.max_steps={STEPS}", "data.max_eval_samples=16",
              "parallel.powersgd.rank=2", "parallel.powersgd.start_step=3"]  # fmt: skip
    for hook in ("none", "fp16", "bf16", "powersgd"):  # none: DDP's own dense all-reduce of every gradient
        dense = [] if hook == "powersgd" else ["parallel.sparse_embedding_grads=false"]
        run_distrain("train", *common, f"parallel.comm_hook={hook}", *dense, f"run.dir={tmp_path / hook}")
    cut = tmp_path / "cut"
    run_distrain("train", *common, "parallel.comm_hook=powersgd", "train.stop_at_step=4", f"run.dir={cut}")
    result = run_distrain("train", *common, "parallel.comm_hook=powersgd", f"run.dir={cut}")
    assert "at step 4" in result.stdout
    resumed, uninterrupted = train_losses(cut), train_losses(tmp_path / "powersgd")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, STEPS + 1))
    assert all(resumed[s] == uninterrupted[s] for s in uninterrupted), (resumed, uninterrupted)

    runs = {hook: _records(tmp_path / hook) for hook in ("none", "fp16", "bf16", "powersgd")}
    full = runs["none"][1]["comm_bytes_per_step"]
    assert full == 4 * json.loads((tmp_path / "none" / "summary.json").read_text())["trainable_params"]  # fp32 each
    assert all(r["comm_bytes_per_step"] == full for r in runs["none"].values())
    assert all(r["comm_bytes_per_step"] == full / 2 for hook in ("fp16", "bf16") for r in runs[hook].values())
    powersgd = runs["powersgd"]
    embedding = load_file(tmp_path / "none" / "export" / "model.safetensors")["bert.embeddings.word_embeddings.weight"]
    for s in (1, 2, 3):  # start_step=3: every other gradient whole first; the embedding's mask and touched rows
        assert full - 4 * embedding.numel() < powersgd[s]["comm_bytes_per_step"] < full - 2 * embedding.numel()
    assert all(powersgd[s]["comm_bytes_per_step"] < full / 10 for s in range(4, STEPS + 1))
    for hook in ("fp16", "bf16", "powersgd"):
        assert abs(runs[hook][STEPS]["loss"] - runs["none"][STEPS]["loss"]) < 0.02 * runs["none"][STEPS]["loss"], hook


@pytest.mark.slow
def test_diloco_sends_its_outer_gradients_in_bf16_with_half_the_bytes(tmp_path, cache_dir):
    """parallel.comm_hook=bf16 with sync=diloco: the ranks' weight changes cross in bf16; the anchor and the outer
    step stay fp32, so the losses follow the fp32 run's closely (and differ: the rounding is real)."""
    common = [*TINY, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
              "train.micro_batch_size=4", "train.max_steps=7", "data.max_eval_samples=16", "parallel.sync=diloco",
              "parallel.sync_every=2"]  # fmt: skip
    run_distrain("train", *common, f"run.dir={tmp_path / 'fp32'}")
    run_distrain("train", *common, "parallel.comm_hook=bf16", f"run.dir={tmp_path / 'bf16'}")
    fp32, bf16 = _records(tmp_path / "fp32"), _records(tmp_path / "bf16")
    assert {s: r["comm_bytes_per_step"] / 2 for s, r in fp32.items()} == {
        s: r["comm_bytes_per_step"] for s, r in bf16.items()}  # fmt: skip
    assert bf16[2]["comm_bytes_per_step"] > 0
    assert all(abs(bf16[s]["loss"] - fp32[s]["loss"]) < 0.01 * fp32[s]["loss"] for s in fp32)
    assert bf16[1]["loss"] == fp32[1]["loss"] and any(bf16[s]["loss"] != fp32[s]["loss"] for s in (3, 5, 7))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local_sgd", "diloco"])
def test_periodic_sync_sends_bytes_only_when_due_and_resumes_exactly(mode, tmp_path, cache_dir):
    """Stopped between two syncs (each rank's own weights and optimizer state, DiLoCo's anchor and outer momentum,
    the averager's step in the checkpoint) and resumed: the uninterrupted losses exactly. Bytes: the warm-up's
    gradients, then the weights every sync_every steps and nothing between."""
    common = [*TINY, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
              "train.micro_batch_size=4", "train.max_steps=7", "data.max_eval_samples=16", f"parallel.sync={mode}",
              "parallel.sync_every=2", "parallel.sync_warmup=1"]  # fmt: skip
    run_distrain("train", *common, f"run.dir={tmp_path / 'full'}")
    run_distrain("train", *common, "train.stop_at_step=3", f"run.dir={tmp_path / 'cut'}")
    run_distrain("train", *common, f"run.dir={tmp_path / 'cut'}")
    resumed, uninterrupted = train_losses(tmp_path / "cut"), train_losses(tmp_path / "full")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 8))
    assert all(resumed[s] == uninterrupted[s] for s in uninterrupted), (resumed, uninterrupted)
    sent = {s: r["comm_bytes_per_step"] for s, r in _records(tmp_path / "full").items()}
    full = 4 * json.loads((tmp_path / "full" / "summary.json").read_text())["trainable_params"]
    # local_sgd: step 1 all-reduces gradients (warm-up), then the weights are averaged after steps 2, 4, 6;
    # diloco (no warm-up): the averaged change after steps 2, 4, 6
    first = full if mode == "local_sgd" else 0
    assert sent == {1: first, 2: full, 3: 0, 4: full, 5: 0, 6: full, 7: 0}, sent


@pytest.mark.slow
def test_diloco_with_a_plain_outer_step_is_local_sgd(tmp_path, cache_dir):
    """DiLoCo with outer lr 1 and no outer momentum sets the weights to the ranks' average after every sync, which
    is what local SGD does: the same losses (to rounding), and not every-step DDP's, whose ranks share gradients."""
    common = [*TINY, f"data.cache_dir={cache_dir}", "parallel=ddp", "launcher.nproc_per_node=2",
              "train.micro_batch_size=4", "train.max_steps=5", "data.max_eval_samples=16",
              "parallel.sync_every=1"]  # fmt: skip
    runs = {
        "diloco": ["parallel.sync=diloco", "parallel.diloco.outer_lr=1.0", "parallel.diloco.outer_momentum=0"],
        "local_sgd": ["parallel.sync=local_sgd", "parallel.sync_warmup=0"],
        "every_step": [],
    }
    losses = {}
    for name, overrides in runs.items():
        run_distrain("train", *common, *overrides, f"run.dir={tmp_path / name}")
        losses[name] = train_losses(tmp_path / name)
    assert sorted(losses["diloco"]) == list(range(1, 6))
    assert all(abs(losses["diloco"][s] - losses["local_sgd"][s]) < 1e-5 for s in range(1, 6)), losses
    assert max(abs(losses["diloco"][s] - losses["every_step"][s]) for s in range(2, 6)) > 1e-4, losses
