"""Composing the train config outside `distrain train`'s own Hydra app: the one helper for `distrain parity` and
`plan`, the tests and the scripts. Commands with keys of their own split those off first (`split_args`) and parse
their values with Hydra's override grammar."""

from __future__ import annotations

from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from distrain.cli.console import print_error
from distrain.trainer.schema import register_configs


def split_args(args: list[str], own: dict[str, Any], doc: str) -> tuple[dict[str, Any], list[str]]:
    """(this command's keys with their values, defaults filled in; the train config overrides). With -h or
    --help, print the command's `doc` and exit."""
    if {"-h", "--help"} & set(args):
        print(doc)
        raise SystemExit(0)
    values, rest = dict(own), []
    parser = OverridesParser.create()
    for arg in args:
        key = arg.split("=", 1)[0]
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
    """compose_config for a command line: exit 1 with Hydra's message on a bad override; `${now:}` resolved."""
    try:
        cfg = compose_config(overrides)
    except HydraException as error:
        print_error("invalid override", f"{error}\n{error.__cause__ or ''}".strip())
        raise SystemExit(1) from None
    # compose() leaves ${now:...} unresolved; a run started from here resolves it like `distrain train`.
    OmegaConf.resolve(cfg)
    return cfg
