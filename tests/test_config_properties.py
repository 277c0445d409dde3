"""Every bad config is caught before a worker starts, naming its key (issue 13, item 7).

A property test draws overrides across the whole schema (every key: wrong types, out-of-range and boundary
values, unknown choices, misspelled keys and group options) and runs each example through what `distrain train`
runs before it writes a run dir: `check_command_line` (key and option names, Hydra's composition with the
schema's types) then `validate`. Each example must either pass or be refused with exit 2 and a message naming a
drawn key; anything else (another exception) is the traceback a user would have seen. Two real `distrain`
processes check the same from the shell.
"""

from __future__ import annotations

import enum
import json
import typing
from collections import Counter

import pytest
from conftest import TINY, run_distrain
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from distrain.cli.compose import check_tool_command_line, config_groups, override_problems, schema_keys
from distrain.cli.console import error_console
from distrain.cli.train import check_command_line
from distrain.cli.validate import validate
from distrain.trainer.config.schema import DistrainConfig
from distrain.trainer.errors import ConfigError

# Each example composes the config with Hydra (~0.3-0.7 s here): a few in the default suite, many in stage 2.
EXAMPLES, SLOW_EXAMPLES = 25, 400
SEEN: Counter[str] = Counter()  # keys drawn, over the whole test
FOUND: Counter[str] = Counter()  # keys refused
OUTCOMES: Counter[str] = Counter()  # examples started / refused


def _leaf_types() -> dict[str, typing.Any]:
    """Each schema key that holds a value (not a section), with its annotated type."""
    keys, open_dicts = schema_keys()
    schema = OmegaConf.structured(DistrainConfig)
    out = {}
    for key in sorted(keys):
        node = OmegaConf.select(schema, key, throw_on_missing=False)
        if OmegaConf.is_dict(node) and key not in open_dicts:
            continue  # a section
        section, _, name = key.rpartition(".")
        parent = OmegaConf.select(schema, section) if section else schema
        out[key] = parent._get_node(name)._metadata.ref_type
    return out


LEAVES = _leaf_types()
WRONG_TYPES = ["abc", "[1,2]", "{a: 1}", "''", "1.5", "true"]
NUMBERS = ["-1", "0", "1", "2", "7", "8", "513", "4294967296", "99999999999", "-0.5", "0.0", "1e-12", "0.5",
           "0.999", "1.0", "1e30", "inf", "-inf", "nan"]  # fmt: skip


def _values_for(kind: typing.Any) -> st.SearchStrategy[str]:
    base = [st.sampled_from(WRONG_TYPES), st.just("null"), st.sampled_from(NUMBERS)]
    args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    inner = args[0]
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        base.append(st.sampled_from([m.value for m in inner] + ["nope", "FSDP", "fp64"]))
    if inner is bool:
        base.append(st.sampled_from(["true", "false"]))
    if inner is str:
        base.append(st.sampled_from(["/nonexistent/x", "/proc/distrain", "host1:29500", "host:0", "host:", "a b:1",
                                     "[::1]:29500", "USR1", "KILL2", "runs/x", "~/.cache/x"]))  # fmt: skip
    return st.one_of(*base)


@st.composite
def overrides(draw) -> list[str]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["key", "key", "key", "group", "typo"]))
        if kind == "key":
            key = draw(st.sampled_from(sorted(LEAVES)))
            out.append(f"{key}={draw(_values_for(LEAVES[key]))}")
        elif kind == "group":
            group = draw(st.sampled_from(sorted(g for g in config_groups() if not g.startswith("hydra"))))
            option = draw(st.sampled_from([*config_groups()[group], "fsdpp", "minlm", "nope"]))
            out.append(f"{'+' if group in ('experiment', 'debug') else ''}{group}={option}")
        else:
            key = draw(st.sampled_from(sorted(LEAVES)))
            out.append(f"{key[:-1]}{key[-1] * 2}=1")  # a doubled last letter: optim.lrr
    return out


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check(args: list[str]) -> tuple[int, str]:
    """(exit code, message) of `distrain train` for these overrides, up to the moment it would write the run
    dir: the same functions, in the same order."""
    code = 0
    with error_console.capture() as captured:
        try:
            validate(check_command_line(args))
        except SystemExit as error:
            code = int(error.code)
        except ConfigError as error:  # run_or_exit prints these and exits 2
            return 2, "\n".join(error.problems)
    return code, captured.get()


def starts_or_is_refused_naming_a_key(drawn: list[str], run_dir) -> None:
    code, message = check([*TINY, f"run.dir={run_dir}", *drawn])
    keys = [_key_of(o) for o in drawn]
    SEEN.update(keys)
    OUTCOMES["refused" if code else "started"] += 1
    if code == 0:
        return
    assert code == 2, f"{drawn}: exit {code}\n{message}"
    assert "Traceback" not in message
    named = [k for k in keys if k in message]
    # A valid value can make a dependent key invalid (task.name=classify -> task.metric): then that key is named.
    dependent = [k for k in LEAVES if k in message]
    assert named or dependent, f"{drawn}: the message names no key:\n{message}"
    FOUND.update(named)
    assert not run_dir.exists()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(drawn=overrides())
