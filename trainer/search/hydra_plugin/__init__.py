"""Hydra looks for plugins only in the `hydra_plugins` namespace package: this module (installed as
`hydra_plugins.distrain_sweeper`, see pyproject.toml) only registers the sweeper, which lives in
distrain.trainer.search.sweeper. Hydra imports it at every start: keep it free of heavy imports."""

from distrain.trainer.search import sweeper


class DistrainSweeper(sweeper.DistrainSweeper):
    """`hydra/sweeper=distrain` (configs/hydra/sweeper/distrain.yaml)."""
