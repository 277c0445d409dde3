"""Composing the train config outside `distrain train`'s own Hydra app: the one helper for `distrain parity` and
`plan`, the tests and the scripts. Commands with keys of their own split those off first (`split_args`) and parse
their values with Hydra's override grammar."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
from functools import cache
from importlib.resources import files
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distrain.cli.console import print_error
from distrain.trainer.config import schema
from distrain.trainer.config.schema import DistrainConfig, register_configs


def split_args(args: list[str], own: dict[str, Any], doc: str) -> tuple[dict[str, Any], list[str]]:
    """(this command's keys with their values, defaults filled in; the train config overrides). With -h or
    --help, print the command's `doc` and exit."""
    if {"-h", "--help"} & set(args):
        print(doc)
        raise SystemExit(0)
    command = " ".join(doc.split("`")[1].split()[:2])  # the doc opens with `distrain <command> ...`
    if flags := [arg for arg in args if arg.startswith("-")]:
        print_error("invalid argument", f"{flags[0]}: {command} takes key=value arguments only (`distrain train "
                    "<the same overrides> --cfg job` prints the config they compose)")  # fmt: skip
        raise SystemExit(2)
    values, rest = dict(own), []
    parser = OverridesParser.create()
    sections = {key.split(".")[0] for key in schema_keys()[0]} | set(config_groups())
    for arg in args:
        key = arg.split("=", 1)[0]
        bare = "." not in key and key not in own and key not in sections
        near = difflib.get_close_matches(key, own, n=1) if bare else []
        if near:  # a misspelling of this command's own key (outptu=), which the train config would not know either
            print_error("invalid argument", f"{key}: no such key of {command}; did you mean {near[0]}? (its keys: "
                        f"{', '.join(own)}; and the train config's)")  # fmt: skip
            raise SystemExit(2)
        if key in own:
            try:
                values[key] = parser.parse_override(arg).value()
            except HydraException as error:
                print_error("invalid argument", f"{arg}: {error}")
                raise SystemExit(2) from None
        else:
            rest.append(arg)
    return values, rest


def compose_config(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The train config as `distrain train` composes it from these overrides (Hydra's errors propagate). With
    `return_hydra_config`, the `hydra` node too (sweeper, launcher)."""
    register_configs()
    with initialize_config_module(config_module="distrain.configs", version_base=None):
        return compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


def compose_train(overrides: list[str]) -> DictConfig:
    """compose_config for a command line: exit 2 naming the key on a bad override; `${now:}` resolved."""
    check_overrides_or_exit(overrides)
    return compose_checked(overrides)


def compose_checked(overrides: list[str]) -> DictConfig:
    """compose_train for overrides that check_overrides_or_exit has passed: exit 2 naming the key on a value that
    does not fit the schema."""
    try:
        cfg = compose_config(overrides)
    except HydraException as error:
        message = hydra_message(error)
        new_key = re.search(r"Could not override '(\S+)'.*Key '[^']+' is not in struct", message, re.DOTALL)
        entry_key = re.search(r"Could not override '(\S+)'.*Key '([^']+)' not in '(\w+)'", message, re.DOTALL)
        if entry_key:  # a list of structured entries (data.mixture=[{...}]): OmegaConf names the class, not the key
            where, key, kind = entry_key.groups()
            fields = [f.name for f in dataclasses.fields(getattr(schema, kind))] if hasattr(schema, kind) else []
            message = (f"{where}: an entry has no key {key!r}{_nearest(key, fields)} (an entry's keys: "
                       f"{', '.join(fields)})")  # fmt: skip
        elif new_key:  # a key a free-form mapping (data.files, model.architecture) lacks in the chosen option
            key = new_key[1]
            message += (f"\n{key}: the chosen config has no such entry; `+{key}=...` adds one"
                        f"{_cut_hint(key)}")  # fmt: skip
        print_error("invalid override", message)
        raise SystemExit(2) from None
    except AssertionError as error:  # OmegaConf's, for `section.key=v` where the chosen config's section is null
        if "Unexpected type for root: NoneType" not in str(error):
            raise
        _, open_dicts = schema_keys()
        keys = [o.split("=")[0].lstrip("+~") for o in overrides]
        named = [k for k in keys if any(k.startswith(f"{d}.") for d in open_dicts)] or keys
        hint = (
            "; model.architecture is for a model built from a config (model=bert_tiny, llama_tiny, ...), not "
            "pretrained weights"
            if any(k.startswith("model.architecture.") for k in named)
            else ""
        )
        print_error("invalid override", f"{', '.join(named)}: the chosen config leaves this section null, so it has "
                    f"no entries to set{hint}")  # fmt: skip
        raise SystemExit(2) from None
    except (OmegaConfBaseException, AttributeError) as error:
        # OmegaConf's own failures, e.g. a mapping merged into a section that is off (logger.mlflow={a: 1} while
        # logger.mlflow is null): an AttributeError that OmegaConf tagged with the key.
        key = re.search(r"full_key: (\S+)", str(error))
        if key is None:
            raise
        first_line = str(error).splitlines()[0]
        print_error("invalid override", f"{key[1]}: this value does not fit the schema there ({first_line}); a "
                    f"mapping cannot replace a null section from the command line{_cut_hint(key[1])}")  # fmt: skip
        raise SystemExit(2) from None
    # compose() leaves ${now:...} unresolved; a run started from here resolves it like `distrain train`.
    OmegaConf.resolve(cfg)
    return cfg


def _cut_hint(key: str) -> str:
    if key == "data.split" or key.startswith(("data.files.", "data.split.")):
        return "; for one set of files cut by fractions, data=custom_split data.files.all=FILE [data.split.dev=0.1 ...]"
    return ""


@cache
def config_groups() -> dict[str, list[str]]:
    """Each config group of configs/ (`model`, `hydra/launcher`, ...) with its options."""
    groups: dict[str, list[str]] = {}

    def walk(folder: Any, group: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.name.startswith("__"):
                walk(entry, f"{group}/{entry.name}".strip("/"))
            elif entry.name.endswith(".yaml") and group:
                groups.setdefault(group, []).append(entry.name.removesuffix(".yaml"))

    walk(files("distrain.configs"), "")
    return groups


@cache
def schema_keys() -> tuple[set[str], set[str]]:
    """(every key of the schema, dotted; the keys whose value is a free-form dict, such as model.architecture)."""
    keys: set[str] = set()
    open_dicts: set[str] = set()

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node:
            key = f"{prefix}{name}"
            keys.add(key)
            child = node._get_node(name)
            if isinstance(child, DictConfig):
                if child._metadata.object_type in (None, dict):  # dict[str, ...] fields: any sub-key
                    open_dicts.add(key)
                else:
                    walk(child, f"{key}.")

    walk(OmegaConf.structured(DistrainConfig), "")
    return keys, open_dicts


def _nearest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _override_problems(override: Override) -> list[str]:
    key = override.key_or_group
    if key == "hydra" or key.startswith(("hydra.", "hydra/")):
        return []  # Hydra's own settings and plugin groups: Hydra checks them
    groups = config_groups()
    if key in groups:
        options = groups[key]
        values = list(override.sweep_iterator()) if override.is_sweep_override() and not override.is_interval_sweep() \
            else [override.value()]  # fmt: skip
        # a multi-select group (logger=[tensorboard,mlflow]) takes a list of options; an empty list selects none
        chosen = [option for value in values for option in (value if isinstance(value, list) else [value])]
        return [
            f"{key}={option}: no such option; expected one of {sorted(options)}{_nearest(str(option), options)}"
            for option in chosen
            if option is not None and str(option) not in options
        ]
    keys, open_dicts = schema_keys()
    if key in keys or any(key.startswith(f"{d}.") for d in open_dicts):
        return []
    # A dotted key is compared with dotted keys (optim.lrr -> optim.lr), a bare one with groups and sections.
    known = sorted(k for k in keys | set(groups) if ("." in k) == ("." in key))
    hint = _nearest(key, known)
    return [f"{key}: no such key{hint or '; `distrain train --cfg job` prints every key'}"]


def _type_problems(overrides: list[Override]) -> list[str]:
    """Scalar values that do not fit their schema field's type (train.max_steps=abc), all at once: Hydra's
    composition stops at the first. Each value of a sweep `key=a,b` is tried."""
    keys, _ = schema_keys()
    groups = config_groups()
    schema = OmegaConf.structured(DistrainConfig)
    problems = []
    for override in overrides:
        key = override.key_or_group
        if key not in keys or key in groups or override.is_delete():
            continue
        if override.is_sweep_override():
            if override.is_interval_sweep():
                continue
            values = list(override.sweep_iterator())
        else:
            values = [override.value()]
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue
            # A mapping or list merges into what the chosen options hold (only the composition can judge it), unless
            # the key holds a single value (optim.lr=[1,2]), which the schema refuses here
            if isinstance(value, dict | list) and isinstance(OmegaConf.select(schema, key), DictConfig | ListConfig):
                continue
            try:
                OmegaConf.update(schema, key, value, merge=False)
            except OmegaConfBaseException as error:
                reason = str(error).splitlines()[0]
                problems.append(f"{key}={value}: does not fit the schema ({reason})")
                break
    return problems


def override_problems(overrides: list[str]) -> list[str]:
    """Problems of these command-line overrides, each naming its key: unknown keys and unknown options of a
    config group, with the nearest real ones (also for each value of a sweep `key=a,b`), and values of the wrong
    type for their key."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        return [hydra_message(error)]
    return [problem for override in parsed for problem in _override_problems(override)] + _type_problems(parsed)


def check_overrides_or_exit(overrides: list[str]) -> None:
    problems = override_problems(overrides)
    if problems:
        print_error("invalid override", "\n".join(problems))
        raise SystemExit(2)


def hydra_message(error: HydraException) -> str:
    """Hydra's composition error without its advice to add a key with `+`, which the schema refuses anyway."""
    text = f"{error}\n{error.__cause__ or ''}".strip()
    if isinstance(error, OverrideParseException):  # name the override (and so its key), not only the grammar
        text = f"{error.override}: {text} (quote a value with brackets or colons: key='[::1]:29500')"
    if "is not Optional" in text and (override := re.search(r"Error merging override (\S+?)=null", text)):
        text += f"\n(null is not a value of {override.group(1)}: to leave the key out, write ~{override.group(1)})"
    return "\n".join(line for line in text.splitlines() if not line.startswith("To append to your config use +"))


def _tool_help(command: str, source: str) -> str:
    """configs/<command>.yaml's header comment and key lines, as `distrain <command> --help` prints them."""
    lines = source.split("\nhydra:", 1)[0].splitlines()
    header = len(lines) - len(list(itertools.dropwhile(lambda line: line.startswith("#"), lines)))
    usage = [line.removeprefix("# ").removeprefix("Config of ").rstrip(".") for line in lines[:header]]
    keys = [line for line in lines[header:] if line and not line.startswith(("defaults:", "  - "))]
    return "\n".join([*usage, "", f"keys (key=value; `distrain {command} --cfg job` prints the composed config):",
                      *(f"  {line}" for line in keys)])  # fmt: skip


# Keys of eval, predict and export that are null or a count
COUNTS = ("batch_size", "calibration_samples", "max_new_tokens", "max_samples")
# Keys that are null or one of these: transformers.pipeline's strategies that group sub-words into entities (its
# "none" returns sub-words, which pipeline_f1 cannot score)
CHOICES = {"aggregation": ("simple", "first", "average", "max")}


def check_tool_command_line(command: str, args: list[str]) -> None:
    """Before Hydra, for the commands with a flat config of their own (configs/<command>.yaml: eval, predict,
    export): exit 2 naming the key on an unknown key (with `+` too, which Hydra would take silently), a value of
    the wrong type for its default, or a required key left out. Hydra alone would exit 1 and advise `+key`."""
    from hydra._internal.utils import get_args_parser

    parsed, _ = get_args_parser().parse_known_args(args)
    source = (files("distrain.configs") / f"{command}.yaml").read_text()
    if parsed.help:  # its own keys with their comments (Hydra's help would list the train config's groups)
        print(_tool_help(command, source))
        raise SystemExit(0)
    if parsed.hydra_help or parsed.info or parsed.shell_completion:
        return
    defaults = OmegaConf.create(source)
    keys = sorted(key for key in defaults if key not in ("defaults", "hydra"))
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except HydraException as error:
        overrides, problems = [], [hydra_message(error)]
    else:
        problems = []
    for override in overrides:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if key not in keys:
            problems.append(f"{key}: no such key of distrain {command}{_nearest(key, keys)} (its keys: "
                            f"{', '.join(keys)})")  # fmt: skip
            continue
        if override.is_sweep_override():
            continue
        value, default = override.value(), defaults._get_node(key)._value()
        if key in COUNTS:
            expected, fits = "an integer > 0", type(value) is int and value > 0 or value is None
        elif key in CHOICES:
            expected, fits = f"one of {', '.join(CHOICES[key])}", value is None or value in CHOICES[key]
        elif isinstance(default, str) or default is None:
            continue
        else:
            kinds = (int, float) if type(default) is float else (type(default),)  # an int is a fine float
            expected, fits = type(default).__name__, type(value) in kinds
        if not fits:
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
            problems.append(f"{key}={override.get_value_element_as_str()}: expected {expected} (default {shown})")
    given = {override.key_or_group for override in overrides}
    problems += [f"{key}: required (distrain {command} {key}=...)" for key in keys
                 if OmegaConf.is_missing(defaults, key) and key not in given and not parsed.cfg]  # fmt: skip
    if problems:
        print_error("invalid argument", "\n".join(problems))
        raise SystemExit(2)
