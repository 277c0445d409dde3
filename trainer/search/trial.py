"""Inside a trial's run: each dev evaluation is an intermediate value of the study's trial (`sweep.trial`, set by the
sweeper), and the study's pruner decides whether the run goes on. Rank 0 talks to the study; the decision is
broadcast, so every rank stops after the same step."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from distrain.trainer.parallel.distributed import DistEnv

log = logging.getLogger("distrain")


class TrialReporter:
    def __init__(self, cfg: DictConfig, env: DistEnv):
        self.sweep, self.env, self.metric, self.eval_every = cfg.sweep, env, cfg.task.metric, cfg.train.eval_every
        # Every evaluation is reported (the study's intermediate values, its plots); only a pruner stops a run
        self.enabled = cfg.sweep.trial is not None
        self.prunes = str(cfg.sweep.pruner) != "none"
        self.trial: Any = None

    def _trial(self) -> Any:
        if self.trial is None:
            import optuna

            from distrain.trainer.search.study import build_pruner, open_storage

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            name, storage = self.sweep.study_name, open_storage(self.sweep.storage)
            pruner = build_pruner(self.sweep, self.eval_every)
            study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
            # Optuna's Trial is the study and the trial's id in the storage (the sweeper asked for it by number)
            study_id = storage.get_study_id_from_name(name)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.sweep.trial)
            self.trial = optuna.trial.Trial(study, trial_id)
        return self.trial

    def prune(self, value: float, step: int, may_stop: bool = True) -> str | None:
        """Report a dev evaluation; the reason to stop when the pruner says so (the same on every rank), asked only
        when the run `may_stop` here."""
        if not self.enabled:
            return None
        reason = None
        if self.env.is_main:
            try:
                trial = self._trial()
                trial.report(value, step)
                if self.prunes and may_stop and trial.should_prune():
                    reason = (f"sweep.pruner={self.sweep.pruner} stopped trial {self.sweep.trial} at step {step}: dev "
                              f"{self.metric} {value:.4g} is not among the promising trials at this step")  # fmt: skip
            except Exception as error:  # the study is unreachable or the trial already told: train on, unpruned
                log.warning("pruning off for this run: cannot report to the study (%s: %s)", type(error).__name__,
                            error)  # fmt: skip
                self.enabled = False
        return self.env.broadcast_object(reason)
