"""Extrapolate importance scores from a scored subset to unscored samples.

Each unscored query gets a weighted mean of the scores of its ``k`` nearest scored
references in embedding space. Queries that are themselves references (matched by id)
keep their measured score. The mean distance to the neighbours used is returned as a
confidence signal: a score that rests on far-away neighbours deserves less trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayprune.choices import WEIGHTINGS
from rayprune.scoring.neighbours import SearchConfig, knn_search
from rayprune.validation import as_finite_array, check_choice, check_positive_int, check_same_length


@dataclass(frozen=True)
class ExtrapolationConfig:
    """How to extrapolate.

    ``weighting``: ``uniform`` (the published method), ``inverse_distance`` (1/d), or
    ``exp`` (exp(-(d - d_min)/T), T = ``temperature`` or, if unset, the query's mean
    neighbour distance, which makes it scale-free). Closer neighbours always weigh more.
    ``same_label``: only neighbours with the query's own label count.
    """

    k: int = 12
    weighting: str = "uniform"
    same_label: bool = False
    temperature: float | None = None
    search: SearchConfig = SearchConfig()

    def __post_init__(self) -> None:
        check_positive_int(self.k, "k")
        check_choice(self.weighting, "weighting", WEIGHTINGS)
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 or None; got {self.temperature!r}")


@dataclass(frozen=True)
class Extrapolation:
    """Per-query results, aligned with the queries.

    ``measured``: the query was itself a reference and kept its own score.
    ``neighbour_distance``: mean distance to the neighbours the score came from
    (0 for measured queries: their score rests on themselves).
    ``distances`` / ``indices``: the ``(n, k)`` neighbours (index into the references;
    -1 and NaN rows for measured queries, which were not searched).
    """

    scores: np.ndarray
    measured: np.ndarray
    neighbour_distance: np.ndarray
    distances: np.ndarray
    indices: np.ndarray


def neighbour_weights(distances: np.ndarray, weighting: str, temperature: float | None = None) -> np.ndarray:
    """Row-normalised weights for ``(n, k)`` neighbour distances; closer weighs more."""
    check_choice(weighting, "weighting", WEIGHTINGS)
    d = np.asarray(distances, dtype=np.float64)
    if weighting == "uniform":
        w = np.ones_like(d)
    elif weighting == "inverse_distance":
        zero = d <= 0.0
        # Exact duplicates (d == 0) are the limit of 1/d: they take all the weight.
        w = np.where(zero.any(axis=1, keepdims=True), zero.astype(np.float64), 1.0 / np.where(zero, 1.0, d))
    else:
        tau = np.full((len(d), 1), temperature) if temperature else d.mean(axis=1, keepdims=True)
        shifted = d - d.min(axis=1, keepdims=True)
        w = np.where(tau > 0, np.exp(-shifted / np.where(tau > 0, tau, 1.0)), 1.0)
    return w / w.sum(axis=1, keepdims=True)


def extrapolate_scores(
    reference_embeddings,
    reference_scores,
    query_embeddings,
    config: ExtrapolationConfig = ExtrapolationConfig(),
    *,
    reference_ids=None,
    query_ids=None,
    reference_labels=None,
    query_labels=None,
    index_cache: dict | None = None,
) -> Extrapolation:
    """Score every query from its k nearest scored references (see module docstring).

    ``index_cache`` is handed to :func:`knn_search`: keep one per reference set to build
    the ``approx`` path's index once instead of per call.
    """
    scores = as_finite_array(reference_scores, "reference_scores", dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"reference_scores must be a non-empty 1-D array; got shape {scores.shape}")
    check_same_length("reference_embeddings", reference_embeddings, "reference_scores", scores)
    n_queries = len(query_embeddings)
    if config.k > len(scores):
        raise ValueError(f"k must not exceed the number of scored references ({len(scores)}); got k={config.k}")
    if config.same_label and (reference_labels is None or query_labels is None):
        raise ValueError("same_label=True needs reference_labels and query_labels")

    out_scores = np.full(n_queries, np.nan)
    measured = np.zeros(n_queries, dtype=bool)
    if (reference_ids is None) != (query_ids is None):
        raise ValueError("reference_ids and query_ids must be given together or not at all")
    if reference_ids is not None:
        ref_ids, q_ids = np.asarray(reference_ids), np.asarray(query_ids)
        check_same_length("reference_ids", ref_ids, "reference_scores", scores)
        check_same_length("query_ids", q_ids, "query_embeddings", query_embeddings)
        uniq, first = np.unique(ref_ids, return_index=True)
        if len(uniq) != len(ref_ids):
            raise ValueError("reference_ids must be unique; found duplicate ids")
        pos = np.searchsorted(uniq, q_ids).clip(0, len(uniq) - 1)
        measured = uniq[pos] == q_ids
        out_scores[measured] = scores[first[pos[measured]]]

    todo = np.flatnonzero(~measured)
    distances = np.full((n_queries, config.k), np.nan, dtype=np.float32)
    indices = np.full((n_queries, config.k), -1, dtype=np.int64)
    q_emb = np.asarray(query_embeddings)
    if len(todo):
        labels = {}
        if config.same_label:
            q_lab = np.asarray(query_labels)
            check_same_length("query_labels", q_lab, "query_embeddings", query_embeddings)
            labels = {"query_labels": q_lab[todo], "reference_labels": reference_labels}
        d, i = knn_search(q_emb[todo], reference_embeddings, config.k, config.search, index_cache=index_cache,
                          **labels)
        w = neighbour_weights(d, config.weighting, config.temperature)
        out_scores[todo] = (w * scores[i]).sum(axis=1)
        distances[todo], indices[todo] = d, i
    neighbour_distance = np.where(measured, 0.0, np.nanmean(np.where(measured[:, None], 0.0, distances), axis=1))
    return Extrapolation(out_scores, measured, neighbour_distance, distances, indices)
