"""What the job records in MLflow after each stage (driver only).

The one part of the package that knows the pipeline: it reads the small outputs the stages
already wrote (metrics, a few columns of the scores table) and hands them to
:class:`~rayprune.tracking.client.Tracker`. Nothing here reads images or holds the pool.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from rayprune.config import JobConfig
from rayprune.data.pool import SCHEMA, PoolInfo
from rayprune.tracking.client import Tracker
from rayprune.tracking.figures import (
    figure_composition,
    figure_curves,
    figure_scatter,
    figure_score_distributions,
)
from rayprune.tracking.registry import ModelRegistration

logger = logging.getLogger(__name__)

POOL_SCHEMA = {field.name: str(field.type) for field in SCHEMA}


def make_tracker(config: JobConfig) -> Tracker:
    """The job's tracker (a disabled one when ``tracking.enabled`` is false)."""
    if not config.tracking.enabled:
        return Tracker.off()
    return Tracker(uri=config.tracking.uri or None, experiment=config.tracking.experiment,
                   strict=config.tracking.strict)


def log_pool_dataset(tracker: Tracker, name: str, info: PoolInfo, digest: str, source: Path, context: str) -> None:
    import pandas as pd

    preview = pd.DataFrame({"source": list(info.sources), "rows": list(info.sources.values())})
    tracker.log_dataset(name, digest=digest, source=str(source), context=context, num_rows=info.num_rows,
                        schema=POOL_SCHEMA, preview=preview)
    tracker.log_metrics({"rows": info.num_rows})


def log_history(tracker: Tracker, history: list[dict], keys: tuple[str, ...]) -> None:
    """Per-epoch metrics, step = epoch."""
    for row in history:
        tracker.log_metrics({k: float(row[k]) for k in keys if k in row}, step=int(row["epoch"]))


def log_scores(tracker: Tracker, scores_dir: Path) -> None:
    """Score distributions (measured vs extrapolated) and the scores table itself."""
    table = pads.dataset(str(scores_dir), format="parquet").to_table(columns=["score", "measured"])
    scores, measured = table["score"].to_numpy(), table["measured"].to_numpy()
    tracker.log_figure(figure_score_distributions(scores[measured], scores[~measured]), "score_distributions.png")
    tracker.log_metrics({"measured": int(measured.sum()), "extrapolated": int((~measured).sum())})
    tracker.log_artifact(scores_dir, "scores")


def log_selection(tracker: Tracker, kept_file: Path, scores_dir: Path) -> None:
    """Class and source composition before and after pruning, and the kept-id list."""
    before = pads.dataset(str(scores_dir), format="parquet").to_table(columns=["label", "source"])
    after = pads.dataset(str(kept_file), format="parquet").to_table(columns=["label", "source"])
    for column in ("label", "source"):
        tracker.log_figure(figure_composition(_counts(before, column), _counts(after, column),
                                              f"{column} before and after pruning"), f"composition_{column}.png")
    tracker.log_artifact(kept_file)


def _counts(table, column: str) -> dict[str, int]:
    values, counts = np.unique(np.asarray(table[column].to_pylist()), return_counts=True)
    return {str(k): int(v) for k, v in zip(values, counts, strict=True)}


def log_final(tracker: Tracker, history: list[dict]) -> None:
    keys = ("loss", "lr", "train_adv_acc", "val_robust_acc", "train_seconds", "stream_wait_seconds")
    log_history(tracker, history, keys)
    if history:
        curves = {k: [row[k] for row in history] for k in ("loss", "train_adv_acc", "val_robust_acc")}
        tracker.log_figure(figure_curves(curves, "epoch", "final training"), "final_training_curves.png")


# ---------------------------------------------------------------- one recorder per stage


def record_pool(tracker: Tracker, pool) -> None:
    log_pool_dataset(tracker, "pool", pool.info, pool.digest, pool.path, "pool")


def record_split(tracker: Tracker, split) -> None:
    tracker.log_dataset("scored subset", digest=split.digest, source=str(split.subset_dir), context="scoring",
                        num_rows=len(split.subset_ids), schema=POOL_SCHEMA)


