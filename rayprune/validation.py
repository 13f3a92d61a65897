"""Argument checks shared by the algorithms.

Every check raises ``ValueError`` naming the argument and what is allowed, so a bad
option fails at once with a message a user can act on.
"""

from __future__ import annotations

import numbers

import numpy as np

from rayprune.errors import InputError


def as_finite_array(values, name: str, dtype=np.float64) -> np.ndarray:
    """Return ``values`` as an array of ``dtype``; reject NaN and infinities."""
    try:
        arr = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric; {exc}") from None
    if arr.size and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(-1)))
        raise ValueError(
            f"{name} must be finite; found {bad.size} NaN/inf value(s), first at flat index {int(bad[0])}"
        )
    return arr


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as int if it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def check_fraction(value, name: str) -> float:
    """Return ``value`` if it lies in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1]; got {value!r}")
    return float(value)


def check_choice(value, name: str, allowed) -> str:
    """Return ``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def check_same_length(name_a: str, a, name_b: str, b) -> None:
    """Raise if two per-sample arrays disagree in length."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length; got {len(a)} and {len(b)}")


def check_finite_scores(ids, scores, where: str) -> None:
    """Raise InputError naming the first id whose score is NaN or infinite."""
    values = np.asarray(scores, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"{where}: the score of id {int(np.asarray(ids)[i])} is {values[i]}; scores must be finite numbers "
            f"({bad.size} NaN/inf score(s))"
        )
