"""The checks a module declares for its config keys: value -> what is wrong with it, or None.

    CONFIG_CHECKS = {"train.epochs": checks.integer(1)}           # keys every config has
    OPTIONAL_CONFIG_CHECKS = {"prune.n": checks.integer(1)}       # keys a config may leave out

Each module that reads a config key declares its check beside the code that reads it;
`config_checks` assembles them (`config_checks.OWNERS`) when a config is first validated and
words each problem as `key=value <what the check returned>`. Imports nothing from jaxprune, so
any module can import it without a cycle.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

Check = Callable[[Any], Optional[str]]  # value -> what is wrong with it, or None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite int or float (NaN and infinities are not numbers a config can mean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int) -> Check:
    def check(v):
        if not _is_int(v) or v < minimum:
            return f"must be an int >= {minimum}"
        return None
    return check


def optional_integer(minimum: int) -> Check:
    def check(v):
        if v is not None and (not _is_int(v) or v < minimum):
            return f"must be None (all) or an int >= {minimum}"
        return None
    return check


def number(low: float, high: float, *, low_open=False, high_open=False, note="") -> Check:
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v):
        if not _is_number(v):
            return f"must be a finite number in {text}{note}"
        if (v < low or (low_open and v == low)) or (v > high or (high_open and v == high)):
            return f"must be in {text}{note}"
        return None
    return check


def positive_number(v):
    return None if _is_number(v) and v > 0 else "must be a finite number > 0"


def non_negative_number(v):
    return None if _is_number(v) and v >= 0 else "must be a finite number >= 0"


def boolean(v):
    return None if isinstance(v, bool) else "must be True or False"


def optional_str(v):
    return None if v is None or isinstance(v, str) else "must be None or a path string"


def choice(allowed) -> Check:
    """One of the names `allowed` (a registry: a tuple, or a dict's keys)."""
    allowed = tuple(allowed)

    def check(v):
        return None if v in allowed else f"must be one of {', '.join(map(repr, allowed))}"
    check.allowed = allowed
    return check


def methods(text) -> list[str]:
    """'threshold, sensitivity' → ['threshold', 'sensitivity'] ('' → [])."""
    return [m.strip() for m in str(text or "").split(",") if m.strip()]


def method_list(allowed) -> Check:
    """A comma-separated string of names from `allowed`, each at most once ('' for none)."""
    allowed = tuple(allowed)

    def check(v):
        if not isinstance(v, str):
            return f"must be a comma-separated string of {', '.join(allowed)} (or '')"
        names = methods(v)
        unknown = [m for m in names if m not in allowed]
        if unknown:
            return f"has unknown method(s) {unknown}; allowed: {', '.join(allowed)} (or '')"
        if len(set(names)) != len(names):
            return "names a method twice"
        return None
    return check