def record_score(tracker: Tracker, score) -> None:
    log_history(tracker, score.history, ("loss", "lr", "clean_acc", "adv_acc"))


def record_extrapolate(tracker: Tracker, extrap) -> None:
    log_scores(tracker, extrap.scores_dir)
    log_probe(tracker, extrap.quality, extrap.probe_file)
    search = extrap.quality.get("search") or {}
    if search:
        tracker.log_metrics({"search_recall": search["recall"]})
        tracker.set_tags({"search_method": search["method"], "search_width": search["search_width"]})


def record_select(tracker: Tracker, selected, extrap) -> None:
    from rayprune.data.pool import read_pool_info

    log_pool_dataset(tracker, "pruned pool", read_pool_info(selected.pruned_pool), selected.digest,
                     selected.pruned_pool, "training")
    log_selection(tracker, selected.kept_file, extrap.scores_dir)


def record_evaluate(tracker: Tracker, test, evaluation) -> None:
    log_pool_dataset(tracker, "test set", test.info, test.digest, test.path, "evaluation")
    tracker.log_metrics({f"test_{k}": v for k, v in evaluation.metrics.items()})
    tracker.set_tags({"evaluation_protocol": evaluation.protocol["protocol"],
                      "evaluation": evaluation.protocol["label"],
                      "autoattack_standard": str(evaluation.protocol["standard"]).lower()})
    tracker.log_dict(evaluation.protocol, "evaluation_protocol.json")


def record_random_baseline(tracker: Tracker, evaluation) -> None:
    tracker.log_metrics({f"test_{k}": v for k, v in evaluation.metrics.items()})


def record_job(tracker: Tracker, summary) -> None:
    """The job's totals on the parent run: sizes, compute spent and wall time per stage."""
    tracker.log_metrics({"pool_size": summary.pool_size, "scored": summary.scored, "kept": summary.kept,
                         **{f"sample_gradient_steps_{k}": v["spent"] for k, v in summary.compute.items()},
                         **{f"sample_gradient_steps_{k}_whole_pool": v["whole_pool"]
                            for k, v in summary.compute.items()},
                         **{f"stage_seconds_{k}": v for k, v in summary.stage_seconds.items()}})


def register_final_model(tracker: Tracker, config: JobConfig, model_file: Path, num_classes: int, image_shape,
                         metrics: dict, tags: dict, description: str = "") -> ModelRegistration | None:
    """Log the EMA model (exported, traced on a mid-grey batch) and register it (candidate / champion).

    A rerun whose model was already registered (same ``model_digest`` tag) registers
    nothing new and returns that version.
    """
    from rayprune.stages.training import load_model_file

    name = config.tracking.registered_model
    existing = tracker.find_model_version(name, "model_digest", tags["model_digest"])
    if existing is not None:
        logger.info("MLflow: this model is already registered as %s version %d", name, existing)
        return ModelRegistration(existing, False)

    model = load_model_file(config, model_file, num_classes, image_shape[2]).eval()
    h, w, c = image_shape
    example = np.full((2, c, h, w), 0.5, dtype=np.float32)
    return tracker.register_model(
        model, name=name, input_example=example,
        metric_name="robust_accuracy", metric_value=float(metrics["worst"]), tags=tags, description=description,
    )


def log_probe(tracker: Tracker, quality: dict, probe_file: Path | None) -> None:
    """Probe quality of the chosen variant (metrics), all variants (JSON) and a scatter plot."""
    if not quality.get("chosen"):
        return
    import pyarrow.parquet as pq

    tracker.log_metrics({k: v for k, v in quality["chosen"].items() if k.startswith("probe_")})
    tracker.log_dict(quality, "extrapolation_quality.json")
    if probe_file is not None:
        probe = pq.read_table(probe_file)
        tracker.log_figure(figure_scatter(probe["measured"].to_numpy(), probe["extrapolated"].to_numpy(),
                                          "measured score", "extrapolated score",
                                          "probe: extrapolated vs measured"), "probe_scatter.png")
