"""Every hyper-parameter search config composes with every sampler and pruner distrain offers, through Hydra's compose
API as `distrain train` composes it; its space becomes the Optuna distributions the sweeper asks for; sampler draws
are fixed by the seed, learning rates drawn on a log scale. In-process: no trial runs here."""

from __future__ import annotations

import importlib.resources
import multiprocessing

import optuna
import pytest
from conftest import TINY, run_distrain
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from distrain.cli.compose import compose_config
from distrain.trainer.search import space as spaces
from distrain.trainer.search import study as studies

SEARCHES = sorted(
    p.name.removesuffix(".yaml")
    for p in importlib.resources.files("distrain.configs").joinpath("hparams_search").iterdir()
    if p.name.endswith(".yaml")
)
# What each search config must hold: its task's metric, the searched keys, the partners it needs.
EXPECTED = {
    "ner_optuna": ("f1", {"optim.lr", "optim.weight_decay", "train.micro_batch_size"}, []),
    "clm_optuna": ("perplexity", {"optim.lr", "optim.weight_decay", "optim.warmup_ratio"},
                   ["task=clm", "data=shakespeare"]),
}  # fmt: skip
SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "grid": optuna.samplers.GridSampler,
}
PRUNERS = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "asha": optuna.pruners.SuccessiveHalvingPruner,
}


def compose_search(search: str, *overrides: str) -> DictConfig:
    return compose_config([f"hparams_search={search}", *EXPECTED[search][2], *overrides], return_hydra_config=True)


def distributions(cfg: DictConfig, arguments: tuple[str, ...] = ()) -> dict:
    space, _ = spaces.split_arguments(dict(cfg.sweep.params), list(arguments))
    return {key: spaces.distribution(o) for key, o in space.items()}


def test_both_tasks_have_a_search():
    assert set(SEARCHES) == set(EXPECTED)


# Each sampler with a pruner (every pruner at least once), in each search.
@pytest.mark.parametrize(("sampler", "pruner"), [("tpe", "none"), ("random", "median"), ("grid", "asha"),
                                                 ("cmaes", "median")])  # fmt: skip
@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_composes_with_every_sampler_and_pruner(search, sampler, pruner):
    metric, keys, _ = EXPECTED[search]
    cfg = compose_search(search, f"sweep.sampler={sampler}", f"sweep.pruner={pruner}")
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.distrain_sweeper.DistrainSweeper"
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweep.dir == f"runs/{cfg.run.name}/{search}"
    assert set(cfg.sweep.params) == keys and cfg.task.metric == metric
    grid = {"optim.lr": [1e-4, 1e-3]} if sampler == "grid" else None
    assert type(studies.build_sampler(cfg.sweep, grid, 0)) is SAMPLERS[sampler]
    assert type(studies.build_pruner(cfg.sweep)) is PRUNERS[pruner]


