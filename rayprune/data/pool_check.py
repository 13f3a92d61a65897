"""Cheap checks of an existing pool, run on the driver before any Ray work starts.

:func:`check_pool` reads ``pool.json``, every file's Parquet footer (so corrupt or
truncated files are named), the ``id`` column (8 bytes a row: duplicates and nulls), the
label statistics of each row group (the label column itself only where a file has no
statistics) and the first few images of every file. It never reads the pool's images
whole: an image of the wrong size further into a file is caught, naming its id, where the
rows are read anyway (the split stage's row filter, ``decode_images``).

Corrupt data further into a file (a broken page) makes pyarrow fail wherever the rows
are read, inside Ray Data. :func:`find_unreadable_data` then reads the whole pool,
column by column, to name the file, row group and column; the pipeline runs it only
after such a failure.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from rayprune import storage
from rayprune.data.pool import POOL_META, SCHEMA, PoolError, PoolInfo, pool_files, read_pool_info
from rayprune.errors import one_line

logger = logging.getLogger(__name__)

SAMPLE_IMAGES = 64  # images per file whose byte length the preflight checks
FORMAT = ", ".join(f"{f.name} ({f.type})" for f in SCHEMA)


def _open(file: str, fs=None, path: str | None = None) -> pq.ParquetFile:
    """The Parquet file at ``file``, opened on ``fs`` at ``path`` when given (a URI's filesystem)."""
    try:
        return pq.ParquetFile(fs.open_input_file(path) if fs is not None else file)
    except (pa.ArrowException, OSError) as exc:
        raise PoolError(f"{file}: not a readable Parquet file (corrupt or truncated?): {one_line(exc)}") from None


def _read(pf: pq.ParquetFile, file: str, columns: list[str], row_group: int | None = None) -> pa.Table:
    try:
        if row_group is None:
            return pf.read(columns=columns)
        return pf.read_row_group(row_group, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise PoolError(f"{file}: column(s) {', '.join(columns)} unreadable (corrupt file?): {one_line(exc)}") from None


def check_schema(pf: pq.ParquetFile, file: str, image_shape: tuple[int, int, int]) -> None:
    """Exactly the pool columns with the pool types; a recorded image shape must match."""
    schema = pf.schema_arrow
    names = set(schema.names)
    missing = [f.name for f in SCHEMA if f.name not in names]
    extra = [n for n in schema.names if n not in SCHEMA.names]
    if missing or extra:
        what = "; ".join(p for p in (f"missing column(s) {', '.join(missing)}" if missing else "",
                                     f"unexpected column(s) {', '.join(extra)}" if extra else "") if p)
        raise PoolError(f"{file}: {what}; a pool file has exactly the columns {FORMAT}")
    for expected in SCHEMA:
        got = schema.field(expected.name).type
        if got != expected.type:
            raise PoolError(f"{file}: column {expected.name!r} has type {got}; the pool format needs {expected.type} "
                            f"(columns: {FORMAT})")
    recorded = (schema.metadata or {}).get(b"rayprune.image_shape")
    if recorded is not None:
        try:
            shape = tuple(int(v) for v in json.loads(recorded))
        except (ValueError, TypeError):
            shape = None
        if shape != tuple(image_shape):
            raise PoolError(f"{file}: its images are recorded as {recorded.decode(errors='replace')} (H, W, C) but "
                            f"pool.json says {list(image_shape)}; a pool has one image shape")


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_labels(pf: pq.ParquetFile, file: str, num_classes: int) -> None:
    """Labels in [0, num_classes) and never null: row-group statistics, else the column."""
    index = pf.schema_arrow.get_field_index("label")
    first = 0
    for rg in range(pf.metadata.num_row_groups):
        meta = pf.metadata.row_group(rg)
        stats = meta.column(index).statistics
        known = stats is not None and stats.has_min_max and stats.has_null_count
        if known and stats.null_count == 0 and 0 <= stats.min and stats.max < num_classes:
            first += meta.num_rows
            continue
        labels = _read(pf, file, ["label"], rg)["label"]
        nulls = labels.is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            raise PoolError(f"{file}, row {first + _first_row(nulls)}: the label is missing (null); "
                            f"labels are integers in [0, {num_classes - 1}]")
        values = labels.to_numpy()
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            row = _first_row(bad)
            raise PoolError(f"{file}, row {first + row}: label {int(values[row])} is out of range "
                            f"[0, {num_classes - 1}] (pool.json: num_classes = {num_classes}; "
                            f"{int(bad.sum())} such row(s) in this row group)")
        first += meta.num_rows


def check_sample_images(pf: pq.ParquetFile, file: str, image_bytes: int, image_shape) -> None:
    """The byte length of the first SAMPLE_IMAGES images of the file."""
    if pf.metadata.num_rows == 0:
        return
    try:
        batch = next(pf.iter_batches(batch_size=SAMPLE_IMAGES, columns=["id", "image"]))
    except (pa.ArrowException, OSError) as exc:
        raise PoolError(f"{file}: images unreadable (corrupt file?): {one_line(exc)}") from None
    lengths = pc.binary_length(batch.column("image")).fill_null(-1).to_numpy(zero_copy_only=False)
    bad = lengths != image_bytes
    if bad.any():
        row = _first_row(bad)
        got = "is missing (null)" if lengths[row] < 0 else f"has {int(lengths[row])} bytes"
        raise PoolError(f"{file}, row {row} (id {batch.column('id')[row].as_py()}): image {got}; pool.json's "
                        f"image_shape {list(image_shape)} needs {image_bytes} bytes (H x W x C uint8)")


def check_unique_ids(ids: list[np.ndarray], files: list[str]) -> None:
    """Ids unique across the pool; the error names both occurrences (file and row)."""
    every = np.concatenate(ids) if ids else np.empty(0, np.int64)
    order = np.argsort(every, kind="stable")
    repeated = np.flatnonzero(every[order][1:] == every[order][:-1])
    if repeated.size == 0:
        return
    starts = np.cumsum([0] + [len(part) for part in ids])

    def where(position: int) -> str:
        f = int(np.searchsorted(starts, position, side="right") - 1)
        return f"{files[f]}, row {position - starts[f]}"

    first, second = int(order[repeated[0]]), int(order[repeated[0] + 1])
    raise PoolError(f"{where(second)}: duplicate id {int(every[second])} (also at {where(first)}); "
                    f"ids must be unique across the pool ({repeated.size} repeat(s))")


def _files_on(path: str | Path, info: PoolInfo) -> tuple[list[str], object, list[str]]:
    """The pool's files as named in errors, the filesystem of a URI pool (else None) and
    the paths to open on it."""
    files = pool_files(path, info)
    fs, paths = storage.files_on(files) if storage.is_uri(str(path)) else (None, files)
    return files, fs, paths


def check_pool(path: str | Path) -> PoolInfo:
    """Check the pool at ``path`` as the module docstring says; return its ``PoolInfo``."""
    info = read_pool_info(path)  # also refuses a file listed twice
    files, fs, paths = _files_on(path, info)
    rows, ids = 0, []
    for file, fs_path in zip(files, paths):
        pf = _open(file, fs, fs_path)
        check_schema(pf, file, info.image_shape)
        column = _read(pf, file, ["id"])["id"]
        if column.null_count:
            nulls = column.is_null().to_numpy(zero_copy_only=False)
            raise PoolError(f"{file}, row {_first_row(nulls)}: the id is missing (null); ids are unique int64 values")
        ids.append(column.to_numpy())
        check_labels(pf, file, info.num_classes)
        check_sample_images(pf, file, info.image_bytes, info.image_shape)
        rows += pf.metadata.num_rows
    if rows != info.num_rows:
        raise PoolError(f"{storage.join(path, POOL_META)} says the pool has {info.num_rows} rows "
                        f"but its files hold {rows}")
    check_unique_ids(ids, files)
    logger.info("pool %s checked: %d rows in %d file(s), %d classes, images %s", path, rows, len(files),
                info.num_classes, "x".join(map(str, info.image_shape)))
    return info


def find_unreadable_data(path: str | Path) -> None:
    """Decode every value of the pool at ``path`` and raise a ``PoolError`` naming the first
    file, row group (with its rows) and column pyarrow cannot read. Returns quietly if
    everything decodes. Costs a full read of the pool, one column chunk in memory at a time.

    Data altered without breaking its encoding (flipped bytes inside an image) decodes
    fine and is not found: the pool files carry no page checksums.
    """
    info = read_pool_info(path)
    files, fs, paths = _files_on(path, info)
    logger.warning("reading every value of the %d file(s) of %s to find the unreadable one", len(files), path)
    for file, fs_path in tqdm(list(zip(files, paths)), desc=f"checking every value of {path}", unit="file",
                              disable=len(files) < 2 or not sys.stderr.isatty()):
        pf = _open(file, fs, fs_path)
        first = 0
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            for column in pf.schema_arrow.names:
                try:
                    pf.read_row_group(rg, columns=[column])
                except (pa.ArrowException, OSError) as exc:
                    raise PoolError(f"{file}, row group {rg} (rows {first}-{first + n - 1}): column {column!r} "
                                    f"cannot be decoded (corrupt file?): {one_line(exc)}; rewrite or remove this "
                                    f"file") from None
            first += n
