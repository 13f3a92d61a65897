"""Scores from histories, checked against formulas computed another way."""

import math
import statistics

import numpy as np
import pytest

from rayprune.scoring import (
    cut_history,
    dynamic_uncertainty,
    el2n,
    forgetting_events,
    frequency_score,
    mean_margin,
    random_scores,
)


def reference_du(history, window):
    """DU from its definition, one sample and one window at a time (statistics.stdev)."""
    epochs, samples = history.shape
    out = []
    for n in range(samples):
        stds = [statistics.stdev(history[i : i + window, n].tolist()) for i in range(epochs - window)]
        out.append(sum(stds) / len(stds))
    return np.array(out)


def reference_frequency(history):
    """Sum of |DFT| magnitudes over bins 1..K-1, with the DFT written out as sums."""
    epochs, samples = history.shape
    out = np.zeros(samples)
    for n in range(samples):
        for f in range(1, epochs):
            re = sum(history[t, n] * math.cos(2 * math.pi * f * t / epochs) for t in range(epochs))
            im = -sum(history[t, n] * math.sin(2 * math.pi * f * t / epochs) for t in range(epochs))
            out[n] += math.hypot(re, im)
    return out


@pytest.fixture
def history():
    rng = np.random.default_rng(0)
    # A mix of steady, slowly-learnt and oscillating samples, probabilities in [0, 1].
    epochs = 17
    t = np.arange(epochs)[:, None]
    steady = np.full((epochs, 10), 0.9) + rng.normal(0, 0.01, (epochs, 10))
    learnt = 1 / (1 + np.exp(-(t - rng.uniform(2, 14, 10)) / 1.5))
    oscillating = 0.5 + 0.4 * np.sin(t * rng.uniform(0.5, 3.0, 10))
    noisy = rng.uniform(0, 1, (epochs, 10))
    return np.clip(np.concatenate([steady, learnt, oscillating, noisy], axis=1), 0, 1)


@pytest.mark.parametrize("window", [2, 5, 10, 16])
def test_dynamic_uncertainty_matches_definition(history, window):
    np.testing.assert_allclose(dynamic_uncertainty(history, window), reference_du(history, window),
                               rtol=1e-9, atol=1e-12)


def test_dynamic_uncertainty_is_stable_near_one():
    # Probabilities near 1 with tiny moves: the cumulative-sum path must not cancel.
    rng = np.random.default_rng(1)
    h = 1.0 - 1e-6 * rng.random((30, 5))
    np.testing.assert_allclose(dynamic_uncertainty(h, 10), reference_du(h, 10), rtol=1e-6)


def test_dynamic_uncertainty_orders_oscillating_above_steady(history):
    du = dynamic_uncertainty(history, 10)
    assert du[20:30].min() > du[:10].max()


def test_dynamic_uncertainty_rejects_bad_window(history):
    with pytest.raises(ValueError, match="window.*epochs"):
        dynamic_uncertainty(history, window=history.shape[0])
    with pytest.raises(ValueError, match="window"):
        dynamic_uncertainty(history, window=1)


def test_scores_reject_nan_and_bad_shapes(history):
    bad = history.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="history must be finite"):
        dynamic_uncertainty(bad)
    with pytest.raises(ValueError, match="2-D"):
        frequency_score(history[0])
    with pytest.raises(ValueError, match="at least one"):
        dynamic_uncertainty(np.empty((12, 0)))


def test_frequency_score_matches_written_out_dft(history):
    np.testing.assert_allclose(frequency_score(history), reference_frequency(history), rtol=1e-9)


def test_frequency_score_of_constant_history_is_zero():
    assert np.allclose(frequency_score(np.full((8, 3), 0.7)), 0.0)


def test_el2n_matches_hand_computation():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1])
    expected = [math.sqrt(0.3**2 + 0.2**2 + 0.1**2), math.sqrt(0.1**2 + 0.9**2 + 0.8**2)]
    np.testing.assert_allclose(el2n(probs, labels), expected)
    # With an epoch axis the per-epoch norms are averaged.
    stacked = np.stack([probs, np.eye(3)[labels]])
    np.testing.assert_allclose(el2n(stacked, labels), np.array(expected) / 2)
    with pytest.raises(ValueError, match="labels"):
        el2n(probs, np.array([0, 3]))


def test_forgetting_events_hand_case():
    correct = np.array(
        [
            # s0 learnt and kept, s1 forgotten twice, s2 never learnt, s3 forgotten once at the end
            [1, 1, 0, 1],
            [1, 0, 0, 1],
            [1, 1, 0, 1],
            [1, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(forgetting_events(correct), [0, 2, 4, 1])
    with pytest.raises(ValueError, match="boolean"):
        forgetting_events(correct.astype(int))


def test_mean_margin_and_cut_history(history):
    np.testing.assert_allclose(mean_margin(history), history.sum(axis=0) / history.shape[0])
    np.testing.assert_array_equal(cut_history(history, 4), history[:5])
    with pytest.raises(ValueError, match="last_epoch"):
        cut_history(history, history.shape[0])


def test_random_scores_are_seeded():
    np.testing.assert_array_equal(random_scores(10, seed=3), random_scores(10, seed=3))
    assert not np.array_equal(random_scores(10, seed=3), random_scores(10, seed=4))
    with pytest.raises(ValueError, match="n must be"):
        random_scores(0, seed=0)
