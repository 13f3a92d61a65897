"""Record a rayprune job in MLflow: runs, datasets, figures, registered models.

Driver only: Ray Data actors and training workers must not import it (SQLite allows one
writer). ``client`` holds the Tracker; ``datasets`` and ``registry`` build what it sends for
datasets and models; ``figures`` is matplotlib only; ``job`` is what the pipeline records
after each stage (import it as ``rayprune.tracking.job``; this module does not).
"""

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
