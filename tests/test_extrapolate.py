"""Neighbour search and score extrapolation against brute force written in the test."""

import numpy as np
import pytest

from rayprune.scoring import ExtrapolationConfig, SearchConfig, extrapolate_scores, knn_search, neighbour_weights
from rayprune.scoring.neighbours import calibrate_search, recall_at_k


def brute_force_knn(queries, references, k, metric="euclidean"):
    """Every pairwise distance in float64 by broadcasting, then a full sort."""
    q, r = queries.astype(np.float64), references.astype(np.float64)
    if metric == "cosine":
        cos = (q @ r.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(r, axis=1)[None]
        d = 1.0 - cos
    else:
        d = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(axis=2))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


@pytest.fixture
def clouds():
    rng = np.random.default_rng(0)
    # Offset far from the origin: the float32 expansion |q|^2 - 2qr + |r|^2 would
    # lose digits here without centring.
    refs = rng.normal(size=(700, 24)).astype(np.float32) + 50.0
    queries = rng.normal(size=(333, 24)).astype(np.float32) + 50.0
    return queries, refs


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("blocks", [(2048, 16384), (50, 64), (7, 700)])
def test_exact_search_equals_brute_force(clouds, metric, blocks):
    queries, refs = clouds
    if metric == "cosine":
        queries, refs = queries - 50.0, refs - 50.0
    options = SearchConfig(metric=metric, query_block=blocks[0], reference_block=blocks[1])
    dist, idx = knn_search(queries, refs, 12, options)
    ref_dist, ref_idx = brute_force_knn(queries, refs, 12, metric)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-5)


def test_same_label_search_equals_brute_force_per_label(clouds):
    queries, refs = clouds
    rng = np.random.default_rng(1)
    q_lab, r_lab = rng.integers(0, 3, len(queries)), rng.integers(0, 3, len(refs))
    dist, idx = knn_search(queries, refs, 5, query_labels=q_lab, reference_labels=r_lab)
    assert (r_lab[idx] == q_lab[:, None]).all()
    for label in range(3):
        rows, cols = np.flatnonzero(q_lab == label), np.flatnonzero(r_lab == label)
        ref_dist, ref_idx = brute_force_knn(queries[rows], refs[cols], 5)
        np.testing.assert_array_equal(idx[rows], cols[ref_idx])
        np.testing.assert_allclose(dist[rows], ref_dist, rtol=1e-4)


def test_approx_search_has_high_recall(clouds):
    queries, refs = clouds
    _, idx = knn_search(queries, refs, 10, SearchConfig(method="approx"))
    _, ref_idx = brute_force_knn(queries, refs, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, ref_idx)])
    assert recall >= 0.95


def _clustered(n, centres, rng):
    return (centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, centres.shape[1]))).astype(np.float32)


def test_ivf_search_has_high_recall_on_clustered_embeddings_and_true_distances():
    rng = np.random.default_rng(4)
    centres = rng.normal(scale=4.0, size=(20, 16))
    refs, queries = _clustered(4000, centres, rng), _clustered(500, centres, rng)
    dist, idx = knn_search(queries, refs, 12, SearchConfig(method="ivf"))
    ref_dist, ref_idx = brute_force_knn(queries, refs, 12)
    recall = np.mean([len(set(a) & set(b)) / 12 for a, b in zip(idx, ref_idx)])
    assert recall >= 0.95
    # whatever it found, the distances it reports are those of the pairs it returns
    true = np.linalg.norm(queries[:, None, :].astype(np.float64) - refs[idx].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist, true, rtol=1e-3, atol=1e-3)
    assert (np.diff(dist, axis=1) >= -1e-5).all()


def test_ivf_falls_back_to_exact_search_where_its_lists_hold_too_few_neighbours(monkeypatch):
    """One list probed out of many small ones cannot yield k neighbours for every query;
    those queries are answered exactly, so the result still has k true neighbours each."""
    from rayprune.scoring import neighbours

    rng = np.random.default_rng(5)
    refs, queries = rng.normal(size=(2000, 8)).astype(np.float32), rng.normal(size=(200, 8)).astype(np.float32)
    options = SearchConfig(method="ivf", ivf_lists=50, ivf_probes=1)
    exact_rows = []
    real_exact = neighbours._exact_search
    monkeypatch.setattr(neighbours, "_exact_search",
                        lambda q, *a, **kw: exact_rows.append(len(q)) or real_exact(q, *a, **kw))
    dist, idx = knn_search(queries, refs, 45, options)
    assert exact_rows and 0 < sum(exact_rows) < len(queries)  # some queries, not all, fell back
    assert (idx >= 0).all() and all(len(set(row)) == 45 for row in idx)
    ref_dist, ref_idx = brute_force_knn(queries, refs, 45)
    assert (dist[:, 0] >= ref_dist[:, 0] - 1e-4).all()  # never nearer than the true nearest


