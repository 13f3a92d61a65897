"""Stages ``pool`` and ``split``: make or check the pool, draw the scored subset.

The split reads only the ``id`` and ``source`` columns on the driver; the subset's rows
are copied out of the pool by Ray Data, so images never pass through the driver.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from rayprune import storage
from rayprune.config import JobConfig
from rayprune.data.demo_pool import generate_test_rows
from rayprune.data.pool import POOL_META, PoolError, PoolInfo, PoolWriter, pool_files, read_pool_info, write_demo_pool
from rayprune.scoring.select import draw_subset
from rayprune.stages.common import digest, fresh_dir, stage_for, swap_in

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolRef:
    """A checked pool: where it is, what it holds, and a digest of its content facts."""

    path: Path | str  # a local directory, or a URI (``rayprune.storage``)
    info: PoolInfo
    files: list[str]
    digest: str
    stage: str = ""  # the stage that generated it (the demo pools), or "" for a user's pool

    def as_input(self, fact: str) -> tuple[dict[str, str], dict[str, str]]:
        """(upstream, facts) of a stage that reads this pool: the generating stage's digest,
        or a user pool's content digest as the fact ``fact`` (what the preflight can check)."""
        if self.stage:
            return {self.stage: self.digest}, {fact: "demo"}
        return {}, {fact: self.digest}


def open_pool(path: str | Path) -> PoolRef:
    """Check an existing pool (a directory or a URI); its digest covers pool.json and the files' names
    and sizes, so the same pool has the same digest wherever it is stored."""
    path = str(path) if storage.is_uri(str(path)) else Path(path).resolve()
    info = read_pool_info(path)
    files = pool_files(path, info)
    facts = [(storage.basename(f), size) for f, size in zip(files, storage.file_sizes(files))]
    return PoolRef(path, info, files, digest(storage.read_text(storage.join(path, POOL_META)), facts))


def run_pool(config: JobConfig, root: Path) -> PoolRef:
    """Use the pool at ``pool.path``, or generate the demo pool once into ``<root>/pool``."""
    if config.pool.path:
        return open_pool(config.pool.path)
    stage = stage_for(config, root, "pool", ("pool.demo",))
    data = stage.dir / "data"
    if stage.committed() is None:
        stage.begin()
        spec = config.pool.demo
        logger.info("generating the demo pool (%d real + %d synthetic rows)", spec.n_real, spec.n_synthetic)
        write_demo_pool(spec, data, rows_per_file=max(256, math.ceil(spec.n_rows / 16)), overwrite=True)
        stage.commit({"path": str(data)})
    info = read_pool_info(data)
    return PoolRef(data, info, pool_files(data, info), stage.input_digest, stage="pool")


def run_test_pool(config: JobConfig, root: Path) -> PoolRef:
    """The evaluation's test pool: ``evaluation.test_pool``, or the demo's test split."""
    if config.evaluation.test_pool:
        return open_pool(config.evaluation.test_pool)
    size = config.evaluation.demo_test_size
    stage = stage_for(config, root, "test_pool", ("pool.demo", "evaluation.demo_test_size"))
    data = stage.dir / "data"
    if stage.committed() is None:
        stage.begin()
        spec = config.pool.demo
        rows = generate_test_rows(spec, size)
        with PoolWriter(data, image_shape=(spec.image_size, spec.image_size, 3), num_classes=spec.num_classes,
                        overwrite=True) as writer:
            writer.add(rows.ids, rows.images, rows.labels, rows.sources, origin="demo test split")
        stage.commit({"path": str(data), "rows": size})
    info = read_pool_info(data)
    return PoolRef(data, info, pool_files(data, info), stage.input_digest, stage="test_pool")


