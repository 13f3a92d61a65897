"""The pool format: a directory of Parquet files plus ``pool.json``.

One row per sample::

    id      int64    stable, unique across the pool (the join key everywhere)
    image   binary   H*W*C uint8 bytes, row-major H x W x C (as numpy's tobytes())
    label   int64    class index in [0, num_classes)
    source  string   where the sample came from, e.g. "real" or "synthetic"

Every image in a pool has the same shape, recorded in ``pool.json`` (and in each file's
schema metadata) together with the row count, the number of classes, the count per
source and the file list. Several files let Ray Data read a pool in parallel across
nodes; plain pyarrow, pandas and Spark read it too (``image`` is a plain binary column).

``PoolWriter`` validates every batch (dtype, shape, label range, duplicate ids) with
errors that name the input and row, and writes into a temporary directory that is
renamed into place only when complete, so a failed conversion leaves nothing that looks
like a pool. It deletes only what rayprune wrote: its temporary directory carries a
marker and loses only the files the writer put there, and overwriting an existing pool
removes that pool's ``pool.json`` and listed files, never anything else in the directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayprune import storage
from rayprune.errors import InputError, one_line

logger = logging.getLogger(__name__)

POOL_META = "pool.json"
FORMAT_VERSION = 1
MIN_CLASSES = 2
WHY_TWO_CLASSES = "a pool needs at least 2 classes: adversarial training of a classifier on one class is meaningless"
MAX_CHANNELS = 4
MISSING = "is missing"
PARTIAL_MARKER = ".rayprune-partial"  # written first into a writer's temporary directory: "rayprune made this"
_WRITER_FILE = re.compile(r"part-\d{5,}\.parquet")
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))
SCHEMA = pa.schema(
    [("id", pa.int64()), ("image", pa.binary()), ("label", pa.int64()), ("source", pa.string())]
)


class PoolError(InputError):
    """A pool or pool input that is not valid; the message names the file and row."""


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for messages: "a regular file", "a FIFO", "a directory" ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def local_file_problem(path: str | Path) -> str | None:
    """None if the local ``path`` is a regular file (symbolic links followed), else what is
    wrong: ``MISSING`` or "is not a regular file (a FIFO)". Only ``os.stat`` is used, never
    ``open``: opening a FIFO for reading would block until someone writes to it."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return MISSING
    except (OSError, ValueError) as exc:  # permission denied, name too long, NUL in the name
        return f"cannot be examined ({one_line(getattr(exc, 'strerror', None) or exc)})"
    return None if stat.S_ISREG(mode) else f"is not a regular file ({file_kind(mode)})"


@dataclass(frozen=True)
class PoolInfo:
    """What ``pool.json`` records about a pool."""

    num_rows: int
    image_shape: tuple[int, int, int]
    num_classes: int
    sources: dict[str, int]
    files: list[str]
    format_version: int = FORMAT_VERSION
    class_names: list[str] = field(default_factory=list)

    @property
    def image_bytes(self) -> int:
        h, w, c = self.image_shape
        return h * w * c


_MISSING = object()


def _meta_error(meta: str, field_name: str, allowed: str, value: object = _MISSING) -> PoolError:
    """The error for a ``pool.json`` field: which file, which field, what is allowed, what it holds."""
    got = "it is missing" if value is _MISSING else f"got {_short_repr(value)}"
    return PoolError(f"{meta} is malformed: {field_name} must be {allowed}; {got}")


