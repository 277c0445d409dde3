"""The loop's "is it due" rules, as pure functions (the schedule tests drive them through a real trainer)."""

from __future__ import annotations

import pytest

from distrain.trainer.train import cadence


def test_every_needs_a_positive_interval():
    assert [s for s in range(1, 10) if cadence.every(s, 3)] == [3, 6, 9]
    assert not any(cadence.every(s, 0) for s in range(10))


@pytest.mark.parametrize(("total", "stop_at", "expected"), [(10, None, 10), (10, 4, 4), (10, 12, 10)])
def test_last_step_is_the_run_end_or_stop_at_step_when_sooner(total, stop_at, expected):
    assert cadence.last_step(total, stop_at) == expected


def test_log_every_n_steps_and_whenever_the_invocation_ends():
    assert [s for s in range(1, 8) if cadence.log_due(s, 3, ends=s == 7)] == [3, 6, 7]
    assert cadence.log_due(5, 0, ends=True) and not cadence.log_due(5, 0, ends=False)


def test_eval_every_n_steps_at_epoch_ends_with_0_and_always_at_the_end():
    def evals(eval_every, steps_per_epoch, total=7):
        return [s for s in range(1, total + 1) if cadence.eval_due(s, eval_every, steps_per_epoch, total)]

    assert evals(2, 3) == [2, 4, 6, 7]
    assert evals(0, 3) == [3, 6, 7]
    assert evals(0, None) == [7]  # a stream has no epoch ends known in advance


def test_save_every_n_steps_on_a_new_best_and_at_every_end():
    assert cadence.save_due(4, 2, improved=False, ends=False)
    assert not cadence.save_due(3, 2, improved=False, ends=False)
    assert cadence.save_due(3, 0, improved=True, ends=False)
    assert cadence.save_due(3, 0, improved=False, ends=True)
    assert not cadence.save_due(3, 0, improved=False, ends=False)
