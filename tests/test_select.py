"""Selection: hand-checked small cases, counts per class, determinism."""

import numpy as np
import pytest

from rayprune.scoring import class_quotas, keep_budget, select_by_score, select_random


def test_global_selection_keeps_highest_scores():
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3])
    np.testing.assert_array_equal(select_by_score(scores, keep_count=2), [1, 3])
    np.testing.assert_array_equal(select_by_score(scores, keep_fraction=0.6), [0, 1, 3])
    np.testing.assert_array_equal(select_by_score(scores, keep_count=2, higher_is_better=False), [2, 4])
    np.testing.assert_array_equal(select_by_score(scores, keep_fraction=1.0), np.arange(5))


def test_class_balanced_hand_case():
    # class 0: 6 samples, class 1: 4 samples; keep half -> 3 and 2.
    scores = np.array([6, 5, 4, 3, 2, 1, 10, 20, 30, 40], dtype=float)
    labels = np.array([0] * 6 + [1] * 4)
    kept = select_by_score(scores, keep_fraction=0.5, labels=labels, class_balanced=True)
    np.testing.assert_array_equal(kept, [0, 1, 2, 8, 9])
    # The global selection would take class 1 only.
    np.testing.assert_array_equal(select_by_score(scores, keep_fraction=0.5), [0, 6, 7, 8, 9])


def test_class_quotas_largest_remainder():
    np.testing.assert_array_equal(class_quotas(np.array([3, 3, 3]), 4), [2, 1, 1])
    np.testing.assert_array_equal(class_quotas(np.array([10, 5, 1]), 8), [5, 3, 0])
    for total in range(0, 17):
        assert class_quotas(np.array([7, 5, 4]), total).sum() == total


def test_prune_only_synthetic_keeps_every_real_sample():
    rng = np.random.default_rng(0)
    n = 200
    real = np.zeros(n, dtype=bool)
    real[:50] = True
    scores = rng.random(n)
    scores[:50] = np.nan  # real samples need no score
    labels = rng.integers(0, 4, n)
    kept = select_by_score(scores, keep_fraction=0.3, prunable=~real, labels=labels, class_balanced=True)
    assert set(range(50)) <= set(kept)
    synthetic_kept = kept[kept >= 50]
    assert len(synthetic_kept) == 45  # 30% of 150
    # Per class: 30% of each class's synthetic samples, within the one-sample rounding.
    for c in range(4):
        size = np.sum(labels[50:] == c)
        assert abs(np.sum(labels[synthetic_kept] == c) - 0.3 * size) < 1.0
        # The kept ones of a class are its top scores.
        members = 50 + np.flatnonzero(labels[50:] == c)
        top = members[np.argsort(-scores[members])][: np.sum(labels[synthetic_kept] == c)]
        assert set(top) == set(synthetic_kept[labels[synthetic_kept] == c])


def test_random_selection_without_replacement_counts_and_seed():
    labels = np.repeat(np.arange(5), [100, 80, 60, 40, 20])
    a = select_random(300, keep_fraction=0.25, labels=labels, class_balanced=True, seed=7)
    b = select_random(300, keep_fraction=0.25, labels=labels, class_balanced=True, seed=7)
    c = select_random(300, keep_fraction=0.25, labels=labels, class_balanced=True, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == len(a) == 75
    np.testing.assert_array_equal(np.bincount(labels[a]), [25, 20, 15, 10, 5])
    g = select_random(1000, keep_count=400, seed=1)
    assert len(np.unique(g)) == 400 and g.min() >= 0 and g.max() < 1000


def test_ties_are_broken_by_seed_deterministically():
    scores = np.zeros(100)
    a = select_by_score(scores, keep_count=10, seed=5)
    np.testing.assert_array_equal(a, select_by_score(scores, keep_count=10, seed=5))
    assert not np.array_equal(a, select_by_score(scores, keep_count=10, seed=6))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fraction_is_rejected(fraction):
    with pytest.raises(ValueError, match=r"keep_fraction must be a fraction in \(0, 1\]"):
        select_by_score(np.ones(4), keep_fraction=fraction)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="exactly one of keep_fraction"):
        select_by_score(np.ones(4))
    with pytest.raises(ValueError, match="keep_count must be an integer in \\[0, 4\\]"):
        select_by_score(np.ones(4), keep_count=5)
    with pytest.raises(ValueError, match="scores must be a non-empty"):
        select_by_score(np.array([]), keep_fraction=0.5)
    with pytest.raises(ValueError, match="must be finite"):
        select_by_score(np.array([1.0, np.nan]), keep_fraction=0.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        select_by_score(np.ones(4), keep_fraction=0.5, labels=np.ones(3), class_balanced=True)
    with pytest.raises(ValueError, match="prunable must be a boolean"):
        select_by_score(np.ones(4), keep_fraction=0.5, prunable=np.ones(4))
    assert keep_budget(10, keep_fraction=0.25) == 3  # 2.5 rounds half up


def test_filter_by_ids_keeps_exactly_the_rows_a_set_lookup_keeps():
    import pyarrow as pa

    from rayprune.stages.prepare import filter_by_ids

    rng = np.random.default_rng(3)
    ids = rng.permutation(np.arange(-50, 5000, dtype=np.int64))[:3000]
    table = pa.table({"id": ids, "payload": pa.array([str(i).encode() for i in ids], pa.binary())})
    for keep in (rng.choice(ids, 400, replace=False), np.array([ids.min() - 1, ids.max() + 1]),
                 np.array([], np.int64), ids):
        kept = filter_by_ids(table, np.sort(keep))
        wanted = set(keep.tolist())
        expected = [i for i in ids.tolist() if i in wanted]  # order and rows as in the input
        assert kept["id"].to_pylist() == expected
        assert kept["payload"].to_pylist() == [str(i).encode() for i in expected]
        assert kept.schema == table.schema