def _short_repr(value: object, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters (a field may hold a huge list)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    """A JSON integer (``True`` and ``3.0`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def image_shape_problem(shape: object) -> str | None:
    """Why ``shape`` is not a pool's image shape, or None. Allowed: [H, W, C], three positive
    integers with C (channels) in 1..MAX_CHANNELS (grey, grey+alpha, RGB, RGBA)."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(_is_int(v) and v >= 1 for v in shape):
        return "must be [H, W, C] with positive integer sizes"
    if shape[2] > MAX_CHANNELS:
        return f"must be [H, W, C] with C (channels) in 1..{MAX_CHANNELS}; {shape[2]} channels are not an image"
    return None


PLAIN_NAME_RULE = (f"plain names inside the pool (strings without '/', '\\' or NUL; not '', '.', '..' or "
                   f"{POOL_META})")


def is_plain_file_name(name: object) -> bool:
    """Whether ``name`` names a file directly inside the pool directory: no separators, not
    empty, ``.``, ``..`` or pool.json, so no listed name can point outside the pool."""
    return (isinstance(name, str) and name not in ("", ".", "..", POOL_META)
            and not any(c in name for c in ("/", "\\", "\0")))


def _int_field(meta: str, data: dict, name: str, minimum: int, why: str = "") -> int:
    """``data[name]``, which must be a JSON integer >= ``minimum``."""
    value = data.get(name, _MISSING)
    if not _is_int(value) or value < minimum:
        raise _meta_error(meta, name, f"an integer >= {minimum}{why}", value)
    return value


def _image_shape_field(meta: str, data: dict) -> tuple[int, int, int]:
    shape = data.get("image_shape", _MISSING)
    problem = image_shape_problem(shape) if shape is not _MISSING else "must be [H, W, C]"
    if problem:
        raise PoolError(f"{meta} is malformed: image_shape {problem}; "
                        f"{'it is missing' if shape is _MISSING else 'got ' + _short_repr(shape)}")
    return tuple(shape)


def _sources_field(meta: str, data: dict, num_rows: int) -> dict[str, int]:
    """Rows per source: non-negative integers adding up to ``num_rows``."""
    sources = data.get("sources", _MISSING)
    if not isinstance(sources, dict) or not all(_is_int(v) and v >= 0 for v in sources.values()):
        raise _meta_error(meta, "sources", "an object mapping each source name to its row count (an integer >= 0)",
                          sources)
    if sum(sources.values()) != num_rows:
        raise PoolError(f"{meta}: the rows per source ({sources}) must add up to num_rows ({num_rows})")
    return dict(sources)


def _files_field(meta: str, data: dict) -> list[str]:
    """The file list: at least one name, each a plain name inside the pool, each once."""
    files = data.get("files", _MISSING)
    if not isinstance(files, list) or not files:
        raise _meta_error(meta, "files", "a non-empty list of the pool's Parquet file names", files)
    seen: set[str] = set()
    for name in files:
        if not is_plain_file_name(name):
            raise PoolError(f"{meta}: file names must be {PLAIN_NAME_RULE}; got {_short_repr(name)}")
        if name in seen:
            raise PoolError(f"{meta}: lists the file {name} more than once; each file may be listed once")
        seen.add(name)
    return list(files)


def _class_names_field(meta: str, data: dict, num_classes: int) -> list[str]:
    names = data.get("class_names", [])
    strings = isinstance(names, list) and all(isinstance(n, str) for n in names)
    if not strings or len(names) not in (0, num_classes):
        raise _meta_error(meta, "class_names", f"a list of {num_classes} strings (one per class) or empty", names)
    return list(names)


def _check_meta(meta: str, data: object) -> PoolInfo:
    """Every field of a loaded ``pool.json``, checked up front; an error names the field."""
    if not isinstance(data, dict):
        raise PoolError(f"{meta} is malformed: it must hold a JSON object; got {type(data).__name__}")
    version = data.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or version != FORMAT_VERSION:
        raise PoolError(f"{meta}: format_version {_short_repr(version)} is not supported "
                        f"(this rayprune reads {FORMAT_VERSION})")
    if _is_int(data.get("num_rows")) and data["num_rows"] == 0:
        raise PoolError(f"{meta}: the pool is empty (num_rows = 0)")
    num_rows = _int_field(meta, data, "num_rows", 1)
    num_classes = _int_field(meta, data, "num_classes", MIN_CLASSES, f" ({WHY_TWO_CLASSES})")
    return PoolInfo(num_rows=num_rows, image_shape=_image_shape_field(meta, data), num_classes=num_classes,
                    sources=_sources_field(meta, data, num_rows), files=_files_field(meta, data),
                    format_version=version, class_names=_class_names_field(meta, data, num_classes))


def read_pool_info(path: str | Path) -> PoolInfo:
    """Load and check ``pool.json`` of the pool at ``path`` (a directory or a URI: ``rayprune.storage``).

    Every field is checked here, before any other part of rayprune relies on it, and an
    error names the field and what it may hold.
    """
    meta = storage.join(path, POOL_META)
    if not storage.is_uri(str(path)):
        problem = local_file_problem(meta)
        if problem and problem != MISSING:
            raise PoolError(f"{meta} {problem}; a pool's {POOL_META} is a JSON file written by rayprune-convert")
    try:
        data = json.loads(storage.read_text(meta))
    except FileNotFoundError:
        raise PoolError(f"{path} is not a pool: {POOL_META} is missing "
                        "(convert data with `rayprune-convert`)") from None
    except (OSError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PoolError(f"{meta} is unreadable: {one_line(exc)}") from None
    return _check_meta(meta, data)


def write_pool_info(path: str | Path, info: PoolInfo) -> None:
    """Write ``pool.json`` for the pool files in ``path`` (the last step of making a pool)."""
    data = asdict(info)
    data["image_shape"] = list(info.image_shape)
    (Path(path) / POOL_META).write_text(json.dumps(data, indent=2))


def pool_files(path: str | Path, info: PoolInfo | None = None) -> list[str]:
    """Locations (paths or URIs) of the pool's Parquet files, checked to exist (local ones
    to be regular files, see :func:`_check_local_files`)."""
    info = info or read_pool_info(path)
    files = [storage.join(path, name) for name in info.files]
    if not storage.is_uri(str(path)):
        _check_local_files(path, files)
        return files
    missing = [f for f, size in zip(files, storage.file_sizes(files)) if size is None] if files else []
    if missing:
        raise PoolError(f"pool {path} lists {len(missing)} missing file(s), first: {missing[0]}")
    return files


def _check_local_files(path: str | Path, files: list[str]) -> None:
    """Every listed file of the local pool at ``path`` is a regular file. A missing file and
    one that is a FIFO, directory, socket or device get different messages, and none is
    opened here (a FIFO would block the reader)."""
    problems = [(f, local_file_problem(f)) for f in files]
    missing = sum(problem == MISSING for _, problem in problems)
    for file, problem in problems:
        if problem == MISSING:
            raise PoolError(f"{file} is missing (pool {path} lists {missing} missing file(s))")
        if problem:
            raise PoolError(f"{file} {problem}; the files a pool lists must be regular Parquet files")


def decode_images(column, shape: tuple[int, int, int], *, ids=None, origin: str = "the batch") -> np.ndarray:
    """Binary image column (pyarrow or numpy of bytes) -> uint8 array (n, H, W, C).

    An image of the wrong byte length is a PoolError naming its id (when ``ids`` is
    given) or its row within ``origin``.
    """
    values = column.to_pylist() if isinstance(column, (pa.Array, pa.ChunkedArray)) else list(column)
    size = int(np.prod(shape))
    if not values:
        return np.empty((0, *shape), np.uint8)
    for i, v in enumerate(values):
        if v is None or len(v) != size:
            where = f"{origin}, id {int(np.asarray(ids)[i])}" if ids is not None else f"row {i} of {origin}"
            if v is None:
                raise PoolError(f"{where}: image is missing (null); expected {size} bytes for shape {list(shape)}")
            raise PoolError(f"{where}: image has {len(v)} bytes; "
                            f"expected {size} for shape {list(shape)} (H, W, C uint8)")
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), *shape)