def _pruned_at(pruner, curve: dict[int, float]) -> int | None:
    """After three trials that scored 0.5 and 0.8 at steps 25 and 50, the step at which a trial with this curve of
    dev evaluations is pruned (None: runs to the end)."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(3):
        trial = study.ask()
        for step, value in ((25, 0.5), (50, 0.8)):
            trial.report(value, step)
            trial.should_prune()  # the pruner records a trial's value at a rung when it is asked there
        study.tell(trial, 0.8)
    trial = study.ask()
    for step, value in curve.items():
        trial.report(value, step)
        if trial.should_prune():
            return step
    return None


def test_asha_puts_its_first_rung_at_the_first_dev_evaluation():
    sweep = compose_search("ner_optuna", "sweep.pruner=asha").sweep
    # evaluations every 25 steps: a poor start at step 10 is not judged; the first evaluation (25) is the first rung
    assert _pruned_at(studies.build_pruner(sweep, 25), {10: 0.0, 25: 0.1}) == 25
    assert _pruned_at(studies.build_pruner(sweep, 25), {10: 0.0, 25: 0.6, 50: 0.9}) is None
    # Optuna's own estimate (evaluations per epoch: eval_every 0) sets a rung at step 10 already
    assert _pruned_at(studies.build_pruner(sweep, 0), {10: 0.0, 25: 0.6}) == 10
    sweep.min_resource = 50  # set by the user: nothing before step 50 is judged
    assert _pruned_at(studies.build_pruner(sweep, 25), {25: 0.1, 50: 0.1}) == 50


def test_the_defaults_are_tpe_without_pruning_one_trial_at_a_time():
    sweep = compose_search("ner_optuna").sweep
    assert (sweep.sampler, sweep.pruner, sweep.n_trials, sweep.n_jobs, sweep.seed) == ("tpe", "none", 10, 1, 0)
    assert sweep.storage is None and sweep.trial is None


@pytest.mark.parametrize("key", ["sweep.sampler=bayes", "sweep.pruner=hyperband"])
def test_an_unknown_sampler_or_pruner_fails_composition_naming_the_key(key):
    with pytest.raises(ConfigCompositionException) as error:
        compose_search("ner_optuna", key)
    text = str(error.value) + str(error.value.__cause__)
    assert key.split("=")[0] in text and key.split("=")[1] in text


def test_the_space_becomes_optuna_distributions_and_the_command_line_changes_it():
    cfg = compose_search("ner_optuna")
    space = distributions(cfg)
    lr = space["optim.lr"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log and (lr.low, lr.high) == (1e-5, 5e-4)
    assert not space["optim.weight_decay"].log
    assert space["train.micro_batch_size"].choices == (8, 16, 32)
    # a sweep on the command line replaces a range or adds a key; a fixed value takes the key out of the search
    changed = distributions(cfg, ("train.micro_batch_size=choice(4,8)", "optim.weight_decay=0.01",
                                  "train.seed=range(0,3)"))  # fmt: skip
    assert changed["train.micro_batch_size"].choices == (4, 8) and "optim.weight_decay" not in changed
    assert isinstance(changed["train.seed"], optuna.distributions.IntDistribution)
    assert spaces.grid_values("train.seed", spaces.split_arguments({}, ["train.seed=range(0,3)"])[0]["train.seed"]) \
        == [0, 1, 2]  # fmt: skip
    with pytest.raises(ValueError, match="sweep.params.optim.lr: sweep.sampler=grid needs choice"):
        spaces.grid_values("optim.lr", spaces.split_arguments(dict(cfg.sweep.params), [])[0]["optim.lr"])


def draws(cfg: DictConfig, n: int, seed: int) -> list[dict]:
    """The first n values the configured sampler draws from the composed space, as the sweeper asks for them."""
    study = optuna.create_study(sampler=studies.build_sampler(cfg.sweep, None, seed))
    values = []
    for _ in range(n):
        trial = study.ask(distributions(cfg))
        study.tell(trial, 0.0)
        values.append(trial.params)
    return values


@pytest.mark.parametrize("search", SEARCHES)
def test_random_draws_are_fixed_by_the_seed_and_learning_rates_are_drawn_on_a_log_scale(search):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = compose_search(search, "sweep.sampler=random")
    first = draws(cfg, 100, 0)
    assert draws(cfg, 100, 0) == first and draws(cfg, 100, 1) != first
    # Log-uniform: half the draws below the geometric middle of the range (uniform: 12-16% of them).
    lr = distributions(cfg)["optim.lr"]
    middle = (lr.low * lr.high) ** 0.5
    assert 35 <= sum(d["optim.lr"] < middle for d in first) <= 65


def test_storage_specs_resolve_to_one_place_every_trial_reaches(tmp_path):
    assert studies.resolve_storage(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/study.db"
    assert studies.resolve_storage("journal", tmp_path) == f"journal:{tmp_path.resolve()}/study.journal"
    assert studies.resolve_storage("postgresql://u:secret@db/x", tmp_path) == "postgresql://u:secret@db/x"
    assert "secret" not in studies.display_url("postgresql://u:secret@db/x")
    # both file storages open and hold a study that a second process (here: a second open) finds
    for spec in (None, "journal"):
        url = studies.resolve_storage(spec, tmp_path)
        optuna.create_study(storage=studies.open_storage(url), study_name="s").tell(
            optuna.load_study(storage=studies.open_storage(url), study_name="s").ask(), 1.0)  # fmt: skip
        assert len(optuna.load_study(storage=studies.open_storage(url), study_name="s").trials) == 1


def test_a_searched_key_the_schema_does_not_have_is_named_with_the_nearest_real_one():
    space, _ = spaces.split_arguments({"optim.lrr": "interval(1e-5, 1e-3)", "model": "choice(bert_tiny, bert_huge)"},
                                      [])  # fmt: skip
    problems = spaces.key_problems(space)
    assert problems[0].startswith("sweep.params: optim.lrr: no such key; did you mean optim.lr")
    assert problems[1].startswith("sweep.params: model=bert_huge: no such option")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sweep.pruner=hyperband", "sweep.pruner"),
        ("optim.lrr=interval(1e-5,1e-3)", "optim.lrr: no such key; did you mean optim.lr"),
        ("sweep.storage=not-a-url", "sweep.storage: cannot open 'not-a-url' (ArgumentError"),
        ("sweep.min_resource=0", "sweep.min_resource: expected null or an integer >= 1 (steps), got 0"),
        ("optim.lr=interval(-1.0,0.5)", "sweep.params: optim.lr can be drawn as -1.0, which the run refuses: "
         "optim.lr: expected a number > 0"),
    ],
)  # fmt: skip
def test_bad_sweep_input_exits_2_naming_the_key_before_the_first_trial(tmp_path, override, expected):
    result = run_distrain("train", *TINY, "hparams_search=ner_optuna", override, f"hydra.sweep.dir={tmp_path}",
                          check=False)  # fmt: skip
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "0").exists() and not (tmp_path / "study.db").exists()


def _open_at_once(url: str, barrier, errors) -> None:
    barrier.wait()  # every process opens the new database in the same instant
    try:
        studies.open_storage(url)
    except Exception as error:  # reported to the test, which names it
        errors.put(f"{type(error).__name__}: {error}")


def test_processes_opening_a_new_sqlite_study_at_once_all_get_it(tmp_path):
    """A sweep starting while `distrain report` or the dashboard opens its study.db: they race to create the tables
    and the schema version (Optuna alone fails a loser with IntegrityError or 'table ... already exists')."""
    context = multiprocessing.get_context("fork")  # the children only open the file: fork is quick
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / str(attempt) / 'study.db'}"
        barrier, errors = context.Barrier(4), context.Queue()
        processes = [context.Process(target=_open_at_once, args=(url, barrier, errors)) for _ in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [p.exitcode for p in processes] == [0] * 4
        assert errors.empty(), errors.get()
        assert optuna.get_all_study_names(storage=url) == []  # one complete, readable schema
