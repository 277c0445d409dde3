"""The global-batch sampler: same samples per step at any world size, resumable, length grouping."""

from __future__ import annotations

import random

import pytest

from distrain.trainer.data.sampler import GlobalBatchSampler, eval_batches

_rng = random.Random(0)
LENGTHS = [_rng.randrange(5, 100) for _ in range(203)]


def steps(world: int, micro: int, accum: int, epoch: int = 0, start: int = 0, group: bool = False):
    """The samples of each optimizer step, as the union of every rank's micro-batches."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(LENGTHS, micro, accum, rank, world, seed=3, group_by_length=group)
        sampler.set_epoch(epoch, start)
        micro_batches = list(sampler)
        assert len(micro_batches) == len(sampler)
        assert all(len(b) == micro for b in micro_batches)
        n_steps = len(micro_batches) // accum
        per_rank.append([sum(micro_batches[s * accum : (s + 1) * accum], []) for s in range(n_steps)])
    return [sorted(sum((rank[s] for rank in per_rank), [])) for s in range(len(per_rank[0]))]


@pytest.mark.parametrize("group", [False, True])
def test_each_step_has_the_same_samples_at_any_world_size(group):
    reference = steps(world=1, micro=8, accum=1, group=group)
    assert len(reference) == 203 // 8
    assert steps(world=2, micro=4, accum=1, group=group) == reference
    assert steps(world=2, micro=2, accum=2, group=group) == reference
    assert steps(world=4, micro=1, accum=2, group=group) == reference
    assert steps(world=1, micro=2, accum=4, group=group) == reference


def test_epochs_reshuffle_and_never_repeat_a_sample_within_an_epoch():
    first, second = steps(1, 8, 1, epoch=0), steps(1, 8, 1, epoch=1)
    assert first != second
    flat = sum(first, [])
    assert len(flat) == len(set(flat)) == 25 * 8


def test_resuming_mid_epoch_continues_with_the_remaining_steps():
    assert steps(2, 4, 1, epoch=1, start=7) == steps(2, 4, 1, epoch=1)[7:]


def test_length_grouping_cuts_padding_and_keeps_the_sample_set():
    def padding(step_list):
        return sum(len(s) * max(LENGTHS[i] for i in s) - sum(LENGTHS[i] for i in s) for s in step_list)

    plain, grouped = steps(1, 8, 1), steps(1, 8, 1, group=True)
    assert padding(grouped) < 0.5 * padding(plain)
    # mega-batches cover the epoch: the same samples are used, only their grouping differs
    assert len(set(sum(grouped, []))) == len(set(sum(plain, []))) == 200


def test_too_small_a_dataset_names_the_settings():
    with pytest.raises(ValueError, match="fewer than one global batch of 64"):
        GlobalBatchSampler(list(range(50)), 16, 2, 0, 2, seed=0)


def test_eval_shards_cover_every_sample_once():
    shards = [sum(eval_batches(LENGTHS, 16, rank, 3), []) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(len(LENGTHS)))
