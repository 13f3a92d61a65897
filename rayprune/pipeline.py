"""Run the stages in order, skip finished ones, write the manifest, return the summary.

    pool -> split -> score_subset -> extrapolate -> select

Everything lives under ``output_dir``; ``manifest.json`` there is written last.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rayprune.config import JobConfig, to_dict
from rayprune.stages.common import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What the job prints at the end (and writes into manifest.json)."""

    pool_size: int = 0
    scored: int = 0
    extrapolated: int = 0
    kept: int = 0
    kept_per_source: dict[str, int] = field(default_factory=dict)
    training_steps: int = 0
    sample_gradient_steps: int = 0
    recorded_samples: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    embedded_rows_per_node: dict[str, int] = field(default_factory=dict)
    output_dir: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


@contextmanager
def _timed(summary: RunSummary, stage: str):
    start = time.perf_counter()
    logger.info("stage %s ...", stage)
    yield
    summary.stage_seconds[stage] = round(time.perf_counter() - start, 2)
    logger.info("stage %s finished in %.1f s", stage, summary.stage_seconds[stage])


def run_pipeline(config: JobConfig) -> RunSummary:
    """Run the whole job on the Ray cluster the config points at (or a local one)."""
    from rayprune.stages.extrapolate import run_extrapolate
    from rayprune.stages.prepare import run_pool, run_split
    from rayprune.stages.resources import connect, plan_resources
    from rayprune.stages.score import run_score
    from rayprune.stages.select import run_select

    root = Path(config.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    summary = RunSummary(output_dir=str(root))
    connect(config.ray)
    plan = plan_resources(config.ray)
    with _timed(summary, "pool"):
        pool = run_pool(config, root)
    with _timed(summary, "split"):
        split = run_split(config, pool, root)
    with _timed(summary, "score_subset"):
        score = run_score(config, pool, split, root, plan)
    with _timed(summary, "extrapolate"):
        extrap = run_extrapolate(config, pool, split, score, root, plan)
    with _timed(summary, "select"):
        selected = run_select(config, pool, extrap, root)

    summary.pool_size = pool.info.num_rows
    summary.scored = len(split.subset_ids)
    summary.extrapolated = pool.info.num_rows - len(split.subset_ids)
    summary.kept = selected.kept
    summary.kept_per_source = selected.kept_per_source
    summary.training_steps = score.training_steps
    summary.sample_gradient_steps = score.sample_gradient_steps
    summary.recorded_samples = score.recording_passes
    summary.embedded_rows_per_node = extrap.rows_per_node
    summary.outputs = {
        "pool": str(pool.path),
        "scores": str(extrap.scores_dir),
        "subset_embeddings": str(extrap.reference_file),
        "subset_scores": str(score.scores_file),
        "subset_model": str(score.model_file),
        "kept_ids": str(selected.kept_file),
        "pruned_pool": str(selected.pruned_pool),
    }
    manifest = {
        "summary": asdict(summary),
        "config": to_dict(config),
        "resources": asdict(plan),
        "digests": {"pool": pool.digest, "split": split.digest, "score": score.digest,
                    "extrapolate": extrap.digest, "select": selected.digest},
        "stages": {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/_COMMITTED.json"))},
    }
    write_json_atomic(root / "manifest.json", manifest)
    return summary
