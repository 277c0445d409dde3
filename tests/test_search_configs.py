"""Every hyper-parameter search config composes with every sampler distrain offers (TPE, random), through Hydra's
compose API with the hydra node, as `distrain train` composes it; the space is written once per task."""

from __future__ import annotations

import importlib.resources

import optuna
import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import DictConfig

from distrain.cli.compose import compose_config

SEARCHES = sorted(
    p.name.removesuffix(".yaml")
    for p in importlib.resources.files("distrain.configs").joinpath("hparams_search").iterdir()
    if p.name.endswith(".yaml")
)
# What each search config must hold: its task's metric, the direction, the searched keys, the partners it needs.
EXPECTED = {
    "ner_optuna": ("f1", "maximize", {"optim.lr", "optim.weight_decay", "train.micro_batch_size"}, []),
    "clm_optuna": ("perplexity", "minimize", {"optim.lr", "optim.weight_decay", "optim.warmup_ratio"},
                   ["task=clm", "data=shakespeare"]),
}  # fmt: skip
# The samplers the README offers (`hydra/sweeper/sampler=...`): distrain_tpe is the searches' default.
SAMPLERS = {
    "distrain_tpe": optuna.samplers.TPESampler,
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
}


def compose_search(search: str, *overrides: str) -> DictConfig:
    return compose_config([f"hparams_search={search}", *EXPECTED[search][3], *overrides], return_hydra_config=True)


def test_both_tasks_have_a_search():
    assert set(SEARCHES) == set(EXPECTED)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_composes_with_every_sampler(search, sampler):
    metric, direction, keys, _ = EXPECTED[search]
    cfg = compose_search(search, f"hydra/sweeper/sampler={sampler}")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.runtime.choices["hydra/sweeper/sampler"] == sampler
    # The sweeper instantiates this node: it must build the sampler class, with the search's seed.
    built = instantiate(sweeper.sampler)
    assert type(built) is SAMPLERS[sampler] and sweeper.sampler.seed == 0
    assert set(sweeper.params) == keys and sweeper.params["optim.lr"].startswith("tag(log, interval(")
    assert sweeper.direction == direction and cfg.task.metric == metric
    assert sweeper.n_trials == 10 and sweeper.n_jobs == 1


@pytest.mark.parametrize("search", SEARCHES)
def test_the_default_sampler_is_tpe_modelling_after_five_random_trials(search):
    cfg = compose_search(search)
    assert cfg.hydra.runtime.choices["hydra/sweeper/sampler"] == "distrain_tpe"
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.hydra.sweeper.sampler.n_startup_trials == 5 and cfg.hydra.sweeper.sampler.seed == 0
    # The plugin's own `tpe` keeps its 10 startup trials: all of a 10-trial study would be random.
    assert compose_search(search, "hydra/sweeper/sampler=tpe").hydra.sweeper.sampler.n_startup_trials == 10


def test_budget_seed_and_parallel_trials_on_slurm_are_overrides():
    budget = ["hydra.sweeper.n_trials=40", "hydra.sweeper.n_jobs=8", "hydra.sweeper.sampler.seed=7"]
    cfg = compose_search("ner_optuna", "hydra/sweeper/sampler=random", "hydra/launcher=distrain_slurm", *budget)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.tasks_per_node == 1
    assert (cfg.hydra.sweeper.n_trials, cfg.hydra.sweeper.n_jobs, cfg.hydra.sweeper.sampler.seed) == (40, 8, 7)


def test_a_tpe_only_key_with_the_random_sampler_fails_with_its_name():
    with pytest.raises(ConfigCompositionException) as error:
        compose_search("ner_optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.n_startup_trials=2")
    assert "n_startup_trials" in str(error.value) + str(error.value.__cause__)


def draws(cfg: DictConfig, n: int) -> list[dict]:
    """The first n values the composed sampler draws from the composed space, as the sweeper asks for them."""
    space, _ = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    study = optuna.create_study(sampler=instantiate(cfg.hydra.sweeper.sampler), direction=cfg.hydra.sweeper.direction)
    values = []
    for _ in range(n):
        trial = study.ask(space)
        study.tell(trial, 0.0)
        values.append(trial.params)
    return values


@pytest.mark.parametrize("search", SEARCHES)
def test_random_draws_are_fixed_by_the_seed_and_learning_rates_are_drawn_on_a_log_scale(search):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = compose_search(search, "hydra/sweeper/sampler=random")
    first = draws(cfg, 100)
    assert draws(cfg, 100) == first
    assert draws(compose_search(search, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=1"), 100) != first
    # Log-uniform: half the draws below the geometric middle of the range (uniform: 12-16% of them).
    space, _ = create_params_from_overrides([f"optim.lr={cfg.hydra.sweeper.params['optim.lr']}"])
    middle = (space["optim.lr"].low * space["optim.lr"].high) ** 0.5
    assert 35 <= sum(d["optim.lr"] < middle for d in first) <= 65
