"""JSON as strict readers (jq, browsers, trackers' REST APIs) accept it: a non-finite float is written as null.

Python's json module writes NaN and Infinity as bare tokens that are not JSON; every file distrain writes goes
through `dumps`, which maps them to null and then refuses (allow_nan=False) anything that slipped through.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