def encode_images(images: np.ndarray) -> pa.Array:
    """uint8 (n, H, W, C) -> binary Arrow array, one row-major blob per image."""
    flat = np.ascontiguousarray(images).reshape(len(images), int(np.prod(images.shape[1:])))
    return pa.array([row.tobytes() for row in flat], pa.binary())


def _partial_dir(out_dir: Path) -> Path:
    """The temporary sibling a pool is written into before it is renamed to ``out_dir``."""
    return out_dir.with_name(f".{out_dir.name}.partial")


def _replaced_dir(out_dir: Path) -> Path:
    """Where the old pool waits while the new one is renamed to ``out_dir`` (overwrite)."""
    return out_dir.with_name(f".{out_dir.name}.replaced")


def _lstat_mode(path: Path) -> int | None:
    """``st_mode`` of ``path`` itself (a link is not followed); None if nothing is there."""
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return None


def replaceable_entries(out_dir: Path) -> list[str]:
    """The entries of the existing directory ``out_dir`` that replacing it removes: its
    pool.json and the files that lists ([] for an empty directory).

    Anything else makes it a PoolError naming one such entry: a directory without a valid
    pool.json, any file or folder (hidden ones too) its pool.json does not list, a listed
    name that is not a regular file, a symbolic link in place of the directory. Overwriting
    thus never deletes a file rayprune did not write.
    """
    mode = _lstat_mode(out_dir)
    if mode is None:
        return []
    if stat.S_ISLNK(mode):
        raise PoolError(f"{out_dir} is a symbolic link; "
                        "refusing to replace it (name the directory itself, or a new one)")
    if not stat.S_ISDIR(mode):
        raise PoolError(f"{out_dir} exists and is not a directory ({file_kind(mode)}); refusing to replace it")
    try:
        entries = sorted(os.listdir(out_dir))
    except OSError as exc:
        raise PoolError(f"{out_dir} cannot be listed ({one_line(exc.strerror or exc)}); "
                        "refusing to replace it") from None
    if not entries:
        return []
    if POOL_META not in entries:
        raise PoolError(f"{out_dir} exists and is not a pool (no {POOL_META}; it holds {entries[0]!r}); refusing to "
                        "replace it: overwriting replaces only a pool rayprune wrote. Choose another output directory")
    try:
        info = read_pool_info(out_dir)
    except PoolError as exc:
        raise PoolError(f"{out_dir} cannot be replaced: its {POOL_META} does not describe a pool ({exc}); move it "
                        "away or choose another output directory") from None
    listed = {POOL_META, *info.files}
    foreign = [name for name in entries if name not in listed]
    if foreign:
        raise PoolError(f"{out_dir} holds {foreign[0]!r}, which its {POOL_META} does not list ({len(foreign)} such "
                        f"entr{'y' if len(foreign) == 1 else 'ies'}); overwriting removes only a pool's own files: "
                        f"move {foreign[0]!r} out of {out_dir} or choose another output directory")
    for name in entries:
        mode = os.lstat(out_dir / name).st_mode
        if not stat.S_ISREG(mode):
            raise PoolError(f"{out_dir / name} is not a regular file ({file_kind(mode)}); rayprune writes only regular "
                            f"files, so refusing to replace {out_dir}")
    return entries


