"""Importance scores from per-sample training histories.

Every function takes a history with epochs on the first axis and samples on the second
(``(E, N)``), as recorded by the scoring run after each epoch, and returns one float64
score per sample. Higher always means "more important / keep" for the dynamic scores
(DU, frequency, EL2N, forgetting); for ``mean_margin`` a *low* margin means a hard
sample, so callers that keep hard samples negate it (see ``SCORE_DIRECTIONS``).
"""

from __future__ import annotations

import numpy as np

from rayprune.validation import as_finite_array

#: Whether a higher value of each score marks a sample worth keeping.
SCORE_DIRECTIONS: dict[str, bool] = {
    "dynamic_uncertainty": True,
    "frequency": True,
    "el2n": True,
    "forgetting": True,
    "mean_margin": False,
    "random": True,
}


def _history(history: np.ndarray, name: str = "history") -> np.ndarray:
    """Validate an (epochs, samples) history and return it as float64."""
    arr = as_finite_array(history, name, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (epochs, samples); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one epoch and one sample; got shape {arr.shape}")
    return arr


def dynamic_uncertainty(history: np.ndarray, window: int = 10) -> np.ndarray:
    """Dynamic Uncertainty (He et al., 2023) of true-class probabilities.

    For each window start ``i`` in ``0 .. K-J-1`` the unbiased standard deviation of the
    ``J`` consecutive epochs ``P[i:i+J]`` is taken; DU is the mean over those ``K-J``
    windows. Samples whose prediction keeps moving score high.

    The windowed variances come from cumulative sums, so the cost is O(K*N) whatever J.
    """
    probs = _history(history)
    epochs = probs.shape[0]
    if not isinstance(window, (int, np.integer)) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (an std needs two epochs); got {window!r}")
    if window >= epochs:
        raise ValueError(
            f"window must be smaller than the number of epochs in the history "
            f"(DU needs K > J); got window={window} with {epochs} epochs"
        )
    n_windows = epochs - window
    # Centre per sample first: variance is shift-invariant and the cumulative sums stay
    # well conditioned even for probabilities near 1.
    centred = probs - probs.mean(axis=0, keepdims=True)
    zero = np.zeros((1, centred.shape[1]))
    csum = np.concatenate([zero, np.cumsum(centred, axis=0)])
    csq = np.concatenate([zero, np.cumsum(centred * centred, axis=0)])
    starts = np.arange(n_windows)
    win_sum = csum[starts + window] - csum[starts]
    win_sq = csq[starts + window] - csq[starts]
    var = (win_sq - win_sum * win_sum / window) / (window - 1)
    return np.sqrt(np.clip(var, 0.0, None)).mean(axis=0)


def frequency_score(history: np.ndarray) -> np.ndarray:
    """Sum of FFT magnitudes along the epoch axis, leaving out the DC bin.

    A prediction that oscillates over training has energy away from frequency zero.
    """
    probs = _history(history)
    if probs.shape[0] < 2:
        raise ValueError(f"history needs at least 2 epochs for a frequency score; got {probs.shape[0]}")
    spectrum = np.fft.fft(probs, axis=0)
    return np.abs(spectrum[1:]).sum(axis=0)


def el2n(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EL2N (Paul et al., 2021): L2 norm of softmax output minus the one-hot label.

    ``probs`` is ``(N, C)`` or ``(E, N, C)``; with an epoch axis the norms are averaged
    over epochs (the usual "average over early epochs / seeds" variant).
    """
    p = as_finite_array(probs, "probs", dtype=np.float64)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[1] == 0:
        raise ValueError(f"probs must be (samples, classes) or (epochs, samples, classes); got shape {np.shape(probs)}")
    y = np.asarray(labels)
    if y.shape != (p.shape[1],):
        raise ValueError(f"labels must have shape ({p.shape[1]},) to match probs; got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[2]:
        raise ValueError(f"labels must be integers in [0, {p.shape[2] - 1}]")
    onehot = np.zeros(p.shape[1:], dtype=np.float64)
    onehot[np.arange(p.shape[1]), y] = 1.0
    return np.linalg.norm(p - onehot[None], axis=2).mean(axis=0)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Forgetting events (Toneva et al., 2019): count of correct -> incorrect transitions.

    ``correct`` is a boolean ``(E, N)`` history (e.g. ``margin > 0``). Samples never
    classified correctly are the hardest of all and get ``E`` (more than any sample can
    forget), following the paper's convention of ranking them first.
    """
    c = np.asarray(correct)
    if c.dtype != np.bool_:
        raise ValueError(f"correct must be a boolean (epochs, samples) array; got dtype {c.dtype}")
    _history(c.astype(np.float64), "correct")
    forgotten = (c[:-1] & ~c[1:]).sum(axis=0).astype(np.float64)
    never_learnt = ~c.any(axis=0)
    forgotten[never_learnt] = float(c.shape[0])
    return forgotten


def mean_margin(margins: np.ndarray) -> np.ndarray:
    """Mean over epochs of the true-class margin ``p_y - max_{j != y} p_j``.

    Low (or negative) margins mark hard or mislabelled samples.
    """
    return _history(margins, "margins").mean(axis=0)


def random_scores(n: int, seed: int) -> np.ndarray:
    """Uniform random scores: the baseline every real score must beat."""
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    return np.random.default_rng(seed).random(n)


def cut_history(history: np.ndarray, last_epoch: int) -> np.ndarray:
    """Keep epochs ``0..last_epoch`` (e.g. up to the best-validation epoch).

    Leaves robust overfitting out of the scores.
    """
    probs = _history(history)
    if not 0 <= last_epoch < probs.shape[0]:
        raise ValueError(f"last_epoch must be in [0, {probs.shape[0] - 1}]; got {last_epoch}")
    return probs[: last_epoch + 1]


SCORE_NAMES = tuple(SCORE_DIRECTIONS)


def score_from_histories(
    name: str,
    probs: np.ndarray,
    margins: np.ndarray,
    l2_errors: np.ndarray,
    *,
    window: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """Compute score ``name`` from the recorded (epochs, samples) histories of one signal.

    ``probs``: true-class probabilities; ``margins``: p_y - max other p (correct iff > 0);
    ``l2_errors``: ||softmax - onehot||, whose epoch mean is EL2N.
    """
    if name not in SCORE_DIRECTIONS:
        raise ValueError(f"unknown score {name!r}; allowed: {', '.join(SCORE_NAMES)}")
    if name == "dynamic_uncertainty":
        return dynamic_uncertainty(probs, window)
    if name == "frequency":
        return frequency_score(probs)
    if name == "el2n":
        return _history(l2_errors, "l2_errors").mean(axis=0)
    if name == "forgetting":
        return forgetting_events(_history(margins, "margins") > 0)
    if name == "mean_margin":
        return mean_margin(margins)
    return random_scores(_history(probs).shape[1], seed)
