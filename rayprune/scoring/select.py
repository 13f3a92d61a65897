"""Choose which samples to keep, by score or at random.

The budget (``keep_fraction`` or ``keep_count``) applies to the *prunable* samples;
samples outside ``prunable`` (e.g. the real part of a real + synthetic pool) are always
kept. Class-balanced selection removes the same fraction from every class, with the
per-class counts rounded by largest remainder so they add up to the global budget.
Ties in score are broken by a seeded random order, so results are deterministic for a
given seed and unbiased between tied samples.
"""

from __future__ import annotations

import math

import numpy as np

from rayprune.validation import as_finite_array, check_fraction


def keep_budget(n_prunable: int, keep_fraction: float | None = None, keep_count: int | None = None) -> int:
    """Number of prunable samples to keep; exactly one of the two options is given."""
    if (keep_fraction is None) == (keep_count is None):
        raise ValueError("give exactly one of keep_fraction (in (0, 1]) or keep_count (an integer)")
    if keep_fraction is not None:
        return math.floor(check_fraction(keep_fraction, "keep_fraction") * n_prunable + 0.5)
    if (isinstance(keep_count, bool) or not isinstance(keep_count, (int, np.integer))
            or not 0 <= keep_count <= n_prunable):
        raise ValueError(f"keep_count must be an integer in [0, {n_prunable}] (the prunable samples); "
                         f"got {keep_count!r}")
    return int(keep_count)


def class_quotas(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes proportionally to their sizes (largest remainder).

    Ties in the remainder go to the earlier class, so the split is deterministic.
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    n = int(sizes.sum())
    if not 0 <= total <= n:
        raise ValueError(f"total must be in [0, {n}]; got {total}")
    if n == 0:
        return np.zeros_like(sizes)
    exact = sizes * (total / n)
    quotas = np.floor(exact).astype(np.int64)
    short = total - int(quotas.sum())
    remainder_order = np.argsort(-(exact - quotas), kind="stable")
    quotas[remainder_order[:short]] += 1
    return quotas


def _ranked(scores: np.ndarray, higher_is_better: bool, rng: np.random.Generator) -> np.ndarray:
    """Indices from most to least worth keeping, ties in random order."""
    shuffle = rng.permutation(len(scores))
    key = -scores[shuffle] if higher_is_better else scores[shuffle]
    return shuffle[np.argsort(key, kind="stable")]


def select_by_score(
    scores,
    *,
    keep_fraction: float | None = None,
    keep_count: int | None = None,
    higher_is_better: bool = True,
    labels=None,
    class_balanced: bool = False,
    prunable=None,
    seed: int = 0,
) -> np.ndarray:
    """Return the sorted indices of the samples to keep.

    The highest-scoring prunable samples are kept (lowest with
    ``higher_is_better=False``), globally or per class; every non-prunable sample is
    kept. Scores of non-prunable samples are ignored and may be NaN.
    """
    raw = np.asarray(scores, dtype=np.float64)
    if raw.ndim != 1 or len(raw) == 0:
        raise ValueError(f"scores must be a non-empty 1-D array; got shape {raw.shape}")
    n = len(raw)
    mask = np.ones(n, dtype=bool) if prunable is None else np.asarray(prunable)
    if mask.dtype != np.bool_ or mask.shape != (n,):
        raise ValueError(f"prunable must be a boolean array of shape ({n},); got {mask.dtype} {mask.shape}")
    candidates = np.flatnonzero(mask)
    cand_scores = as_finite_array(raw[candidates], "scores (of prunable samples)")
    budget = keep_budget(len(candidates), keep_fraction, keep_count)
    rng = np.random.default_rng(seed)

    if not class_balanced:
        chosen = candidates[_ranked(cand_scores, higher_is_better, rng)[:budget]]
    else:
        if labels is None:
            raise ValueError("class_balanced=True needs labels")
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match scores; got {lab.shape}")
        cand_labels = lab[candidates]
        classes, sizes = np.unique(cand_labels, return_counts=True)
        quotas = class_quotas(sizes, budget)
        parts = []
        for cls, quota in zip(classes, quotas):
            members = np.flatnonzero(cand_labels == cls)
            parts.append(candidates[members[_ranked(cand_scores[members], higher_is_better, rng)[:quota]]])
        chosen = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate([np.flatnonzero(~mask), chosen]))


def select_random(
    n: int,
    *,
    keep_fraction: float | None = None,
    keep_count: int | None = None,
    labels=None,
    class_balanced: bool = False,
    prunable=None,
    seed: int = 0,
) -> np.ndarray:
    """Random pruning without replacement: the baseline at the same budget."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    # Ranking by i.i.d. uniform scores is sampling without replacement.
    random_scores = np.random.default_rng([seed, 1]).random(n)
    return select_by_score(
        random_scores,
        keep_fraction=keep_fraction,
        keep_count=keep_count,
        labels=labels,
        class_balanced=class_balanced,
        prunable=prunable,
        seed=seed,
    )


def subset_size(n_eligible: int, fraction: float) -> int:
    """How many of ``n_eligible`` rows :func:`draw_subset` draws (rounded half up, at least one)."""
    return max(1, math.floor(check_fraction(fraction, "fraction") * n_eligible + 0.5))


def draw_subset(n: int, fraction: float, seed: int, eligible=None) -> np.ndarray:
    """Sorted indices of a uniform random subset (without replacement) of the eligible rows.

    ``fraction`` of the eligible rows are drawn (rounded half up, at least one).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    candidates = np.arange(n) if eligible is None else np.flatnonzero(np.asarray(eligible, dtype=bool))
    if len(candidates) == 0:
        raise ValueError("no eligible rows to draw the subset from (check the prunable sources)")
    size = subset_size(len(candidates), fraction)
    return np.sort(np.random.default_rng(seed).choice(candidates, size=size, replace=False))
