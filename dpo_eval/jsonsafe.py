"""Numbers for strict JSON and for reports: NaN and infinities become None (JSON has no NaN), numpy scalars
become Python ones, and a report prints "n/a" where a number is missing."""

from __future__ import annotations

import math

import numpy as np


def jsonable(value):
    """`value` with NaN and infinities as None and numpy scalars as Python ones, through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def finite(x) -> bool:
    """Whether `x` is a real number that is neither NaN nor infinite (booleans are not numbers here)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)) \
        and math.isfinite(x)


def json_key(payload, length: int | None = None, default=None) -> str:
    """The one content key of every cache: sha256 of the payload as canonical JSON (keys sorted), hex, cut to
    `length` characters (None: all 64). `default` converts what JSON cannot hold (json.dumps' own parameter)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=default).encode()).hexdigest()[:length]
