"""Learned score extrapolation: predict an importance score from one pass of the subset
model over a sample plus k-NN estimates, with a regressor fitted on the scored subset.

kNN extrapolation averages the scores of a sample's neighbours, so it is smoother than
the true scores and blind to what the model thinks of the sample itself. The subset
model's own view of every pool row comes almost free with its embedding: the logits of
the same forward pass give the true-class probability, margin and ||softmax - onehot||
(the per-epoch signals the scoring run records), optionally also under the training
attack. A gradient-boosted regressor maps these signals plus k-NN estimates (several k,
all labels and same label, and the neighbour distances) to the score.

Fitting rows are the scored references. Their k-NN features are cross-fitted (K folds:
a row's features come only from the other folds), so the regressor sees them as it will
see an unscored row's, which never contains its own score. The regressor is fitted on
the scores' ranks (robust to the score's scale and tails) and its output is mapped back
through the measured scores' quantiles, so predicted and measured scores rank together.

Pure numpy / scikit-learn (histogram gradient boosting: fast on small tables, handles
unscaled features, no tuning needed beyond shallow trees); no Ray, no MLflow. Fitting and
prediction run with one OpenMP thread: with torch and faiss loaded, each with its own
OpenMP runtime, scikit-learn's threads fought theirs and a 400-row fit took 45 s instead
of 0.3 s on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rayprune.scoring.neighbours import SearchConfig, knn_search
from rayprune.scoring.quality import rankdata
from rayprune.validation import as_finite_array, check_same_length

#: One-pass signals per kind of input, in the order of ``rayprune.robust.recording``.
SIGNALS = {"clean": ("p_clean", "margin_clean", "l2_error_clean"),
           "adv": ("p_adv", "margin_adv", "l2_error_adv")}
KNN_KS = (5, 12, 25)
#: Shallow trees with shrinkage and a leaf floor: scored subsets can be a few hundred rows.
HGB_PARAMS = {"max_iter": 200, "learning_rate": 0.05, "max_depth": 3, "min_samples_leaf": 20,
              "l2_regularization": 1.0}
FOLDS = 10


def knn_feature_names(ks=KNN_KS) -> tuple[str, ...]:
    return tuple(f"knn{k}{s}" for s in ("", "_sl") for k in ks) + tuple(f"dist{k}{s}" for s in ("", "_sl") for k in ks)


def feature_names(signals: tuple[str, ...] = ("clean",), ks=KNN_KS) -> tuple[str, ...]:
    """Column order of the feature matrix: one-pass signals, then k-NN features."""
    return tuple(name for kind in signals for name in SIGNALS[kind]) + knn_feature_names(ks)


def knn_features(ref_emb, ref_scores, ref_labels, query_emb, query_labels, search: SearchConfig = SearchConfig(),
                 ks=KNN_KS, index_cache: dict | None = None) -> dict[str, np.ndarray]:
    """k-NN score estimates and mean neighbour distances of the queries, for each k in ``ks``.

    ``knn{k}``: uniform mean score of the k nearest references; ``knn{k}_sl``: of the k
    nearest with the query's label; ``dist{k}``, ``dist{k}_sl``: mean distance to them. A k
    larger than the references (of the label) uses all of them; a query whose label no
    reference has gets the all-label values for its same-label features.
    """
    ref_scores = as_finite_array(ref_scores, "ref_scores")
    ref_labels, query_labels = np.asarray(ref_labels), np.asarray(query_labels)
    check_same_length("ref_emb", ref_emb, "ref_scores", ref_scores)
    n = len(query_emb)
    out = {name: np.empty(n) for name in knn_feature_names(ks)}
    if n == 0:
        return out
    kmax = min(max(ks), len(ref_scores))
    dist, idx = knn_search(query_emb, ref_emb, kmax, search, index_cache=index_cache)
    _fill(out, "", ref_scores[idx], dist, ks, np.arange(n))
    out.update({f"{name}_sl": out[name].copy() for name in (f"{p}{k}" for p in ("knn", "dist") for k in ks)})
    present, counts = np.unique(ref_labels, return_counts=True)
    for label, count in zip(present, counts):
        rows = np.flatnonzero(query_labels == label)
        if len(rows):  # one label at a time: each uses min(k, its own references)
            dist, idx = knn_search(query_emb[rows], ref_emb, int(min(kmax, count)), search,
                                   query_labels=query_labels[rows], reference_labels=ref_labels,
                                   index_cache=index_cache)
            _fill(out, "_sl", ref_scores[idx], dist, ks, rows)
    return out


def _fill(out: dict, suffix: str, scores: np.ndarray, dist: np.ndarray, ks, rows: np.ndarray) -> None:
    for k in ks:
        kk = min(k, scores.shape[1])
        out[f"knn{k}{suffix}"][rows] = scores[:, :kk].mean(axis=1)
        out[f"dist{k}{suffix}"][rows] = dist[:, :kk].mean(axis=1)


def fold_ids(n: int, n_folds: int, seed: int) -> np.ndarray:
    """A seeded, balanced fold number for each of ``n`` rows."""
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be in [2, {n}]; got {n_folds}")
    return np.random.default_rng([seed, 23]).permutation(n) % n_folds


def cross_fitted_knn_features(emb, scores, labels, search: SearchConfig = SearchConfig(), ks=KNN_KS,
                              n_folds: int = FOLDS, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`knn_features` of the scored rows themselves, each from the other folds only."""
    emb, scores, labels = np.asarray(emb), as_finite_array(scores, "scores"), np.asarray(labels)
    folds = fold_ids(len(scores), min(n_folds, len(scores)), seed)
    out = {name: np.empty(len(scores)) for name in knn_feature_names(ks)}
    for f in np.unique(folds):
        held, ref = folds == f, folds != f
        for name, values in knn_features(emb[ref], scores[ref], labels[ref], emb[held], labels[held], search,
                                         ks).items():
            out[name][held] = values
    return out


