"""How well extrapolated scores reproduce measured ones, on a held-out probe.

The probe is part of the scored subset whose measured scores are not used as
neighbours; extrapolating to it and comparing with what was measured tells how well
neighbours predict *the subset run's own* scores. It cannot tell whether the subset
run's scores agree with a full-pool run's: a scoring run with too few optimiser steps
can give a healthy-looking probe correlation while its scores disagree with a full run
(docs/method.md, "The scoring run's budget"). Benchmarks measure that; the job warns when the
scoring run's step budget is far below the final training's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rayprune.validation import as_finite_array, check_fraction, check_same_length


def rankdata(values) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's rho needs)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    # Average the ranks of each run of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def pearson(a, b) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x = as_finite_array(a, "a")
    y = as_finite_array(b, "b")
    check_same_length("a", x, "b", y)
    if len(x) < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum() / denom) if denom > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    return pearson(rankdata(a), rankdata(b))


def kept_overlap(measured, extrapolated, keep_fraction: float, higher_is_better: bool = True) -> float:
    """Share of the samples kept by the measured scores that the extrapolated ones keep too.

    Both sides keep the same number, ``round(keep_fraction * n)`` (at least one).
    """
    m = as_finite_array(measured, "measured")
    e = as_finite_array(extrapolated, "extrapolated")
    check_same_length("measured", m, "extrapolated", e)
    if len(m) == 0:
        return float("nan")
    k = max(1, math.floor(check_fraction(keep_fraction, "keep_fraction") * len(m) + 0.5))
    sign = -1.0 if higher_is_better else 1.0
    top_m = set(np.argsort(sign * m, kind="stable")[:k].tolist())
    top_e = set(np.argsort(sign * e, kind="stable")[:k].tolist())
    return len(top_m & top_e) / k


@dataclass(frozen=True)
class ProbeQuality:
    """Agreement of extrapolated with measured scores on the probe."""

    n: int
    spearman: float
    pearson: float
    kept_overlap: float

    def as_dict(self) -> dict[str, float]:
        return {"probe_n": self.n, "probe_spearman": self.spearman, "probe_pearson": self.pearson,
                "probe_kept_overlap": self.kept_overlap}


def probe_quality(measured, extrapolated, keep_fraction: float, higher_is_better: bool = True) -> ProbeQuality:
    return ProbeQuality(
        n=len(np.asarray(measured)),
        spearman=spearman(measured, extrapolated),
        pearson=pearson(measured, extrapolated),
        kept_overlap=kept_overlap(measured, extrapolated, keep_fraction, higher_is_better),
    )


def split_probe(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the probe: a seeded ``fraction`` of the ``n`` scored samples (0 = none)."""
    mask = np.zeros(n, dtype=bool)
    size = probe_size(n, fraction)
    if size:
        mask[np.random.default_rng([seed, 7]).choice(n, size=size, replace=False)] = True
    return mask


def probe_size(n: int, fraction: float) -> int:
    """How many of ``n`` scored samples :func:`split_probe` holds out."""
    if fraction == 0:
        return 0
    return min(n, math.floor(check_fraction(fraction, "probe_fraction") * n + 0.5))
