"""Stage ``register``: the robust model into the MLflow model registry (driver only).

The EMA model is logged with an input example and registered under
``tracking.registered_model``; the version gets the alias ``candidate``, and
``champion`` when its worst-case robust accuracy beats the champion's. Its tags link it
to the pruned dataset, the scoring run and the config. A rerun whose model is already
registered registers nothing new.
"""

from __future__ import annotations

from pathlib import Path

from rayprune.config import JobConfig, to_dict
from rayprune.stages.common import digest
from rayprune.tracking.job import register_final_model


def run_register(config: JobConfig, tracker, pool, selected, final, evaluation, scoring_run_id: str | None,
                 root: Path):
    """Register the final model; returns the registration (None when tracking is off)."""
    return register_final_model(
        tracker, config, final.model_file, pool.info.num_classes, pool.info.image_shape, evaluation.metrics,
        tags={"model_digest": final.digest, "pruned_dataset_digest": selected.digest,
              "scoring_run_id": scoring_run_id or "", "config_digest": digest(to_dict(config)),
              "output_dir": str(root)},
    )
