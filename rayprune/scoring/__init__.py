"""Scores from training histories, kNN extrapolation and selection (NumPy/PyTorch only)."""

from rayprune.scoring.extrapolate import Extrapolation, ExtrapolationConfig, extrapolate_scores, neighbour_weights
from rayprune.scoring.neighbours import SearchOptions, knn_search
from rayprune.scoring.scores import (
    SCORE_DIRECTIONS,
    cut_history,
    dynamic_uncertainty,
    el2n,
    forgetting_events,
    frequency_score,
    mean_margin,
    random_scores,
    score_from_histories,
)
from rayprune.scoring.select import class_quotas, draw_subset, keep_budget, select_by_score, select_random

__all__ = [
    "SCORE_DIRECTIONS",
    "Extrapolation",
    "ExtrapolationConfig",
    "SearchOptions",
    "class_quotas",
    "cut_history",
    "dynamic_uncertainty",
    "el2n",
    "extrapolate_scores",
    "forgetting_events",
    "frequency_score",
    "keep_budget",
    "knn_search",
    "mean_margin",
    "neighbour_weights",
    "random_scores",
    "select_by_score",
    "select_random",
    "score_from_histories",
    "draw_subset",
]
