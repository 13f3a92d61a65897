"""Local paths and filesystem URIs (s3://, gs://, hdfs://, file://) through ``pyarrow.fs``.

Inputs (pools, test pools) may live on any filesystem pyarrow can open from a URI; the
job's ``output_dir`` stays a POSIX path (its commit markers rely on atomic renames,
which object stores lack) and :func:`publish` copies the finished products to a URI,
writing ``_COMPLETE.json`` last so that a partial upload never looks finished.

S3 options may ride on the URI as pyarrow reads them (``?region=...&endpoint_override=
host:port&scheme=http``); credentials come from the usual places (``AWS_*`` environment
variables, ``~/.aws``, instance roles; ``GOOGLE_APPLICATION_CREDENTIALS`` for gs://).
Locations are passed around as strings, and each process (driver, Ray worker) opens
its filesystem from them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TypeGuard
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs

from rayprune.errors import InputError, one_line

logger = logging.getLogger(__name__)

COMPLETE = "_COMPLETE.json"
PUBLISHING = "_PUBLISHING.json"  # written first by a publish, removed after COMPLETE: the destination is ours
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
ALLOWED = "a local path or a URI pyarrow can open (s3://, gs://, hdfs://, file://)"


class StorageError(InputError):
    """A location that cannot be opened or written; the message names it."""


def is_uri(location: str | Path) -> TypeGuard[str]:
    return isinstance(location, str) and bool(_URI.match(location))


def _split_query(location: str) -> tuple[str, str]:
    base, sep, query = location.partition("?")
    return base, sep + query


def join(location: str | Path, *names: str) -> str:
    """``location/name/...``; a URI keeps its query (``?region=...``) at the end."""
    if not is_uri(location):
        return str(Path(location).joinpath(*names))
    base, query = _split_query(location)
    return "/".join([base.rstrip("/"), *names]) + query


def basename(location: str | Path) -> str:
    if not is_uri(location):
        return Path(location).name
    return _split_query(location)[0].rstrip("/").rsplit("/", 1)[-1]


def _parent(location: str) -> tuple[str, str]:
    """(parent location, last name) of a file location."""
    if not is_uri(location):
        head, tail = os.path.split(os.path.abspath(location))
        return head, tail
    base, query = _split_query(location)
    head, _, tail = base.rstrip("/").rpartition("/")
    return head + query, unquote(tail)


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``location`` and the path on it; a StorageError naming it if none."""
    if not is_uri(location):
        if not str(location):
            raise StorageError(f"an empty location was given; expected {ALLOWED}")
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StorageError(f"{location}: cannot open its filesystem ({one_line(exc)}); expected {ALLOWED}, "
                           "with credentials for it") from None
    return fs, (path.rstrip("/") or path)


