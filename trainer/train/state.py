"""The loop's own progress: the step a checkpoint restores, and what this invocation measured (not restored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done, over every invocation of the run
    first_step: int = 0  # where this invocation started (after a resume)
    real_tokens: float = 0.0  # non-padding tokens of every data shard, this invocation
    step_seconds: float = 0.0  # this rank's time in optimizer steps (data wait included), this invocation
    data_seconds: float = 0.0  # of which waiting for batches

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = self.first_step = state["step"]

    @property
    def steps_this_invocation(self) -> int:
        return self.step - self.first_step
