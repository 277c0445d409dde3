"""The loop's own progress: the step a checkpoint restores, and what this invocation measured (not restored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done, over every invocation of the run
    eval_owed: bool = False  # a stop request came at a step whose dev evaluation was due: the resume runs it first
    first_step: int = 0  # where this invocation started (after a resume)
    real_tokens: float = 0.0  # non-padding tokens of every data shard, this invocation
    step_seconds: float = 0.0  # this rank's time in optimizer steps (data wait included), this invocation
    data_seconds: float = 0.0  # of which waiting for batches

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "eval_owed": self.eval_owed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = self.first_step = state["step"]
        self.eval_owed = state.get("eval_owed", False)

    @property
    def steps_this_invocation(self) -> int:
        return self.step - self.first_step