def test_any_override_starts_or_is_refused_with_exit_2_naming_its_key(drawn, tmp_path_factory):
    starts_or_is_refused_naming_a_key(drawn, tmp_path_factory.getbasetemp() / "never-written")


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(drawn=overrides())
@example(drawn=["model.name_or_path=-1"])  # once a traceback: the Hub's cache lookup refused the name
def test_many_overrides_start_or_are_refused_with_exit_2_naming_their_key(drawn, tmp_path_factory):
    starts_or_is_refused_naming_a_key(drawn, tmp_path_factory.getbasetemp() / "never-written")


@pytest.mark.slow
def test_the_property_covered_the_schema(tmp_path_factory):
    """Runs after the property tests (file order): the keys their draws missed (Hypothesis favours the first of a
    list, and the schema grows) each get a wrong-typed value the same way, so every key of the schema was tried."""
    if sum(SEEN.values()) < SLOW_EXAMPLES:
        pytest.skip("needs the slow property test in the same session")
    drawn = set(SEEN) & set(LEAVES)
    print(f"\nexamples: {dict(OUTCOMES)}; schema keys drawn: {len(drawn)} of {len(LEAVES)}; refused naming the "
          f"drawn key: {len(set(FOUND))} distinct keys; tried here: {sorted(set(LEAVES) - drawn)}")  # fmt: skip
    for key in sorted(set(LEAVES) - drawn):
        starts_or_is_refused_naming_a_key([f"{key}={{a: 1}}"], tmp_path_factory.getbasetemp() / "never-written")
    assert set(LEAVES) <= set(SEEN)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optim.lrr=1e-4"], "optim.lrr: no such key; did you mean optim.lr"),
        pytest.param(["-m", "parallel=ddp,fsdpp"], "parallel=fsdpp: no such option", marks=pytest.mark.slow),
        # The property test covers these in-process; from the shell in stage 2 (each start costs 5-15 s here).
        pytest.param(["launcher.rdzv_endpoint=host1-29500"], "launcher.rdzv_endpoint: expected host:port",
                     marks=pytest.mark.slow),
        pytest.param(["optim.lr=abc"], "optim.lr=abc: does not fit the schema", marks=pytest.mark.slow),
        # a pretrained model's architecture is null: OmegaConf's assertion, named instead
        (["model=minilm", "model.architecture.hidden_size=64"],
         "model.architecture.hidden_size: the chosen config leaves this section null"),
        # data=custom names three files: the cut form is its own option, which both messages point to
        (["data=custom", "data.split={train: 0.8, dev: 0.1, test: 0.1}"],
         "data.split: this value does not fit the schema there"),
        pytest.param(["data=custom", "data.files.all=x"], "`+data.files.all=...` adds one; for one set of files cut "
                     "by fractions, data=custom_split data.files.all=FILE", marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_distrain_train_refuses_with_the_key_before_starting(args, expected, tmp_path):
    result = run_distrain("train", *args, *TINY, f"run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "+optim" not in result.stderr  # Hydra's advice to add the key, which the schema refuses
    assert not (tmp_path / "run").exists()


def test_every_bad_override_is_named_at_once():
    """Hydra's composition stops at the first value of the wrong type; the check before it names them all, with an
    unknown key, and each bad value of a sweep, and passes what fits (interpolations are the composition's)."""
    problems = override_problems(["optim.lrr=1", "train.max_steps=abc", "optim.lr=1e-4,x", "train.epochs=2",
                                  "precision=bf16", "run.name=${now:%H}", "train.profile_steps=[1,2]",
                                  "optim.weight_decay=[1,2]", "data.augment=[]"])  # fmt: skip
    named = ["optim.lrr", "train.max_steps=abc", "optim.lr=x", "optim.weight_decay=[1, 2]"]
    assert [p.split(":")[0] for p in problems] == named, problems
    assert "could not be converted to Integer" in problems[1] and "of type 'list'" in problems[3]


def test_parity_checks_every_strategy_before_the_first_trains(tmp_path):
    result = run_distrain("parity", *TINY, "strategies=[single,fdsp]", "steps=1", f"out={tmp_path / 'p'}", check=False)
    assert result.returncode == 2 and "parallel=fdsp: no such option" in result.stderr, result.stderr
    assert not (tmp_path / "p").exists()  # `single` did not train first


@pytest.mark.slow
def test_parity_compares_runs_whose_losses_went_non_finite(tmp_path):
    """Skipped steps (a null loss in metrics.jsonl) agree only with skipped steps: no traceback, and a warning."""
    out = tmp_path / "p"
    result = run_distrain("parity", *TINY, "strategies=[single,ddp]", "optim.lr=1e6", "train.max_nonfinite_steps=10",
                          "steps=3", f"out={out}", check=False)  # fmt: skip
    said = " ".join(result.stdout.split())
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert "the loss of step(s) 2, 3 was not finite in single" in said, said
    report = json.loads((out / "parity.json").read_text())["strategies"]["ddp"]
    assert report["per_step"][1:] == [0.0, 0.0] and report["max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_parity_at_bf16_beyond_its_tolerance_says_which_tolerance_fits(tmp_path):
    result = run_distrain("parity", *TINY, "precision=bf16", "strategies=[single,tp]", "steps=2", "tolerance=1e-12",
                          f"out={tmp_path / 'p'}", check=False)  # fmt: skip
    said = " ".join(result.stdout.split())
    assert result.returncode == 1 and "at precision=bf16 the strategies' losses also differ by 16-bit" in said, said


@pytest.mark.slow
@pytest.mark.parametrize("command", ["parity", "plan"])
def test_parity_and_plan_suggest_the_nearest_key(command):
    result = run_distrain(command, *TINY, "optim.lrr=1e-4", check=False)
    assert result.returncode == 2, result.stderr
    assert "did you mean optim.lr" in result.stderr


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ("eval", ["ckpt=X", "splt=dev"], "splt: no such key of distrain eval; did you mean split?"),
        ("eval", ["ckpt=X", "+splt=dev"], "splt: no such key of distrain eval; did you mean split?"),  # not taken
        ("eval", ["split=dev"], "ckpt: required (distrain eval ckpt=...)"),
        ("eval", ["ckpt=X", "batch_size=0"], "batch_size=0: expected an integer > 0 (default null)"),
        ("eval", ["ckpt=X", "aggregation=frist"], "aggregation=frist: expected one of simple, first, average, max "
                                                  "(default null)"),
        ("export", ["ckpt=X", "quantise=int8"], "quantise: no such key of distrain export; did you mean quantize?"),
        ("export", ["ckpt=X", "overwrite=yes"], "overwrite=yes: expected bool (default false)"),
        ("predict", ["ckpt=X", "top_k=2.5"], "top_k=2.5: expected int (default 50)"),
    ],
)  # fmt: skip
def test_eval_predict_and_export_refuse_a_bad_key_or_value_naming_it(command, args, expected, tmp_path):
    # In this process: the check each command's main() runs before Hydra (the command itself: the test below)
    with error_console.capture() as captured, pytest.raises(SystemExit) as exit_:
        check_tool_command_line(command, [a.replace("X", str(tmp_path)) for a in args])
    assert exit_.value.code == 2 and expected in captured.get(), captured.get()
    assert "+splt" not in captured.get()  # Hydra's advice, which would have the typo taken silently


def test_eval_refuses_a_misspelled_key_before_reading_anything(tmp_path):
    result = run_distrain("eval", f"ckpt={tmp_path}", "+splt=dev", check=False)
    assert result.returncode == 2, result.stderr
    assert "splt: no such key of distrain eval; did you mean split?" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    ("command", "typo", "expected"),
    [
        ("plan", "outptu=x", "outptu: no such key of distrain plan; did you mean output?"),
        ("parity", "stepz=3", "stepz: no such key of distrain parity; did you mean steps?"),
        ("plan", "--cfg", "--cfg: distrain plan takes key=value arguments only"),
    ],
)
def test_a_misspelled_key_of_plan_or_parity_gets_its_own_key_suggested(command, typo, expected, tmp_path):
    result = run_distrain(command, "model=bert_tiny", typo, check=False, cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_null_split_file_says_how_to_leave_the_split_out(tmp_path):
    result = run_distrain("train", "data=custom", "data.files.test=null", f"run.dir={tmp_path / 'r'}", check=False)
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and "to leave the key out, write ~data.files.test" in said, said


def test_distrain_without_a_command_or_with_an_unknown_one_is_a_usage_error():
    bare = run_distrain(check=False)
    assert bare.returncode == 2 and "train" in bare.stderr and "eval" in bare.stderr and not bare.stdout
    unknown = run_distrain("trian", check=False)
    assert unknown.returncode == 2 and "unknown command 'trian'; did you mean train?" in unknown.stderr
    helped = run_distrain("--help")
    assert helped.returncode == 0 and "train" in helped.stdout


def test_eval_help_lists_its_own_keys_with_their_meaning():
    out = run_distrain("eval", "--help").stdout
    assert "max_samples: null  # the first N examples of the split" in out and "split: test" in out
    assert "Configuration groups" not in out and "experiment" not in out  # the train config's, which eval refuses


def test_predict_takes_a_float_key_given_as_an_integer(tmp_path):
    # temperature=1 is a float in predict's config; the check must pass it on to the command (which then fails
    # on the missing checkpoint, exit 2, naming it)
    result = run_distrain("predict", f"ckpt={tmp_path / 'none'}", "temperature=1", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("logger=[tensorboard,mlflow]", None),
        ("logger=[]", None),
        ("logger=[mlflow,wandbb]", "logger=wandbb: no such option; expected one of ['mlflow', 'tensorboard', "
                                   "'wandb']; did you mean wandb?"),
    ],
)  # fmt: skip
def test_a_multi_select_group_takes_a_list_of_options(override, expected, tmp_path):
    code, message = check([*TINY, f"run.dir={tmp_path / 'run'}", override])
    if expected:
        assert code == 2 and expected in message, message
    else:
        assert code == 0, message
