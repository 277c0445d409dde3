"""Hyper-parameter search: distrain's Hydra sweeper on Optuna (sweeper.py), its search space (space.py), the study's
storage, sampler and pruner (study.py), and a trial's reports from inside its run (trial.py)."""