def read_ids_and_sources(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The pool's ``id`` and ``source`` columns, sorted by id (no images read)."""
    fs, paths = storage.files_on(files)
    table = pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=["id", "source"])
    ids = table["id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    sources = np.asarray(table["source"].to_pylist(), dtype=object)[order]
    return ids[order], sources


def filter_by_ids(table: pa.Table, sorted_keep: np.ndarray) -> pa.Table:
    """Rows of ``table`` whose id is in ``sorted_keep`` (ascending int64; schema and bytes
    unchanged). A binary search per row: O(rows log kept) per batch, where a hash set of
    the kept ids (``pc.is_in``) would be rebuilt for every batch of a 20M-row pool."""
    ids = table["id"].to_numpy()
    if sorted_keep.size == 0:
        return table.slice(0, 0)
    at = np.minimum(np.searchsorted(sorted_keep, ids), sorted_keep.size - 1)
    return table.filter(pa.array(sorted_keep[at] == ids))


@dataclass(frozen=True)
class SplitResult:
    subset_dir: Path
    subset_ids: np.ndarray
    n_pool: int
    n_prunable: int
    n_real: int
    digest: str


def run_split(config: JobConfig, pool: PoolRef, root: Path) -> SplitResult:
    """Draw the subset of the prunable pool and copy its rows to ``split/subset``."""
    unknown = sorted(set(config.pool.prunable_sources) - set(pool.info.sources))
    if unknown:
        raise PoolError(
            f"pool.prunable_sources names {', '.join(unknown)}, which the pool at {pool.path} does not have; "
            f"its sources are {', '.join(sorted(pool.info.sources))}"
        )
    upstream, facts = pool.as_input("pool")
    stage = stage_for(config, root, "split", ("split", "pool.prunable_sources"), upstream=upstream, facts=facts)
    subset_dir = stage.dir / "subset"
    record = stage.committed()
    if record is None:
        stage.begin()
        ids, sources = read_ids_and_sources(pool.files)
        prunable = np.isin(sources, list(config.pool.prunable_sources))
        positions = draw_subset(len(ids), config.split.subset_fraction, config.split.seed, eligible=prunable)
        subset_ids = ids[positions]
        pq.write_table(pa.table({"id": subset_ids}), stage.dir / "subset_ids.parquet")
        tmp = fresh_dir(stage.dir / ".subset.partial")
        written = write_rows_by_id(pool, subset_ids, tmp)
        if written != len(subset_ids):
            raise RuntimeError(f"split: wrote {written} subset rows, expected {len(subset_ids)}")
        swap_in(tmp, subset_dir)
        record = stage.commit({
            "n_pool": int(len(ids)), "n_prunable": int(prunable.sum()), "n_subset": int(len(subset_ids)),
            "n_real": int((~prunable).sum()),
        })
    subset_ids = pq.read_table(stage.dir / "subset_ids.parquet")["id"].to_numpy()
    out = record["outputs"]
    return SplitResult(subset_dir, subset_ids, out["n_pool"], out["n_prunable"], out["n_real"], stage.input_digest)


def check_image_lengths(table: pa.Table, image_shape, where: str) -> None:
    """Every image of ``table`` has the byte length of ``image_shape``; else a PoolError naming the id."""
    size = int(np.prod(image_shape))
    lengths = pc.binary_length(table["image"]).fill_null(-1).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != size)
    if bad.size:
        i = int(bad[0])
        got = "is missing (null)" if lengths[i] < 0 else f"has {int(lengths[i])} bytes"
        raise PoolError(f"{where}, id {table['id'][i].as_py()}: image {got}; pool.json's image_shape "
                        f"{list(image_shape)} needs {size} bytes (H x W x C uint8)")


def image_check_kwargs(pool: PoolRef) -> dict:
    return {"image_shape": list(pool.info.image_shape), "where": f"pool {pool.path}"}


def keep_rows_by_id(table: pa.Table, keep_ref: list, image_shape: list | None = None,
                    where: str = "pool") -> pa.Table:
    """Ray Data batch function: the rows whose id is in the broadcast ascending id array.

    Every row of the pool passes through it, so it also checks every image's byte length
    (cheap: Arrow's length column), which the preflight only samples. The ref arrives
    wrapped in a list so Ray hands it over unresolved; the array is read from the object
    store without a copy."""
    if image_shape is not None:
        check_image_lengths(table, image_shape, where)
    return filter_by_ids(table, ray.get(keep_ref[0]))


def write_rows_by_id(pool: PoolRef, keep_ids: np.ndarray, dest: Path) -> int:
    """Copy the pool's rows whose id is in ``keep_ids``, unchanged, as parquet files under
    ``dest``; return how many were written.

    Ray Data tasks rather than an actor: the filter needs no state but the shared id array,
    so every CPU of the cluster can take a block, and no actor process is started per stage
    (about a second each time on 2 CPUs)."""
    keep = ray.put(np.sort(np.asarray(keep_ids, np.int64)))
    (
        ray.data.read_parquet(**storage.ray_parquet_source(pool.files))
        .map_batches(keep_rows_by_id, fn_kwargs={"keep_ref": [keep], **image_check_kwargs(pool)},
                     batch_format="pyarrow", num_cpus=0.5)
        .write_parquet(str(dest))
    )
    return pads.dataset(str(dest), format="parquet").count_rows()