def files_on(locations: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem and the paths on it for a list of file locations (opened once per directory)."""
    if not locations:
        return pafs.LocalFileSystem(), []
    parents: dict[str, str] = {}
    fs, paths = None, []
    for location in map(str, locations):
        parent, name = _parent(location)
        if parent not in parents:
            parent_fs, parents[parent] = resolve(parent)
            if fs is None:
                fs = parent_fs
            elif not parent_fs.equals(fs):
                raise StorageError(f"{location} is on another filesystem than {locations[0]}; "
                                   "the files of one pool must share one")
        paths.append(f"{parents[parent].rstrip('/')}/{name}")
    return fs, paths


def ray_parquet_source(locations: list[str]) -> dict:
    """``paths`` (and ``filesystem`` for URIs) for ``ray.data.read_parquet`` of these files."""
    locations = [str(f) for f in locations]
    if not any(is_uri(f) for f in locations):
        return {"paths": locations}
    fs, paths = files_on(locations)
    return {"paths": paths, "filesystem": fs}


def file_sizes(locations: list[str]) -> list[int | None]:
    """Size in bytes of each file, None where there is no file (one listing call per filesystem)."""
    fs, paths = files_on(locations)
    try:
        infos = fs.get_file_info(paths)
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"cannot list {locations[0]} and the rest: {one_line(exc)}") from None
    return [i.size if i.type == pafs.FileType.File else None for i in infos]


def read_bytes(location: str | Path) -> bytes:
    """The whole (small) file; FileNotFoundError if there is none."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(str(location))
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def check_bucket(location: str) -> None:
    """That ``location`` opens and, on S3 or GCS, that its bucket exists (else a StorageError naming it)."""
    fs, path = resolve(location)
    if fs.type_name in ("s3", "gcs"):
        bucket = path.lstrip("/").split("/", 1)[0]
        try:
            found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except (pa.ArrowException, OSError) as exc:
            reason = one_line(exc)
            raise StorageError(f"{location}: cannot reach it ({reason}); check the URI and credentials") from None
        if bucket and not found:
            raise StorageError(f"{location}: the bucket {bucket!r} does not exist (or these credentials cannot see it)")


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def check_publish_target(uri: str) -> None:
    """``uri`` is empty, missing or an earlier publish of rayprune's (``_COMPLETE.json`` or
    ``_PUBLISHING.json`` at its top); else a StorageError: a republish overwrites what
    is there, which must never be someone else's data."""
    fs, base = resolve(uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"publish_uri {uri} cannot be listed: {one_line(exc)}") from None
    names = {e.base_name for e in entries}
    if names and not names & {COMPLETE, PUBLISHING}:
        raise StorageError(f"publish_uri {uri} holds other data ({sorted(names)[0]}, ...) and no earlier rayprune "
                           f"publish ({COMPLETE}): publish to a new or empty location")


def publish(root: Path, uri: str, products: list[str]) -> dict:
    """Copy ``products`` (files or directories relative to ``root``) to ``uri``; ``_COMPLETE.json`` last.

    ``uri`` must pass :func:`check_publish_target`. ``_PUBLISHING.json`` is written first
    (so an interrupted publish is still recognisably ours), an earlier ``_COMPLETE.json``
    is removed, each product directory is emptied before it is copied, so a republish
    overwrites, and a publish that fails leaves no complete marker. Returns the marker's
    content: the files (relative names) with their sizes.
    """
    root = Path(root)
    check_publish_target(uri)
    fs, base = resolve(uri)
    local = pafs.LocalFileSystem()
    files: dict[str, int] = {}
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(base, recursive=True)
        _write_bytes(fs, f"{base}/{PUBLISHING}", json.dumps({"source": str(root)}).encode())
        marker = f"{base}/{COMPLETE}"
        if fs.get_file_info(marker).type != pafs.FileType.NotFound:
            fs.delete_file(marker)
        for rel in products:
            source = root / rel
            target = f"{base}/{rel}"
            if source.is_dir():
                fs.delete_dir_contents(target, missing_dir_ok=True)
                if isinstance(fs, pafs.LocalFileSystem):  # object stores have no directories to make
                    fs.create_dir(target, recursive=True)
                pafs.copy_files(str(source), target, source_filesystem=local, destination_filesystem=fs)
                for f in sorted(p for p in source.rglob("*") if p.is_file()):
                    files[f.relative_to(root).as_posix()] = f.stat().st_size
            elif source.is_file():
                if isinstance(fs, pafs.LocalFileSystem):
                    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                pafs.copy_files(str(source), target, source_filesystem=local, destination_filesystem=fs)
                files[Path(rel).as_posix()] = source.stat().st_size
            else:
                raise FileNotFoundError(f"{source}: a product to publish is missing")
        record = {"source": str(root), "uri": uri, "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "files": files}
        _write_bytes(fs, marker, json.dumps(record, indent=2).encode())
        fs.delete_file(f"{base}/{PUBLISHING}")
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"publishing {root} to {uri} failed: {one_line(exc)}") from None
    logger.info("published %d file(s) (%.1f MB) to %s", len(files), sum(files.values()) / 1e6, uri)
    return record


def read_published(uri: str) -> dict | None:
    """The ``_COMPLETE.json`` record at ``uri``, or None if no complete publish is there."""
    try:
        return json.loads(read_bytes(join(uri, COMPLETE)))
    except FileNotFoundError:
        return None
