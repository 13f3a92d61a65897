"""Stage ``random_baseline`` (with ``final.compare_random``): what the scores are worth.

A class-balanced random pruning of the same size as the selection, drawn without
replacement, then the same final training budget and the same evaluation as the
robust model (``final_train_random``, ``evaluate_random``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayprune import storage
from rayprune.config import JobConfig
from rayprune.stages.common import stage_for
from rayprune.stages.evaluate import EvalResult, run_evaluate
from rayprune.stages.final import run_final
from rayprune.stages.prepare import PoolRef
from rayprune.stages.resources import ResourcePlan


def write_random_pool(config: JobConfig, pool: PoolRef, kept: int, root: Path) -> tuple[Path, str]:
    """The random-pruning baseline: a class-balanced random pool of the selection's size."""
    from rayprune.scoring.select import select_random
    from rayprune.stages.select import write_pruned_pool

    upstream, facts = pool.as_input("pool")
    stage = stage_for(config, root, "random_baseline", ("selection", "pool.prunable_sources"), upstream=upstream,
                      facts={**facts, "kept": kept})
    out = stage.dir / "pruned_pool"
    if stage.committed() is None:
        stage.begin()
        fs, paths = storage.files_on(pool.files)
        table = pa.concat_tables(pq.read_table(f, columns=["id", "label", "source"], filesystem=fs)
                                 for f in paths).sort_by("id")
        sources = np.asarray(table["source"].to_pylist(), dtype=object)
        prunable = np.isin(sources, list(config.pool.prunable_sources))
        keep = select_random(len(sources), keep_count=int(kept - (~prunable).sum()), labels=table["label"].to_numpy(),
                             class_balanced=config.selection.class_balanced, prunable=prunable,
                             seed=config.selection.seed + 1)
        per_source = {str(k): int(v) for k, v in zip(*np.unique(sources[keep].astype(str), return_counts=True))}
        write_pruned_pool(pool, table["id"].to_numpy()[keep], per_source, out)
        stage.commit({"kept": int(len(keep))})
    return out, stage.input_digest


def run_random_baseline(config: JobConfig, pool: PoolRef, kept: int, test: PoolRef, root: Path,
                        plan: ResourcePlan) -> EvalResult:
    """Random pool, final training and evaluation; returns the evaluation."""
    random_pool, random_digest = write_random_pool(config, pool, kept, root)
    final = run_final(config, pool, random_pool, {"random_baseline": random_digest}, root, plan,
                      name="final_train_random")
    return run_evaluate(config, test, final.model_file, {"final_train_random": final.digest}, root, plan,
                        name="evaluate_random")
