"""ParallelDims: the one object that knows what a strategy means, checked without processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from omegaconf import DictConfig

from distrain.trainer.config.schema import Strategy
from distrain.trainer.parallel.dims import ParallelDims


def resolve(name: str, world: int, dp: int | None = None, tp: int | None = None):
    return ParallelDims.resolve(DictConfig({"name": name, "dp": dp, "tp": tp}), world)


@pytest.mark.parametrize(
    ("name", "world", "dp", "tp", "expected"),
    [
        ("single", 1, None, None, (1, 1)),
        ("ddp", 4, None, None, (4, 1)),
        ("fsdp", 2, None, None, (2, 1)),
        ("tp", 2, None, None, (1, 2)),
        ("fsdp_tp", 4, None, 2, (2, 2)),
        ("fsdp_tp", 4, 4, None, (4, 1)),
    ],
)
def test_degrees_multiply_to_the_world_size(name, world, dp, tp, expected):
    dims, problems = resolve(name, world, dp, tp)
    assert problems == [] and (dims.dp, dims.tp) == expected


def test_each_strategy_answers_what_it_shards():
    answers = {}
    for name, world, tp in (("single", 1, None), ("ddp", 2, None), ("fsdp", 2, None), ("tp", 2, None),
                            ("fsdp_tp", 4, 2)):  # fmt: skip
        dims, _ = resolve(name, world, tp=tp)
        answers[name] = (dims.ddp_enabled, dims.fsdp_enabled, dims.tp_enabled, dims.sharded)
    assert answers == {
        "single": (False, False, False, False),
        "ddp": (True, False, False, False),
        "fsdp": (False, True, False, True),
        "tp": (False, False, True, True),
        "fsdp_tp": (False, True, True, True),
    }


@pytest.mark.parametrize(
    ("name", "world", "dp", "tp", "message"),
    [
        ("single", 2, None, None, "parallel.name: 'single' runs one process"),
        ("ddp", 2, None, 2, "parallel.tp: ddp has no tensor parallelism"),
        ("tp", 4, 2, None, "parallel.dp: tp alone does not replicate"),
        ("fsdp_tp", 4, None, None, "parallel.tp: fsdp_tp needs parallel.tp"),
        (
            "fsdp_tp",
            4,
            None,
            3,
            "parallel.tp: expected an integer >= 1 that divides launcher.nproc_per_node x launcher.nnodes = 4, got 3",
        ),
        ("fsdp_tp", 2, 2, 2, "parallel.dp x parallel.tp: expected 2"),
    ],
)
def test_impossible_layouts_name_their_key(name, world, dp, tp, message):
    dims, problems = resolve(name, world, dp, tp)
    assert dims is None and any(message in p for p in problems), problems


def test_head_counts_must_split_over_tensor_parallel_ranks():
    dims, _ = resolve("tp", 4)
    config = SimpleNamespace(num_attention_heads=6, num_key_value_heads=2)
    assert dims.model_problems(config) == [
        "parallel.tp: num_attention_heads=6 of the model is not divisible by tp=4",
        "parallel.tp: num_key_value_heads=2 of the model is not divisible by tp=4",
    ]
    assert resolve("ddp", 4)[0].model_problems(config) == []


def test_candidates_are_every_strategy_that_runs_on_the_world_size():
    assert [c["name"] for c in ParallelDims.candidates(1)] == ["single"]
    many = ParallelDims.candidates(2)
    assert {c["name"] for c in many} == {s.value for s in Strategy} - {"single"}
    assert all(resolve(c["name"], 2, c["dp"], c["tp"])[1] == [] for c in many)