def feature_matrix(columns: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    missing = [n for n in names if n not in columns]
    if missing:
        raise KeyError(f"missing feature columns: {', '.join(missing)}")
    return np.column_stack([as_finite_array(columns[n], n) for n in names])


class Regressor(Protocol):
    """What a :class:`ScoreModel` needs of its fitted (scikit-learn) regressor."""

    def predict(self, X: np.ndarray) -> np.ndarray: ...


@dataclass
class ScoreModel:
    """A fitted regressor, its feature order, and the measured scores its ranks map back to."""

    estimator: Regressor
    features: tuple[str, ...]
    sorted_scores: np.ndarray

    def predict(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Scores for rows given as feature columns, on the measured scores' scale."""
        X = feature_matrix(columns, self.features)
        if len(X) == 0:
            return np.empty(0)
        with _one_openmp_thread():
            ranks = self.estimator.predict(X)
        return np.quantile(self.sorted_scores, np.clip(ranks, 0.0, 1.0))


def fit_score_model(columns: dict[str, np.ndarray], scores, features: tuple[str, ...], seed: int = 0) -> ScoreModel:
    """Fit a histogram gradient-boosted regressor from ``features`` to the scores' ranks in (0, 1)."""
    from sklearn.ensemble import HistGradientBoostingRegressor  # imported here: only this path needs it

    y = as_finite_array(scores, "scores")
    X = feature_matrix(columns, features)
    check_same_length("features", X, "scores", y)
    if len(y) < 2 * FOLDS:
        raise ValueError(f"a learned extrapolator needs at least {2 * FOLDS} scored samples to fit; got {len(y)}")
    target = (rankdata(y) - 0.5) / len(y)
    with _one_openmp_thread():
        estimator = HistGradientBoostingRegressor(**HGB_PARAMS, random_state=seed).fit(X, target)
    return ScoreModel(estimator, tuple(features), np.sort(y))


def _one_openmp_thread():
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    return threadpool_limits(1, user_api="openmp")
