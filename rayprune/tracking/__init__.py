"""Record a rayprune job in MLflow (driver only): runs, datasets, figures, registered models."""

from rayprune.tracking.client import (
    CANDIDATE_ALIAS,
    CHAMPION_ALIAS,
    DEFAULT_EXPERIMENT,
    RUN_STATUSES,
    SHORT_HTTP_POLICY,
    ModelRegistration,
    Tracker,
    TrackingError,
    default_tracking_uri,
    flatten_params,
    sqlite_artifact_root,
)
from rayprune.tracking.figures import (
    figure_composition,
    figure_curves,
    figure_scatter,
    figure_score_distributions,
)

__all__ = [
    "CANDIDATE_ALIAS",
    "CHAMPION_ALIAS",
    "DEFAULT_EXPERIMENT",
    "RUN_STATUSES",
    "SHORT_HTTP_POLICY",
    "ModelRegistration",
    "Tracker",
    "TrackingError",
    "default_tracking_uri",
    "figure_composition",
    "figure_curves",
    "figure_scatter",
    "figure_score_distributions",
    "flatten_params",
    "sqlite_artifact_root",
]
