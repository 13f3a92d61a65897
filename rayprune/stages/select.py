"""Stage ``select``: choose the kept ids and write the pruned pool.

The driver reads four small columns of the scores table (id, label, source, score) and
ranks them; the pruned pool's rows are copied by Ray Data, unchanged, into the same
pool format as the input (so it can be pruned again or trained on directly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from rayprune.config import JobConfig
from rayprune.data.pool import PoolInfo, write_pool_info
from rayprune.scoring.scores import SCORE_DIRECTIONS
from rayprune.scoring.select import select_by_score, select_random
from rayprune.stages.common import fresh_dir, stage_for, swap_in
from rayprune.stages.extrapolate import ExtrapolateResult
from rayprune.stages.prepare import PoolRef, write_rows_by_id
from rayprune.validation import check_finite_scores

logger = logging.getLogger(__name__)

KEPT_FILE = "kept_ids.parquet"
PRUNED_DIR = "pruned_pool"


@dataclass(frozen=True)
class SelectResult:
    kept_file: Path
    pruned_pool: Path
    kept: int
    kept_per_source: dict[str, int]
    digest: str


def read_scores(scores_dir: Path, n_pool: int) -> pa.Table:
    """The scores table's selection columns, sorted by id, checked to cover the pool once."""
    table = pads.dataset(str(scores_dir), format="parquet").to_table(columns=["id", "label", "source", "score"])
    table = table.sort_by("id")
    ids = table["id"].to_numpy()
    if len(ids) != n_pool or (len(ids) > 1 and (np.diff(ids) == 0).any()):
        raise RuntimeError(f"scores table at {scores_dir} must hold each of the {n_pool} pool ids once")
    check_finite_scores(ids, table["score"].to_numpy(zero_copy_only=False), f"scores table {scores_dir}")
    return table


def choose_kept(config: JobConfig, table: pa.Table) -> np.ndarray:
    """Sorted kept ids from the scores table."""
    sources = np.asarray(table["source"].to_pylist(), dtype=object)
    common = dict(
        keep_fraction=config.selection.keep_fraction, labels=table["label"].to_numpy(),
        class_balanced=config.selection.class_balanced,
        prunable=np.isin(sources, list(config.pool.prunable_sources)), seed=config.selection.seed,
    )
    if config.selection.strategy == "random":
        positions = select_random(table.num_rows, **common)
    else:
        positions = select_by_score(
            table["score"].to_numpy(), higher_is_better=SCORE_DIRECTIONS[config.scoring.score], **common
        )
    return table["id"].to_numpy()[positions]


def write_pruned_pool(pool: PoolRef, kept_ids: np.ndarray, per_source: dict[str, int], dest: Path) -> None:
    """Copy the kept rows, unchanged, into a new pool at ``dest`` (via Ray Data, atomically)."""
    tmp = fresh_dir(dest.with_name(f".{dest.name}.partial"))
    written = write_rows_by_id(pool, kept_ids, tmp)
    if written != len(kept_ids):
        raise RuntimeError(f"wrote {written} pruned-pool rows, expected {len(kept_ids)}")
    write_pool_info(tmp, PoolInfo(
        num_rows=written, image_shape=pool.info.image_shape, num_classes=pool.info.num_classes,
        sources=per_source, files=sorted(p.name for p in tmp.glob("*.parquet")), class_names=pool.info.class_names,
    ))
    swap_in(tmp, dest)


def run_select(config: JobConfig, pool: PoolRef, extrap: ExtrapolateResult, root: Path) -> SelectResult:
    stage = stage_for(config, root, "select", ("selection", "pool.prunable_sources", "scoring.score"),
                      upstream={"extrapolate": extrap.digest})
    kept_file, pruned = stage.dir / KEPT_FILE, stage.dir / PRUNED_DIR
    record = stage.committed()
    if record is None:
        stage.begin()
        table = read_scores(extrap.scores_dir, pool.info.num_rows)
        kept_ids = choose_kept(config, table)
        kept_rows = table.take(pa.array(np.searchsorted(table["id"].to_numpy(), kept_ids)))
        pq.write_table(kept_rows.select(["id", "label", "source", "score"]), kept_file)
        per_source = {str(k): int(v) for k, v in zip(*np.unique(kept_rows["source"].to_pylist(), return_counts=True))}
        write_pruned_pool(pool, kept_ids, per_source, pruned)
        record = stage.commit({"kept": int(len(kept_ids)), "kept_per_source": per_source})
    out = record["outputs"]
    return SelectResult(kept_file, pruned, out["kept"], out["kept_per_source"], stage.input_digest)
