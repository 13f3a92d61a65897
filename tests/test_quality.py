"""Probe quality measures against scipy and hand-checked cases."""

import numpy as np
import pytest
from scipy import stats

from rayprune.scoring.quality import kept_overlap, pearson, probe_quality, rankdata, spearman, split_probe


def test_rankdata_averages_ties_like_scipy():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=300)
    b = a + rng.normal(size=300)
    b[::7] = np.round(b[::7])  # some ties
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert np.isnan(pearson(a, np.ones(300)))


def test_kept_overlap_hand_case():
    measured = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    extrapolated = np.array([0.9, 0.1, 0.7, 0.8, 0.2, 0.3])
    # keep half: measured keeps {0,1,2}, extrapolated keeps {0,3,2} -> 2 of 3
    assert kept_overlap(measured, extrapolated, 0.5) == pytest.approx(2 / 3)
    # keeping the lowest instead: measured {3,4,5}, extrapolated {1,4,5}
    assert kept_overlap(measured, extrapolated, 0.5, higher_is_better=False) == pytest.approx(2 / 3)
    assert kept_overlap(measured, measured, 0.3) == 1.0
    with pytest.raises(ValueError, match="keep_fraction"):
        kept_overlap(measured, extrapolated, 0.0)


def test_probe_split_and_summary():
    mask = split_probe(200, 0.1, seed=3)
    assert mask.sum() == 20 and np.array_equal(mask, split_probe(200, 0.1, seed=3))
    assert not split_probe(200, 0, seed=3).any()
    q = probe_quality(np.arange(10.0), np.arange(10.0) ** 2, 0.5)
    assert (q.n, q.spearman, q.kept_overlap) == (10, 1.0, 1.0) and q.pearson < 1.0
