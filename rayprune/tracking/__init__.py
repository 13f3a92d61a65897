"""Record a rayprune job in MLflow (driver only): runs, datasets, figures, registered models."""

from rayprune.tracking.client import (
    DEFAULT_EXPERIMENT,
    RUN_STATUSES,
    SHORT_HTTP_POLICY,
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
from rayprune.tracking.registry import (
    CANDIDATE_ALIAS,
    CHAMPION_ALIAS,
    ModelRegistration,
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
