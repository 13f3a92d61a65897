"""Valid ranges of numeric options, declared on each config field and checked in one place.

A field declared ``lr: float = bounded(0.1, gt=0)`` carries its range in the field's
metadata; :func:`check_ranges` (called by every config section) rejects a value outside
it, NaN and infinities included, with a message that names the option, the value and
what is allowed. ``--help`` and the README show the same description.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, cast

from rayprune.errors import InputError

# Seeds: every seed is combined arithmetically (e.g. seed * 1_000_003 + rank) before it
# reaches numpy or torch; up to 2**32 - 1 every combination stays inside what both accept.
SEED_MAX = 2**32 - 1
# Counts with no natural upper bound (rows, steps): a 32-bit ceiling keeps every product
# the job forms (epochs x steps x batch) exact in int64.
COUNT_MAX = 2**31 - 1


class ConfigError(InputError):
    """A configuration value or key that is not allowed; the message names it."""


class OptionError(ConfigError):
    """A config field outside its declared range; ``name`` is the field's dotted name."""

    def __init__(self, name: str, problem: str) -> None:
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")


@dataclass(frozen=True)
class Range:
    """Closed or open bounds, always finite, plus special values allowed outside them."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    special: tuple[tuple[float, str], ...] = ()  # (value, meaning), e.g. (-1, "no mixing")

    def contains(self, value: float) -> bool:
        if any(value == v for v, _ in self.special):
            return True
        return (math.isfinite(value)
                and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, integer: bool) -> str:
        """E.g. ``an integer in [1, 100000]``, ``a finite number > 0``, ``a number in [0, 1) or -1 (no mixing)``."""
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        kind = "an integer" if integer else "a number" if (low and high) else "a finite number"
        if low and high:
            text = f"{kind} in {low}, {high}"
        elif low:
            text = f"{kind} {'>=' if self.ge is not None else '>'} {low[1:]}"
        elif high:
            text = f"{kind} {'<=' if self.le is not None else '<'} {high[:-1]}"
        else:
            text = kind
        return text + "".join(f" or {_num(v)} ({meaning})" for v, meaning in self.special)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def bounded(default: Any, *, ge=None, gt=None, le=None, lt=None, special=()) -> Any:
    """A dataclass field with ``default`` whose value must lie in the given range."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt, tuple(special))})


def seed_field(default: int = 0) -> Any:
    return bounded(default, ge=0, le=SEED_MAX)


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A dataclass field with ``default`` whose value must be one of ``choices``."""
    return field(default=default, metadata={"choices": tuple(choices)})


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get("range")


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get("choices")


def check_ranges(obj: Any, section: str) -> None:
    """Raise ``OptionError`` for the first field of dataclass ``obj`` outside its range or choices."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{section}.{f.name}" if section else f.name
        choices = field_choices(f)
        if choices is not None and value not in choices:
            raise OptionError(name, f"must be one of {', '.join(choices)}; got {value!r}")
        bounds = field_range(f)
        if bounds is None:
            continue
        integer = isinstance(f.default, int) and not isinstance(f.default, bool)
        ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
              and (not integer or isinstance(value, numbers.Integral))
              # int, float or a numpy scalar; typeshed's numbers.Real has no comparison operators
              and bounds.contains(cast(float, value)))
        if not ok:
            raise OptionError(name, f"must be {bounds.describe(integer)}; got {value!r}")
