"""Benchmark 4: embed + extrapolate wall time and peak memory as the pool grows.

For each pool size the job's own stages run on a demo pool (a short scoring run on a
fixed-size subset, so the number of scored neighbours stays the same), then the
extrapolate stage (embedding and extrapolating the whole pool in one Ray Data stream)
is timed while the resident memory of the driver and of the Ray workers is sampled.
The claim checked: time grows linearly with the pool (rows/s stays flat or improves as
start-up is amortised) and the driver's memory does not grow with the pool.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from benchmarks.common import demo_pool, local_ray, memory_mib, pool_mib, timed_with_memory
from benchmarks.report import BenchResult, Comparison
from rayprune.config import load_config

logger = logging.getLogger(__name__)

PRESETS = {
    "ci": {"sizes": [1_000, 3_000], "image_size": 8, "scored": 200, "width": 8},
    "small": {"sizes": [10_000, 30_000, 100_000], "image_size": 16, "scored": 2_000, "width": 32},
    "full": {"sizes": [10_000, 100_000, 1_000_000], "image_size": 32, "scored": 5_000, "width": 32},
}


def measure_size(n_rows: int, p: dict, workdir: Path) -> dict:
    """Prepare the stages before ``extrapolate`` for an ``n_rows`` pool, then time and sample that stage."""
    from rayprune.stages.extrapolate import run_extrapolate
    from rayprune.stages.prepare import run_pool, run_split
    from rayprune.stages.resources import plan_resources
    from rayprune.stages.score import run_score

    pool_dir, info = demo_pool(workdir, n_rows, p["image_size"], real_fraction=0.1)
    n_prunable = info.sources["synthetic"]
    config = load_config(None, {
        "pool.path": str(pool_dir), "output_dir": str(workdir / f"out-{n_rows}"), "model.width": p["width"],
        "split.subset_fraction": min(1.0, p["scored"] / n_prunable), "train.epochs": 3, "train.steps_per_epoch": 2,
        "scoring.window": 2, "attack.steps": 1, "tracking.enabled": "false", "final.enabled": "false"})
    root = Path(config.output_dir)
    plan = plan_resources(config.ray)
    pool = run_pool(config, root)
    split = run_split(config, pool, root)
    score = run_score(config, pool, split, root, plan)
    driver_before = memory_mib(os.getpid())[0]
    _, seconds, memory = timed_with_memory(lambda: run_extrapolate(config, pool, split, score, root, plan))
    return {"rows": n_rows, "scored": len(split.subset_ids), "seconds": seconds, "rows_per_s": n_rows / seconds,
            "driver_before_mib": driver_before, **memory, "pool_mib": pool_mib(pool_dir)}


def run(preset: str, workdir: Path) -> BenchResult:
    p = PRESETS[preset]
    result = BenchResult("scaling", preset, dict(p))
    with local_ray():
        for n in p["sizes"]:
            row = measure_size(n, p, workdir)
            result.rows.append(row)
            logger.info("scaling: %d rows in %.1f s (%.0f rows/s), driver peak %.0f MiB, workers peak %.0f MiB",
                        n, row["seconds"], row["rows_per_s"], row["driver_peak_mib"], row["workers_peak_total_mib"])
    small, mid, big = result.rows[0], result.rows[-2], result.rows[-1]
    result.comparisons += [
        Comparison("throughput by pool size", f"{mid['rows']:,} rows",
                   f"{big['rows']:,} rows", "rows/s", mid["rows_per_s"], big["rows_per_s"], target=0.9,
                   note="linear time = flat rows/s (start-up makes small pools slower per row)"),
        Comparison("driver peak memory by pool size", f"{small['rows']:,} rows",
                   f"{big['rows']:,} rows", "MiB", small["driver_peak_mib"], big["driver_peak_mib"],
                   higher_is_better=False, target=0.8,
                   note=f"pool on disk grows {big['pool_mib'] / max(small['pool_mib'], 1e-9):.0f}x"),
    ]
    result.notes.append("memory is resident set size sampled every 0.25 s from /proc (a lower bound on peaks); "
                        f"{p['scored']} scored samples at every size")
    return result
