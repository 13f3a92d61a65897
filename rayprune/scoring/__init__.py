"""Scores from training histories, kNN extrapolation and selection (NumPy/PyTorch only).

Names load on first use (PEP 562), so importing one light submodule (``scores``,
``select``) does not import torch through ``neighbours``.
"""

from importlib import import_module

_WHERE = {
    "Extrapolation": "extrapolate", "ExtrapolationConfig": "extrapolate", "extrapolate_scores": "extrapolate",
    "neighbour_weights": "extrapolate",
    "SearchConfig": "neighbours", "knn_search": "neighbours",
    "SCORE_DIRECTIONS": "scores", "cut_history": "scores", "dynamic_uncertainty": "scores", "el2n": "scores",
    "forgetting_events": "scores", "frequency_score": "scores", "mean_margin": "scores", "random_scores": "scores",
    "score_from_histories": "scores",
    "class_quotas": "select", "draw_subset": "select", "keep_budget": "select", "select_by_score": "select",
    "select_random": "select",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
