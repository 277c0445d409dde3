"""When the loop does what: pure functions of the step and the settings, so the schedule is testable without a
model. `fit` asks them after every optimizer step, in this order: log, evaluate, save, stop."""

from __future__ import annotations


def every(step: int, interval: int) -> bool:
    """Step is a multiple of a positive interval (0 or less: never)."""
    return interval > 0 and step % interval == 0


def last_step(total_steps: int, stop_at_step: int | None) -> int:
    """The step this invocation ends at: the run's end, or train.stop_at_step when that comes first."""
    return min(stop_at_step or total_steps, total_steps)


def log_due(step: int, log_every: int, ends: bool) -> bool:
    """A train record every log_every steps, and at any step this invocation ends on (so nothing goes unlogged)."""
    return every(step, log_every) or ends


def eval_due(step: int, eval_every: int, steps_per_epoch: int | None, total_steps: int) -> bool:
    """Every eval_every steps; with eval_every=0 at each epoch's end (map-style data: a stream has no epochs known
    in advance); always at the run's last step. A stop request defers it to the resumed run (TrainState.eval_owed):
    the time left is for the checkpoint."""
    epoch_end = steps_per_epoch is not None and step % steps_per_epoch == 0
    return every(step, eval_every) or (eval_every == 0 and epoch_end) or step == total_steps


def save_due(step: int, save_every: int, improved: bool, ends: bool) -> bool:
    """Every save_every steps, at each new best dev metric, and whenever this invocation ends."""
    return every(step, save_every) or improved or ends
