"""The search space of a sweep: `sweep.params` (key -> Hydra's sweep syntax) merged with the command line's sweep
overrides, as Optuna distributions.

    interval(a, b)            a float (an int when a and b are ints) drawn uniformly in [a, b]
    tag(log, interval(a, b))  drawn log-uniformly: each decade as likely as the next (learning rates)
    choice(x, y, ...) or x,y  one of the values
    range(a, b[, step])       an int (or float) from a to b (exclusive), by step
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException


def split_arguments(params: dict[str, str], arguments: list[str]) -> tuple[dict[str, Override], list[str]]:
    """(the space: key -> parsed sweep override; the fixed overrides every trial gets). A sweep override on the
    command line adds its key to the space (or replaces its range); a fixed value of a searched key takes it out.
    Raises ValueError naming the key for a value that is not a sweep."""
    parser = OverridesParser.create()
    space: dict[str, Override] = {}
    for key, value in params.items():
        try:
            override = parser.parse_override(f"{key}={value}")
        except HydraException as error:
            raise ValueError(f"sweep.params.{key}: {value!r} is not a sweep ({error})") from None
        if not override.is_sweep_override():
            raise ValueError(f"sweep.params.{key}: expected interval(a, b), choice(...) or range(a, b), got {value!r}")
        space[key] = override
    fixed = []
    for override in parser.parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = override
        else:
            space.pop(key, None)
            fixed.append(override.input_line)
    return space, fixed


def key_problems(space: dict[str, Override]) -> list[str]:
    """Each searched key the schema does not have (or a group option that does not exist), with the nearest real
    ones: `sweep.params: optim.lrr: no such key; did you mean optim.lr?`."""
    from distrain.cli.compose import override_problems

    return [f"sweep.params: {problem}" for o in space.values() for problem in override_problems([o.input_line])]


def distribution(override: Override) -> Any:
    """The Optuna distribution of one parsed sweep override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    log = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    if isinstance(value, RangeSweep):
        ints = all(isinstance(v, int) for v in (value.start, value.stop, value.step))
        values = list(override.sweep_iterator())
        if ints:
            return IntDistribution(values[0], values[-1], step=value.step)
        return CategoricalDistribution(values)
    if isinstance(value, ChoiceSweep) or override.is_sweep_override():
        return CategoricalDistribution(list(override.sweep_iterator()))
    raise ValueError(f"{override.get_key_element()}: not a sweep")


def end_values(drawn: Any) -> list[Any]:
    """The values a distribution can draw at its extremes: an interval's ends, or every choice."""
    return list(drawn.choices) if hasattr(drawn, "choices") else [drawn.low, drawn.high]


def grid_values(key: str, override: Override) -> list[Any]:
    """Every value of a key for sweep.sampler=grid: choices and ranges only."""
    if isinstance(override.value(), IntervalSweep):
        raise ValueError(f"sweep.params.{key}: sweep.sampler=grid needs choice(...) or range(...), got an interval")
    return list(override.sweep_iterator())


def as_override(key: str, value: Any) -> str:
    """A trial's value as a command-line override (strings quoted when the grammar needs it)."""
    if isinstance(value, str) and any(c in value for c in " ,()[]{}=:'\""):
        return f"{key}='{value}'"
    return f"{key}={value}"
