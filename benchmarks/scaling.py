"""Benchmark 4: embed + extrapolate wall time and peak memory as the pool grows.

The pools of every size are the first rows of one demo pool (a fixed real part, the rest
synthetic), so each holds the smallest one. One short scoring run of the job's own stages
scores a fixed-size subset of the smallest pool; then, at each size, the extrapolate stage
(embedding and extrapolating the whole pool in one Ray Data stream) extends those same
scores to the pool while the resident memory of the driver and of the Ray workers is
sampled. Only the pool grows, not the scored neighbours. The claim checked: time grows
linearly with the pool (rows/s stays flat or improves as start-up is amortised) and the
driver's memory does not grow with the pool.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from benchmarks.common import local_ray, memory_mib, pool_mib, score_subset, timed_with_memory
from benchmarks.report import BenchResult, Comparison
from rayprune.config import load_config
from rayprune.data.demo_pool import DemoPoolSpec
from rayprune.data.pool import write_demo_pool

logger = logging.getLogger(__name__)

PRESETS = {
    "ci": {"sizes": [1_000, 3_000], "image_size": 8, "scored": 200, "width": 8},
    "small": {"sizes": [10_000, 30_000, 100_000], "image_size": 16, "scored": 2_000, "width": 32},
    "full": {"sizes": [10_000, 100_000, 1_000_000], "image_size": 32, "scored": 5_000, "width": 32},
}
REAL_SHARE = 0.1  # of the smallest pool; the larger pools add synthetic rows only


def _config(pool_dir: Path, out: Path, p: dict, subset_fraction: float):
    return load_config(None, {
        "pool.path": str(pool_dir), "output_dir": str(out), "model.width": p["width"],
        "split.subset_fraction": subset_fraction, "train.epochs": 3, "train.steps_per_epoch": 2,
        "scoring.window": 2, "attack.steps": 1, "tracking.enabled": "false", "final.enabled": "false"})


def scored_pools(p: dict, workdir: Path):
    """Write the pool of every size; score the smallest. Returns ``({size: pool dir}, split, score)``."""
    sizes = p["sizes"]
    n_real = max(1, round(REAL_SHARE * sizes[0]))
    spec = DemoPoolSpec(n_real=n_real, n_synthetic=max(sizes) - n_real, image_size=p["image_size"])
    pools = {}
    for n in sizes:
        pools[n] = workdir / f"pool-{n}"
        write_demo_pool(spec, pools[n], overwrite=True, first_rows=n)
    config = _config(pools[sizes[0]], workdir / "scoring", p, min(1.0, p["scored"] / (sizes[0] - n_real)))
    return pools, *score_subset(config)


def measure_size(pool_dir: Path, split, score, p: dict, workdir: Path) -> dict:
    """Time and sample the extrapolate stage over the pool at ``pool_dir`` from the shared scoring run."""
    from rayprune.stages.extrapolate import run_extrapolate
    from rayprune.stages.prepare import run_pool
    from rayprune.stages.resources import plan_resources

    config = _config(pool_dir, workdir / f"out-{pool_dir.name}", p, 1.0)
    root = Path(config.output_dir)
    plan = plan_resources(config.ray)
    pool = run_pool(config, root)
    driver_before = memory_mib(os.getpid())[0]
    _, seconds, memory = timed_with_memory(lambda: run_extrapolate(config, pool, split, score, root, plan))
    n_rows = pool.info.num_rows
    return {"rows": n_rows, "scored": len(split.subset_ids), "seconds": seconds, "rows_per_s": n_rows / seconds,
            "driver_before_mib": driver_before, **memory, "pool_mib": pool_mib(pool_dir)}


def run(preset: str, workdir: Path) -> BenchResult:
    p = PRESETS[preset]
    result = BenchResult("scaling", preset, dict(p))
    with local_ray():
        pools, split, score = scored_pools(p, workdir)
        for n in p["sizes"]:
            row = measure_size(pools[n], split, score, p, workdir)
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
                        f"the same {p['scored']} scored samples at every size (one scoring run on the smallest "
                        "pool; every pool holds the smallest one's rows)")
    return result