def test_ivf_lists_follow_the_reference_count():
    from rayprune.scoring.neighbours import ivf_lists

    assert ivf_lists(50_000, SearchConfig()) == 224  # about sqrt(n)
    assert ivf_lists(1_000, SearchConfig()) == 25  # at most n / 39 training points a list
    assert ivf_lists(10, SearchConfig()) == 1
    assert ivf_lists(50_000, SearchConfig(ivf_lists=64)) == 64
    with pytest.raises(ValueError, match="ivf_lists must be an integer >= 0"):
        SearchConfig(ivf_lists=-1)


def test_uniform_extrapolation_is_mean_of_brute_force_neighbours(clouds):
    queries, refs = clouds
    scores = np.random.default_rng(2).random(len(refs))
    result = extrapolate_scores(refs, scores, queries, ExtrapolationConfig(k=12))
    ref_dist, ref_idx = brute_force_knn(queries, refs, 12)
    np.testing.assert_allclose(result.scores, scores[ref_idx].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(result.neighbour_distance, ref_dist.mean(axis=1), rtol=1e-4)
    assert not result.measured.any()


def test_queries_that_are_references_keep_their_scores(clouds):
    queries, refs = clouds
    scores = np.random.default_rng(3).random(len(refs))
    ref_ids = np.arange(1000, 1000 + len(refs))
    # Queries: 5 references (shuffled) and 5 unscored samples.
    picked = np.array([9, 3, 600, 42, 0])
    q_emb = np.concatenate([refs[picked], queries[:5]])
    q_ids = np.concatenate([ref_ids[picked], [1, 2, 3, 4, 5]])
    result = extrapolate_scores(refs, scores, q_emb, ExtrapolationConfig(k=4), reference_ids=ref_ids, query_ids=q_ids)
    np.testing.assert_array_equal(result.measured, [True] * 5 + [False] * 5)
    np.testing.assert_array_equal(result.scores[:5], scores[picked])
    assert (result.neighbour_distance[:5] == 0).all() and (result.neighbour_distance[5:] > 0).all()
    _, ref_idx = brute_force_knn(queries[:5], refs, 4)
    np.testing.assert_allclose(result.scores[5:], scores[ref_idx].mean(axis=1))


def test_weightings_favour_closer_neighbours():
    d = np.array([[1.0, 2.0, 4.0], [0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    inv = neighbour_weights(d, "inverse_distance")
    np.testing.assert_allclose(inv[0], np.array([1, 0.5, 0.25]) / 1.75)
    np.testing.assert_allclose(inv[1], [1, 0, 0])  # an exact duplicate takes all the weight
    exp = neighbour_weights(d, "exp", temperature=1.0)
    np.testing.assert_allclose(exp[0], np.exp(-np.array([0, 1, 3])) / np.exp(-np.array([0, 1, 3])).sum())
    for w in (inv, exp, neighbour_weights(d, "exp")):
        np.testing.assert_allclose(w.sum(axis=1), 1.0)
        assert (np.diff(w[:2], axis=1) <= 1e-15).all()  # non-increasing with distance
        np.testing.assert_allclose(w[2], 1 / 3)  # equal distances, equal weights


def test_weighted_extrapolation_matches_hand_weights(clouds):
    queries, refs = clouds
    scores = np.random.default_rng(4).random(len(refs))
    config = ExtrapolationConfig(k=6, weighting="inverse_distance")
    result = extrapolate_scores(refs, scores, queries, config)
    ref_dist, ref_idx = brute_force_knn(queries, refs, 6)
    w = 1 / ref_dist
    np.testing.assert_allclose(result.scores, (w * scores[ref_idx]).sum(axis=1) / w.sum(axis=1), rtol=1e-5)


def test_extrapolation_argument_errors(clouds):
    queries, refs = clouds
    scores = np.ones(len(refs))
    with pytest.raises(ValueError, match="k must not exceed"):
        extrapolate_scores(refs, scores, queries, ExtrapolationConfig(k=len(refs) + 1))
    with pytest.raises(ValueError, match="same length"):
        extrapolate_scores(refs, scores[:-1], queries)
    with pytest.raises(ValueError, match="reference_scores must be finite"):
        extrapolate_scores(refs, np.where(np.arange(len(refs)) == 5, np.nan, 1.0), queries)
    with pytest.raises(ValueError, match="non-empty"):
        extrapolate_scores(refs[:0], scores[:0], queries)
    with pytest.raises(ValueError, match="unknown weighting"):
        ExtrapolationConfig(weighting="far_heavier")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ExtrapolationConfig(k=0)
    with pytest.raises(ValueError, match="unknown metric"):
        SearchConfig(metric="manhattan")
    with pytest.raises(ValueError, match="same dims"):
        knn_search(queries[:, :5], refs, 3)
    with pytest.raises(ValueError, match="label 2"):
        labels = np.zeros(len(refs), dtype=int)
        labels[:3] = 2
        knn_search(queries, refs, 5, query_labels=np.full(len(queries), 2), reference_labels=labels)
    with pytest.raises(ValueError, match="reference_ids must be unique"):
        extrapolate_scores(refs, scores, queries, reference_ids=np.zeros(len(refs)), query_ids=np.arange(len(queries)))


@pytest.mark.parametrize("method", ["approx", "ivf"])
@pytest.mark.parametrize("same_label", [False, True])
def test_approx_index_cache_builds_once_and_changes_nothing(monkeypatch, same_label, method):
    from rayprune.scoring import neighbours

    rng = np.random.default_rng(3)
    refs, labels = rng.normal(size=(400, 8)).astype(np.float32), rng.integers(0, 3, 400)
    options = neighbours.SearchConfig(method=method)
    label_kw = {"reference_labels": labels} if same_label else {}
    builds = []
    real_build = neighbours.approx_index
    monkeypatch.setattr(neighbours, "approx_index", lambda *a, **kw: builds.append(1) or real_build(*a, **kw))
    cache: dict = {}
    for seed in range(3):  # three batches of queries against the same references
        q = np.random.default_rng(10 + seed).normal(size=(50, 8)).astype(np.float32)
        q_kw = {"query_labels": np.random.default_rng(seed).integers(0, 3, 50)} if same_label else {}
        uncached = neighbours.knn_search(q, refs, 5, options, **q_kw, **label_kw)
        n_before = len(builds)
        cached = neighbours.knn_search(q, refs, 5, options, **q_kw, **label_kw, index_cache=cache)
        np.testing.assert_array_equal(cached[1], uncached[1])
        np.testing.assert_allclose(cached[0], uncached[0], rtol=1e-6)
        if seed > 0:
            assert len(builds) == n_before  # the cached indexes were reused
    assert len(cache) == (3 if same_label else 1)


# ------------------------------------------------------------------ search width calibration


@pytest.fixture
def any_speed(monkeypatch):
    """Recall tests must not depend on timing: accept an approximate search however fast."""
    import rayprune.scoring.neighbours as nb

    monkeypatch.setattr(nb, "MIN_SPEEDUP", 0.0)


def _brute_force_neighbours(queries, refs, k):
    d = ((queries[:, None, :].astype(np.float64) - refs[None].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def test_recall_at_k_is_the_share_of_true_neighbours_found():
    truth = np.array([[0, 1, 2], [3, 4, 5]])
    found = np.array([[2, 9, 0], [5, 4, 3]])  # 2 of 3, then 3 of 3, in any order
    assert recall_at_k(found, truth) == pytest.approx(5 / 6)
    assert recall_at_k(truth, truth) == 1.0


@pytest.mark.parametrize("method", ["ivf", "approx"])
def test_calibration_widens_the_search_until_an_independent_recall_check_passes(method, any_speed):
    """Unclustered (isotropic) embeddings are where a fixed width loses recall: IVF with
    its default 4 probes finds well under 95% of the true neighbours here."""
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(6000, 32)).astype(np.float32)
    queries = rng.normal(size=(300, 32)).astype(np.float32)
    options = SearchConfig(method=method)
    truth = _brute_force_neighbours(queries, refs, 12)
    if method == "ivf":
        _, idx = knn_search(queries, refs, 12, options)
        assert recall_at_k(idx, truth) < 0.9  # the fixed default misses
    cal = calibrate_search(queries, refs, 12, options, 0.95)
    assert cal.options.method == method and cal.recall >= 0.95
    _, idx = knn_search(queries, refs, 12, cal.options)
    assert recall_at_k(idx, truth) == pytest.approx(cal.recall)  # re-measured independently
    widths = [w for w, _ in cal.tried]
    assert [r >= 0.95 for _, r in cal.tried] == [False] * (len(widths) - 1) + [True]  # the narrowest that passes
    assert cal.as_dict()["search_width"] == widths[-1]


def test_calibration_on_the_references_themselves_leaves_each_query_out(any_speed):
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(3000, 16)).astype(np.float32)
    rows = np.arange(0, 3000, 15)
    cal = calibrate_search(refs[rows], refs, 5, SearchConfig(method="ivf"), 0.9, self_index=rows)
    assert cal.recall >= 0.9
    # The truth it measured against excludes the query itself: the 5 nearest *other* rows.
    others = _brute_force_neighbours(refs[rows], refs, 6)[:, 1:]
    _, found = knn_search(refs[rows], refs, 6, cal.options)
    found = np.array([[j for j in f if j != r][:5] for f, r in zip(found, rows)])
    assert recall_at_k(found, others) == pytest.approx(cal.recall)


def test_calibration_falls_back_to_exact_search_when_no_width_is_enough(monkeypatch):
    import rayprune.scoring.neighbours as nb

    monkeypatch.setattr(nb, "HNSW_EF_LADDER", (1,))
    rng = np.random.default_rng(2)
    refs = rng.normal(size=(4000, 32)).astype(np.float32)
    cal = calibrate_search(refs[:100] + 0.01, refs, 20, SearchConfig(method="approx", hnsw_m=4), 1.0)
    assert cal.options.method == "exact" and cal.recall == 1.0 and len(cal.tried) == 1 and cal.tried[0][1] < 1.0
    assert calibrate_search(refs[:10], refs, 3, SearchConfig(), 0.99).options.method == "exact"


def test_same_label_calibration_measures_same_label_neighbours(any_speed):
    rng = np.random.default_rng(3)
    refs = rng.normal(size=(4000, 16)).astype(np.float32)
    ref_labels = rng.integers(0, 3, 4000)
    queries, q_labels = rng.normal(size=(150, 16)).astype(np.float32), rng.integers(0, 3, 150)
    cal = calibrate_search(queries, refs, 8, SearchConfig(method="ivf"), 0.97, query_labels=q_labels,
                           reference_labels=ref_labels)
    _, found = knn_search(queries, refs, 8, cal.options, query_labels=q_labels, reference_labels=ref_labels)
    truth = np.stack([np.flatnonzero(ref_labels == lab)[_brute_force_neighbours(q[None], refs[ref_labels == lab], 8)[0]]
                      for q, lab in zip(queries, q_labels)])
    assert recall_at_k(found, truth) == pytest.approx(cal.recall) and cal.recall >= 0.97


def test_the_stage_calibrates_the_chosen_variant_on_the_probe(any_speed):
    from rayprune.config import load_config
    from rayprune.stages.extrapolate import calibrate_for, extrapolation_config

    rng = np.random.default_rng(4)
    n = 4000
    refs = {"id": np.arange(n), "label": rng.integers(0, 2, n), "score": rng.random(n),
            "embedding": rng.normal(size=(n, 24)).astype(np.float32)}
    probe = np.zeros(n, bool)
    probe[::10] = True
    config = load_config(None, {"extrapolation.method": "ivf", "extrapolation.min_recall": 0.9})
    chosen, cal = calibrate_for(config, extrapolation_config(config), refs, probe)
    assert chosen.search == cal.options and cal.sample == probe.sum() and cal.recall >= 0.9
    truth = _brute_force_neighbours(refs["embedding"][probe], refs["embedding"][~probe], 12)
    _, found = knn_search(refs["embedding"][probe], refs["embedding"][~probe], 12, chosen.search)
    assert recall_at_k(found, truth) == pytest.approx(cal.recall)
    exact_config = load_config(None, {})
    _, exact_cal = calibrate_for(exact_config, extrapolation_config(exact_config), refs, probe)
    assert exact_cal.as_dict()["method"] == "exact"


def test_exact_search_is_used_when_the_approximate_one_is_not_faster(monkeypatch):
    import rayprune.scoring.neighbours as nb

    monkeypatch.setattr(nb, "MIN_SPEEDUP", 1e9)  # no search can be that much faster
    rng = np.random.default_rng(5)
    refs = rng.normal(size=(3000, 16)).astype(np.float32)
    cal = calibrate_search(refs[:200] + 0.01, refs, 5, SearchConfig(method="ivf"), 0.9)
    assert cal.options.method == "exact" and cal.recall == 1.0 and cal.tried[-1][1] >= 0.9
    assert cal.speedup is not None and "exact search was faster" in cal.note
