"""The learned extrapolator's pieces against direct computations."""

import numpy as np
import pytest

from rayprune.scoring.learned import (
    cross_fitted_knn_features,
    feature_names,
    fit_score_model,
    fold_ids,
    knn_features,
)
from rayprune.scoring.quality import spearman


def brute_force(ref_emb, ref_scores, query, k, mask=None):
    """(mean score, mean distance) of the k nearest references (optionally among ``mask``)."""
    d = np.sqrt(((ref_emb.astype(np.float64) - query.astype(np.float64)) ** 2).sum(1))
    if mask is not None:
        d = np.where(mask, d, np.inf)
    nearest = np.argsort(d, kind="stable")[:k]
    return ref_scores[nearest].mean(), d[nearest].mean()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 3, n)
    emb = (rng.normal(size=(n, 8)) + labels[:, None]).astype(np.float32)
    scores = emb[:, 0] + 0.3 * rng.normal(size=n)
    return emb, scores, labels


def test_knn_features_equal_a_brute_force_computation(data):
    emb, scores, labels = data
    refs, queries = slice(0, 200), slice(200, 240)
    out = knn_features(emb[refs], scores[refs], labels[refs], emb[queries], labels[queries])
    for j, (q, lab) in enumerate(zip(emb[queries], labels[queries])):
        for k in (5, 12, 25):
            s, d = brute_force(emb[refs], scores[refs], q, k)
            assert out[f"knn{k}"][j] == pytest.approx(s) and out[f"dist{k}"][j] == pytest.approx(d, rel=1e-4)
            s, d = brute_force(emb[refs], scores[refs], q, k, mask=labels[refs] == lab)
            assert out[f"knn{k}_sl"][j] == pytest.approx(s) and out[f"dist{k}_sl"][j] == pytest.approx(d, rel=1e-4)


def test_a_label_without_references_falls_back_to_all_labels(data):
    emb, scores, labels = data
    refs = labels != 2
    out = knn_features(emb[refs], scores[refs], labels[refs], emb[:20], np.full(20, 2))
    for k in (5, 12, 25):
        np.testing.assert_array_equal(out[f"knn{k}_sl"], out[f"knn{k}"])


def test_cross_fitted_features_never_see_their_own_score(data):
    emb, scores, labels = data
    before = cross_fitted_knn_features(emb, scores, labels, seed=3)
    changed = scores.copy()
    changed[17] += 1000.0
    after = cross_fitted_knn_features(emb, changed, labels, seed=3)
    for name in before:
        assert after[name][17] == before[name][17]  # row 17's own features ignore its score
    folds = fold_ids(len(scores), 10, 3)
    others = np.flatnonzero(folds != folds[17])
    assert any(after["knn5"][others] != before["knn5"][others])  # while it is a neighbour of other folds


def test_the_fitted_model_ranks_held_out_rows_and_returns_the_measured_scale():
    rng = np.random.default_rng(1)
    n = 600
    signal = rng.random(n)
    scores = np.exp(3 * signal)  # a monotone function of one feature
    columns = {name: rng.normal(size=n) for name in feature_names()}
    columns["p_clean"] = signal
    fit, held = np.arange(n) < 400, np.arange(n) >= 400
    model = fit_score_model({k: v[fit] for k, v in columns.items()}, scores[fit], feature_names())
    predicted = model.predict({k: v[held] for k, v in columns.items()})
    assert spearman(predicted, scores[held]) > 0.97
    assert scores[fit].min() <= predicted.min() and predicted.max() <= scores[fit].max()


def test_too_few_scored_samples_is_a_clear_error():
    columns = {name: np.zeros(10) for name in feature_names()}
    with pytest.raises(ValueError, match="needs at least 20 scored samples"):
        fit_score_model(columns, np.arange(10.0), feature_names())


def test_a_class_with_fewer_references_than_k_uses_all_of_them(data):
    emb, scores, labels = data
    refs = np.flatnonzero((labels != 1) | (np.arange(len(labels)) < 40))  # class 1 keeps only a few references
    n_small = int((labels[refs] == 1).sum())
    assert n_small < 25
    query = np.flatnonzero(labels == 1)[-5:]
    out = knn_features(emb[refs], scores[refs], labels[refs], emb[query], labels[query])
    others = labels[refs] == 1
    for j, q in enumerate(query):
        s, d = brute_force(emb[refs], scores[refs], emb[q], n_small, mask=others)
        assert out["knn25_sl"][j] == pytest.approx(s) and out["dist25_sl"][j] == pytest.approx(d, rel=1e-4)
        s, _ = brute_force(emb[refs], scores[refs], emb[q], 25)  # all labels: the full 25
        assert out["knn25"][j] == pytest.approx(s)