def _check_ancestor(out_dir: Path) -> None:
    """The nearest existing ancestor of ``out_dir`` must be a directory to create it under."""
    ancestor = out_dir.absolute().parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    try:
        mode = os.stat(ancestor).st_mode
    except OSError as exc:  # a dangling link, no permission
        raise PoolError(f"{ancestor} cannot be examined ({one_line(exc.strerror or exc)}); the output directory "
                        f"{out_dir} cannot be created under it") from None
    if not stat.S_ISDIR(mode):
        raise PoolError(f"{ancestor} is not a directory ({file_kind(mode)}); the output directory {out_dir} cannot "
                        "be created under it")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output directory a PoolWriter may not use, before anything is read or
    written: one without a name, an existing one without ``overwrite`` or one overwriting may
    not replace (:func:`replaceable_entries`), and temporary siblings that are not ours."""
    if out_dir.name in ("", ".", ".."):
        raise PoolError(f"the output directory {str(out_dir)!r} does not name a new directory; give a path ending in "
                        "the pool directory's name")
    _check_ancestor(out_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise PoolError(f"{out_dir} already exists; choose a new directory or pass overwrite (--overwrite) to "
                            "replace a pool there")
        replaceable_entries(out_dir)
    _stale_partial_entries(_partial_dir(out_dir))
    replaced = _replaced_dir(out_dir)
    if os.path.lexists(replaced):
        raise PoolError(f"{replaced} exists (left by an interrupted overwrite?); check what it holds and move it away "
                        "before writing a pool there")


def _writer_entry(name: str) -> bool:
    """Whether ``name`` is something a PoolWriter writes into its temporary directory."""
    return name in (PARTIAL_MARKER, POOL_META) or bool(_WRITER_FILE.fullmatch(name))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _check_writer_gone(tmp: Path) -> None:
    """Refuse to remove the marked ``tmp`` while the writer named in its marker may still run:
    on this host, a live pid; on another host (shared file system), it cannot be told."""
    try:
        owner = json.loads((tmp / PARTIAL_MARKER).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, TypeError, KeyError):
        return  # a marker cut short by a crash: its writer is gone
    here = socket.gethostname()
    if host == here and (pid == os.getpid() or not _pid_alive(pid)):
        return
    raise PoolError(f"{tmp} is being written by rayprune (pid {pid} on {host}); wait for it to finish, or remove "
                    f"{tmp} yourself if no conversion is running")


def _stale_partial_entries(tmp: Path) -> list[str] | None:
    """None if ``tmp`` does not exist; else the entries of a partial pool left by an earlier
    writer that may be removed: only a directory carrying PARTIAL_MARKER, holding nothing but
    regular files a writer writes, whose writer is gone. Anything else is a PoolError, so
    removing it can never delete what rayprune did not write."""
    try:
        mode = os.lstat(tmp).st_mode
    except FileNotFoundError:
        return None
    try:
        marker_mode = os.lstat(tmp / PARTIAL_MARKER).st_mode
    except OSError:  # no marker, or tmp is not a directory
        marker_mode = 0
    if not stat.S_ISDIR(mode) or not stat.S_ISREG(marker_mode):
        raise PoolError(f"{tmp} exists and was not made by rayprune (no {PARTIAL_MARKER} marker in it); refusing to "
                        "remove it: move it away or choose another output directory")
    _check_writer_gone(tmp)
    entries = sorted(os.listdir(tmp))
    for name in entries:
        if not _writer_entry(name) or not stat.S_ISREG(os.lstat(tmp / name).st_mode):
            raise PoolError(f"{tmp} holds {name!r}, which rayprune did not write there; refusing to remove it: "
                            "move it away or choose another output directory")
    return entries


def _remove_written(directory: Path, names: list[str]) -> None:
    """Unlink exactly ``names`` in ``directory`` (files rayprune wrote), then the directory if
    that left it empty. Anything someone else put there stays, with a warning."""
    for name in names:
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        logger.warning("left %s in place: it holds files rayprune did not write", directory)


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return those created, deepest first,
    so that a failed write can remove exactly them again."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.insert(0, d)
    except BaseException:
        _remove_empty(made)
        raise
    return made


def _remove_empty(directories: list[Path]) -> None:
    """``rmdir`` each directory (deepest first) if it is still empty."""
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            return


class PoolWriter:
    """Write validated batches as a pool, atomically; use as a context manager.

    ``origin`` names the input (a file or directory) in error messages; ``row_offset``
    style messages give the row index within that input.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        rows_per_file: int = 50_000,
        class_names: list[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        if not _is_int(num_classes) or num_classes < MIN_CLASSES:
            raise PoolError(f"num_classes must be an integer >= {MIN_CLASSES} ({WHY_TWO_CLASSES}); got {num_classes!r}")
        problem = image_shape_problem(tuple(image_shape))
        if problem:
            raise PoolError(f"image_shape {problem}; got {list(image_shape)}")
        if rows_per_file < 1:
            raise PoolError(f"rows_per_file must be >= 1; got {rows_per_file}")
        height, width, channels = image_shape
        self.image_shape: tuple[int, int, int] = (int(height), int(width), int(channels))
        self.num_classes = int(num_classes)
        self.rows_per_file = rows_per_file
        self.class_names = list(class_names or [])
        self.overwrite = overwrite
        check_output_dir(self.out_dir, overwrite)
        self._tmp = _partial_dir(self.out_dir)
        self._written: list[str] = []  # what this writer put into self._tmp, the only names it removes
        self._made_parents: list[Path] = []
        self._seen_ids: list[tuple[np.ndarray, str, int]] = []
        self._sources: dict[str, int] = {}
        self._files: list[str] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._rows = 0

    def __enter__(self) -> PoolWriter:
        stale = _stale_partial_entries(self._tmp)
        if stale is not None:
            logger.info("removing %s, an unfinished pool an earlier run left behind", self._tmp)
            _remove_written(self._tmp, stale)
        self._made_parents = _make_parents(self._tmp.parent)
        try:
            self._tmp.mkdir()  # fails if another writer took the name meanwhile: then it is not ours
        except BaseException:
            _remove_empty(self._made_parents)
            raise
        self._written = [PARTIAL_MARKER]
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "pool": self.out_dir.name}
        try:
            (self._tmp / PARTIAL_MARKER).write_text(json.dumps(marker))
        except BaseException:
            self._discard()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._finish()
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """Remove what this writer wrote (and the parent directories it made), nothing else."""
        _remove_written(self._tmp, self._written)
        _remove_empty(self._made_parents)

    def add(self, ids, images, labels, sources, *, origin: str = "input", first_row: int = 0) -> None:
        """Validate and buffer one batch; rows are numbered from ``first_row`` in ``origin``."""
        ids = np.asarray(ids)
        images = np.asarray(images)
        labels = np.asarray(labels)
        n = len(ids)
        where = f"{origin}"
        if images.dtype != np.uint8:
            raise PoolError(f"{where}: images must be uint8; got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            got = list(images.shape[1:]) if images.ndim == 4 else list(images.shape)
            raise PoolError(f"{where}: images must have shape (n, {', '.join(map(str, self.image_shape))}); got {got}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise PoolError(f"{where}: ids must be integers; got {ids.dtype}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise PoolError(f"{where}: labels must be integers; got {labels.dtype}")
        if len(images) != n or len(labels) != n or (not isinstance(sources, str) and len(sources) != n):
            raise PoolError(f"{where}: ids, images, labels and sources must have the same length")
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            raise PoolError(
                f"{where}, row {first_row + int(bad[0])}: label {int(labels[bad[0]])} is out of range "
                f"[0, {self.num_classes - 1}] ({bad.size} such row(s))"
            )
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = int(uniq[counts > 1][0])
            raise PoolError(f"{where}, row {first_row + int(np.flatnonzero(ids == dup)[1])}: duplicate id {dup}")
        self._seen_ids.append((ids.astype(np.int64), origin, first_row))
        src = np.full(n, sources, dtype=object) if isinstance(sources, str) else np.asarray(sources, dtype=object)
        for name, count in zip(*np.unique(src.astype(str), return_counts=True)):
            self._sources[str(name)] = self._sources.get(str(name), 0) + int(count)
        table = pa.table(
            {"id": pa.array(ids, pa.int64()), "image": encode_images(images),
             "label": pa.array(labels, pa.int64()), "source": pa.array(src.tolist(), pa.string())},
            schema=SCHEMA,
        )
        self._pending.append(table)
        self._pending_rows += n
        while self._pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        head, rest = table.slice(0, rows), table.slice(rows)
        name = f"part-{len(self._files):05d}.parquet"
        meta = {b"rayprune.image_shape": json.dumps(list(self.image_shape)).encode()}
        self._written.append(name)
        pq.write_table(head.replace_schema_metadata(meta), self._tmp / name)
        self._files.append(name)
        self._rows += head.num_rows
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _swap_in(self) -> None:
        """Rename the finished pool to ``out_dir``. An old pool there (overwrite) is checked
        again, set aside, replaced, and only then are its pool.json and listed files
        removed: a failure up to the swap leaves the old pool as it was."""
        if not os.path.lexists(self.out_dir):
            os.rename(self._tmp, self.out_dir)
            return
        if not self.overwrite:
            raise PoolError(f"{self.out_dir} appeared while the pool was being written; it was left as it is")
        old_entries = replaceable_entries(self.out_dir)
        replaced = _replaced_dir(self.out_dir)
        if os.path.lexists(replaced):
            raise PoolError(f"{replaced} exists; move it away and convert again")
        os.rename(self.out_dir, replaced)
        try:
            os.rename(self._tmp, self.out_dir)
        except BaseException:
            os.rename(replaced, self.out_dir)
            raise
        _remove_written(replaced, old_entries)

    def _check_ids_unique_across_batches(self) -> None:
        """One sort over all ids at the end (O(N log N)); names the second occurrence."""
        all_ids = np.concatenate([ids for ids, _, _ in self._seen_ids])
        order = np.argsort(all_ids, kind="stable")
        repeated = np.flatnonzero(all_ids[order][1:] == all_ids[order][:-1])
        if repeated.size == 0:
            return
        position = int(order[repeated[0] + 1])
        for ids, origin, first_row in self._seen_ids:
            if position < len(ids):
                raise PoolError(f"{origin}, row {first_row + position}: "
                                f"duplicate id {int(ids[position])} (already in the pool)")
            position -= len(ids)

    def _finish(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._rows == 0:
            raise PoolError(f"no rows were written to {self.out_dir}: the input is empty")
        self._check_ids_unique_across_batches()
        info = PoolInfo(
            num_rows=self._rows, image_shape=self.image_shape, num_classes=self.num_classes,
            sources=self._sources, files=self._files, class_names=self.class_names,
        )
        self._written.append(POOL_META)
        write_pool_info(self._tmp, info)
        (self._tmp / PARTIAL_MARKER).unlink()  # the finished pool holds only pool.json and its files
        self._swap_in()
        logger.info("wrote pool %s: %d rows in %d file(s), sources %s",
                    self.out_dir, self._rows, len(self._files), self._sources)


def write_demo_pool(spec, out_dir: str | Path, *, rows_per_file: int = 50_000, overwrite: bool = False,
                    first_rows: int | None = None) -> PoolInfo:
    """Generate the demo pool block by block straight into the pool format; with
    ``first_rows``, only that many of its first rows (the same rows and ids as the whole
    pool's: pools of several sizes that share their rows)."""
    from rayprune.data.demo_pool import BLOCK_ROWS, generate_rows

    n_rows = spec.n_rows if first_rows is None else first_rows
    if not 1 <= n_rows <= spec.n_rows:
        raise ValueError(f"first_rows must be in [1, {spec.n_rows}] (the pool's rows); got {first_rows}")
    shape = (spec.image_size, spec.image_size, 3)
    with PoolWriter(out_dir, image_shape=shape, num_classes=spec.num_classes,
                    rows_per_file=rows_per_file, overwrite=overwrite) as writer:
        step = BLOCK_ROWS * 8
        for start in range(0, n_rows, step):
            rows = generate_rows(spec, start, min(step, n_rows - start))
            writer.add(rows.ids, rows.images, rows.labels, rows.sources, origin="demo pool", first_row=start)
    return read_pool_info(out_dir)
