"""Converters: common image-dataset layouts -> a rayprune pool (see ``pool.py``).

Three layouts are read, from disk only (nothing is ever downloaded):

* ``cifar10``: the CIFAR-10 "python version" directory ``cifar-10-batches-py``
  (``data_batch_1..5`` / ``test_batch`` pickles) or the "binary version" directory
  ``cifar-10-batches-bin`` (``data_batch_1.bin..5`` / ``test_batch.bin``: records of one
  label byte and 3072 pixel bytes). Pixels are stored channel-planar (CHW) and become
  HWC. The pickles are loaded with a restricted unpickler that can only rebuild numpy
  arrays; any other global (``os.system``, ``builtins.eval`` ...) is refused before it
  runs.
* ``npz``: ``.npz`` files holding ``image`` (N, H, W, C) uint8 and ``label`` (N,) integer
  arrays (the layout of the public 1M-50M generated CIFAR-10 sets). The ``.npy`` members
  are streamed row chunk by row chunk straight out of the zip (stored or deflated), so a
  file of tens of GB never sits in memory; object arrays (which need pickle) are refused.
* ``folder``: one subfolder per class (class index = position in the sorted subfolder
  names, as torchvision's ``ImageFolder``), images of one size read with Pillow as RGB.

Every reader yields validated :class:`Batch` es. :func:`convert` first checks what is
cheap to check (CIFAR-10 files present, .npz headers and every label, every folder image
header and size, one image shape across inputs), then streams the inputs through a
``PoolWriter`` with ids ``0..N-1`` in input order. Every problem is a one-line ``PoolError`` naming the
file (and the row within it where there is one); a failed conversion leaves the output
directory as it was. Inputs are checked with ``os.stat`` before they are opened, so a
FIFO where a file belongs is named instead of blocking the converter.
"""

from __future__ import annotations

import codecs
import logging
import os
import pickle
import stat
import sys
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rayprune.data.pool import (
    MIN_CLASSES,
    MISSING,
    WHY_TWO_CLASSES,
    PoolError,
    PoolInfo,
    PoolWriter,
    check_output_dir,
    file_kind,
    image_shape_problem,
    local_file_problem,
    read_pool_info,
)

logger = logging.getLogger(__name__)

KINDS = ("cifar10", "npz", "folder")
DEFAULT_SOURCES = {"cifar10": "real", "npz": "synthetic", "folder": "real"}
SPLITS = ("train", "test")
EXPECTED_INPUT = {
    "cifar10": "a CIFAR-10 directory (cifar-10-batches-py or cifar-10-batches-bin, or their parent)",
    "npz": "an .npz file",
    "folder": "an image folder with one subfolder per class",
}

CIFAR10_SHAPE = (32, 32, 3)
CIFAR10_CLASSES = 10
CIFAR10_RECORD = 1 + 32 * 32 * 3  # binary version: label byte + CHW pixels
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_DIRS = ("cifar-10-batches-py", "cifar-10-batches-bin")

NPZ_CHUNK_ROWS = 8192  # rows read per step from an .npz member (module-level so tests can shrink it)
FOLDER_BATCH_ROWS = 1024
LOG_EVERY_ROWS = 1_000_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """One input of a conversion.

    ``kind`` is ``cifar10``, ``npz`` or ``folder``; ``source`` defaults to ``real`` for
    cifar10 and folder, ``synthetic`` for npz; ``split`` (``train``/``test``) applies to
    cifar10 only. ``num_classes`` optionally declares the number of classes of this input
    (every label must be below it); otherwise it is 10 for CIFAR-10, the number of
    subfolders for a folder and max label + 1 for an npz file.
    """

    kind: str
    path: Path
    source: str | None = None
    split: str = "train"
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PoolError(f"unknown input kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if isinstance(self.path, str) and not self.path:  # Path("") would mean the current directory
            raise PoolError(f"the path of the {self.kind} input is empty; give {EXPECTED_INPUT[self.kind]}")
        object.__setattr__(self, "path", Path(self.path))
        if self.split not in SPLITS:
            raise PoolError(f"unknown split {self.split!r} for {self.path}; allowed: {', '.join(SPLITS)}")
        if self.source is not None and (not isinstance(self.source, str) or not self.source.strip()):
            raise PoolError(f"source name for {self.path} must be a non-empty string; got {self.source!r}")
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
            or self.num_classes < MIN_CLASSES
        ):
            raise PoolError(f"num_classes for {self.path} must be an integer >= {MIN_CLASSES} ({WHY_TWO_CLASSES}); "
                            f"got {self.num_classes!r}")

    @property
    def source_name(self) -> str:
        return self.source if self.source is not None else DEFAULT_SOURCES[self.kind]

    def describe(self) -> str:
        return f"{self.kind} input {self.path}"


@dataclass(frozen=True)
class Batch:
    """Rows ``first_row ..`` of the file or directory ``origin``, validated."""

    images: np.ndarray  # uint8 (n, H, W, C)
    labels: np.ndarray  # int64 (n,)
    origin: str
    first_row: int


@dataclass(frozen=True)
class InputInfo:
    """What the checking pass learned about an input, before any row is written."""

    spec: InputSpec
    image_shape: tuple[int, int, int]
    num_classes: int
    num_rows: int | None  # None where only reading tells (CIFAR-10 pickles)
    class_names: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException | str) -> str:
    text = str(exc) if isinstance(exc, str) else (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return " ".join(text.split())


def _check_labels(labels: np.ndarray, num_classes: int | None, origin, first_row: int) -> None:
    """Negative labels, and labels >= ``num_classes`` when it is known, name their row."""
    negative = np.flatnonzero(labels < 0)
    if negative.size:
        i = int(negative[0])
        raise PoolError(f"{origin}, row {first_row + i}: label {int(labels[i])} is negative "
                        f"({negative.size} such row(s) here)")
    if num_classes is not None:
        high = np.flatnonzero(labels >= num_classes)
        if high.size:
            i = int(high[0])
            raise PoolError(
                f"{origin}, row {first_row + i}: label {int(labels[i])} is out of range [0, {num_classes - 1}] "
                f"({high.size} such row(s) here)"
            )


def _shape_str(shape) -> str:
    return "x".join(str(int(v)) for v in shape)


def _dir_problem(path: Path) -> str | None:
    """None if ``path`` is a directory (links followed), else what it is instead."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "it does not exist"
    except OSError as exc:
        return f"it cannot be examined: {exc.strerror or exc}"
    return None if stat.S_ISDIR(mode) else f"it is {file_kind(mode)}"


def _check_regular(path: Path, expected: str) -> None:
    """``path`` must be a regular file; checked with ``os.stat`` so that a FIFO is never
    opened (reading one blocks) and a directory or device gets its own message."""
    problem = local_file_problem(path)
    if problem == MISSING:
        raise PoolError(f"{path}: no such file (expected {expected})")
    if problem:
        raise PoolError(f"{path} {problem}; expected {expected}")


# ----------------------------------------------------------------------------- CIFAR-10


def _numpy_global(name: str, modules: tuple[str, ...]):
    import importlib

    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy provides none of {', '.join(m + '.' + name for m in modules)}")


def _allowed_globals() -> dict[tuple[str, str], object]:
    # numpy >= 2 lives in numpy._core; numpy 1.x in numpy.core. The real CIFAR-10 files
    # (Python 2, numpy 1.x) name numpy.core.multiarray; numpy 2 writes numpy._core.
    reconstruct = _numpy_global("_reconstruct", ("numpy._core.multiarray", "numpy.core.multiarray"))
    frombuffer = _numpy_global("_frombuffer", ("numpy._core.numeric", "numpy.core.numeric"))
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        # protocol-5 pickles written by numpy: frombuffer(buffer, dtype, shape, order)
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): _latin1_encode,
    }


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as bytes pickles use it, and nothing else (no other codecs)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed for str with latin1; got {encoding!r}")
    return codecs.encode(text, "latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays (and plain containers, bytes, numbers)."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise PoolError(
                f"{self._path}: refusing to unpickle {module}.{name}: a CIFAR-10 batch may only contain numpy "
                "arrays, lists, bytes and numbers (the file is not a genuine CIFAR-10 batch)"
            ) from None

    def persistent_load(self, pid):
        raise PoolError(f"{self._path}: refusing to unpickle a persistent reference (not a genuine CIFAR-10 batch)")


def _load_pickle(path: Path):
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, path).load()
    except PoolError:
        raise
    except OSError as exc:
        raise PoolError(f"{path}: unreadable: {_one_line(exc)}") from None
    except Exception as exc:  # untrusted bytes: any unpickling failure is a corrupt file
        raise PoolError(f"{path}: corrupt or truncated pickle ({_one_line(exc)})") from None


def _entry(batch, key: str, path: Path):
    if not isinstance(batch, dict):
        raise PoolError(f"{path}: expected a pickled dict (a CIFAR-10 batch); got {type(batch).__name__}")
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    found = ", ".join(sorted(repr(k) for k in batch))[:200]
    raise PoolError(f"{path}: missing {key!r} entry (found keys: {found})")


def _find_cifar10(path: Path, split: str) -> tuple[str, list[Path]]:
    """("py" | "bin", batch files of ``split``) for a CIFAR-10 directory or its parent."""
    if split not in SPLITS:
        raise PoolError(f"unknown CIFAR-10 split {split!r}; allowed: {', '.join(SPLITS)}")
    problem = _dir_problem(path)
    if problem:
        raise PoolError(f"{path}: not a directory ({problem}; expected cifar-10-batches-py or cifar-10-batches-bin, "
                        "or their parent)")
    names = CIFAR10_BATCHES[split]
    for directory in [path, *(path / d for d in CIFAR10_DIRS)]:
        for fmt, suffix in (("py", ""), ("bin", ".bin")):
            files = [directory / (n + suffix) for n in names]
            problems = [local_file_problem(f) for f in files]
            for file, problem in zip(files, problems):
                if problem not in (None, MISSING):
                    raise PoolError(f"{file} {problem}; a CIFAR-10 batch is a regular file")
            if MISSING not in problems:
                return fmt, files
            if any(problem is None for problem in problems):
                missing = ", ".join(f.name for f, problem in zip(files, problems) if problem == MISSING)
                raise PoolError(f"{directory}: incomplete CIFAR-10 {split} split: missing {missing}")
    expected = ", ".join(names)
    raise PoolError(
        f"{path}: no CIFAR-10 {split} batches found (expected {expected} from cifar-10-batches-py, or the same "
        "names with .bin from cifar-10-batches-bin; rayprune never downloads: fetch CIFAR-10 yourself)"
    )


def cifar10_class_names(path: str | Path, split: str = "train") -> list[str]:
    """Class names from ``batches.meta`` (python) or ``batches.meta.txt`` (binary) next to the
    ``split``'s batches; [] if absent. Only that split's batches need to exist: a train
    directory without ``test_batch`` (or a test directory without the data batches) is fine."""
    fmt, files = _find_cifar10(Path(path), split)
    return _class_names_in(files[0].parent, fmt)


def _class_names_in(directory: Path, fmt: str) -> list[str]:
    """The class names stored in the CIFAR-10 ``directory`` of format ``fmt``; [] if absent."""
    meta = directory / ("batches.meta" if fmt == "py" else "batches.meta.txt")
    problem = local_file_problem(meta)
    if problem == MISSING:
        return []
    if problem:
        raise PoolError(f"{meta} {problem}; it should hold the CIFAR-10 class names (or be absent)")
    if fmt == "py":
        names = _entry(_load_pickle(meta), "label_names", meta)
        if not isinstance(names, list):
            raise PoolError(f"{meta}: label_names must be a list; got {type(names).__name__}")
        return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]
    try:
        return [line.strip() for line in meta.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        raise PoolError(f"{meta}: unreadable: {_one_line(exc)}") from None


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
    """(n, 3072) channel-planar rows -> (n, 32, 32, 3)."""
    h, w, c = CIFAR10_SHAPE
    return np.ascontiguousarray(flat.reshape(len(flat), c, h, w).transpose(0, 2, 3, 1))


def _read_cifar10_pickle(path: Path) -> Batch:
    batch = _load_pickle(path)
    data = _entry(batch, "data", path)
    labels = _entry(batch, "labels", path)
    if not isinstance(data, np.ndarray):
        raise PoolError(f"{path}: 'data' must be a numpy array; got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise PoolError(f"{path}: 'data' must be uint8; got {data.dtype}")
    if data.ndim != 2 or data.shape[1] != CIFAR10_RECORD - 1:
        raise PoolError(f"{path}: 'data' must have shape (n, 3072); got {list(data.shape)}")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise PoolError(f"{path}: 'labels' is not a list of integers ({_one_line(exc)})") from None
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise PoolError(f"{path}: 'labels' must be a flat list of integers; "
                        f"got {labels.dtype} with shape {list(labels.shape)}")
    if len(labels) != len(data):
        raise PoolError(f"{path}: {len(labels)} labels for {len(data)} images")
    labels = labels.astype(np.int64)
    _check_labels(labels, CIFAR10_CLASSES, path, 0)
    return Batch(_chw_to_hwc(data), labels, str(path), 0)


def _read_cifar10_bin(path: Path) -> Batch:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PoolError(f"{path}: unreadable: {_one_line(exc)}") from None
    whole, rest = divmod(len(raw), CIFAR10_RECORD)
    if rest:
        raise PoolError(
            f"{path}, row {whole}: truncated record ({rest} of {CIFAR10_RECORD} bytes; the file's {len(raw)} bytes "
            f"are not a whole number of {CIFAR10_RECORD}-byte records)"
        )
    records = np.frombuffer(raw, np.uint8).reshape(whole, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    _check_labels(labels, CIFAR10_CLASSES, path, 0)
    return Batch(_chw_to_hwc(records[:, 1:]), labels, str(path), 0)


def read_cifar10(path: str | Path, split: str = "train") -> Iterator[Batch]:
    """Batches of the CIFAR-10 ``split``, one per batch file, pixels as HWC.

    ``path`` is ``cifar-10-batches-py``, ``cifar-10-batches-bin`` or a directory holding
    one of them (e.g. a torchvision root). Nothing is downloaded.
    """
    fmt, files = _find_cifar10(Path(path), split)
    for file in files:
        logger.info("reading %s", file)
        batch = _read_cifar10_pickle(file) if fmt == "py" else _read_cifar10_bin(file)
        if len(batch.labels) == 0:
            raise PoolError(f"{file}: the batch is empty")
        yield batch


# ----------------------------------------------------------------------------- npz


class _NpyMember:
    """A ``.npy`` member of an open zip: header checked, rows read in chunks."""

    def __init__(self, file, name: str, path: Path) -> None:
        self.name, self.path, self.file = name, path, file
        self.where = f"{path} ({name})"
        version = np.lib.format.read_magic(self.file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self.file)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self.file)
        else:
            raise PoolError(f"{self.where}: unsupported .npy format version {version}")
        if dtype.hasobject:
            raise PoolError(f"{self.where}: object arrays are not accepted (they need pickle); got dtype {dtype}")
        if fortran and len(shape) > 1:
            raise PoolError(f"{self.where}: Fortran-order arrays cannot be streamed by rows; save it in C order")
        self.shape, self.dtype = tuple(int(v) for v in shape), dtype
        self.rows = self.shape[0] if self.shape else 0
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize if self.shape else 0

    def read(self, start: int, count: int) -> np.ndarray:
        want = count * self.row_bytes
        parts, got = [], 0
        while got < want:
            part = self.file.read(want - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = b"".join(parts)
        if got < want:
            raise PoolError(
                f"{self.where}, row {start + got // max(self.row_bytes, 1)}: truncated: the header promises "
                f"{self.rows} rows but the data ends after {(start * self.row_bytes + got)} bytes"
            )
        return np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])

    def check_end(self) -> None:
        """No bytes beyond the header's promise (reading to the end also checks the zip CRC)."""
        if self.file.read(1):
            raise PoolError(f"{self.where}: more data than the header's shape {list(self.shape)} accounts for")


class _NpzReader:
    """The checked ``image`` and ``label`` members of an open ``.npz``."""

    def __init__(self, zf: zipfile.ZipFile, path: Path, stack: ExitStack) -> None:
        members = set(zf.namelist())
        for key in ("image", "label"):
            if f"{key}.npy" not in members:
                found = ", ".join(sorted(m.removesuffix(".npy") for m in members)) or "nothing"
                raise PoolError(f"{path}: missing {key!r} array (the file holds: {found}); "
                                "expected 'image' and 'label'")
        self.image = _NpyMember(stack.enter_context(zf.open("image.npy")), "image.npy", path)
        self.label = _NpyMember(stack.enter_context(zf.open("label.npy")), "label.npy", path)
        img, lab = self.image, self.label
        if img.dtype != np.uint8:
            raise PoolError(f"{img.where}: images must be uint8; got {img.dtype}")
        if len(img.shape) != 4 or min(img.shape[1:]) < 1:
            raise PoolError(f"{img.where}: images must have shape (N, H, W, C); "
                            f"got {list(img.shape)} ({len(img.shape)} dims)")
        if not np.issubdtype(lab.dtype, np.integer):
            raise PoolError(f"{lab.where}: labels must be integers; got {lab.dtype}")
        if len(lab.shape) != 1:
            raise PoolError(f"{lab.where}: labels must have shape (N,); got {list(lab.shape)}")
        if lab.rows != img.rows:
            raise PoolError(f"{path}: {lab.rows} labels for {img.rows} images")
        if img.rows == 0:
            raise PoolError(f"{path}: the input is empty (0 rows)")


@contextmanager
def _npz_errors(path: Path):
    """Turn zip/zlib/npy-header/IO failures into PoolErrors naming ``path``."""
    try:
        yield
    except PoolError:
        raise
    except FileNotFoundError:
        raise PoolError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise PoolError(f"{path}: corrupt or truncated .npz ({_one_line(exc)})") from None
    except (NotImplementedError, RuntimeError) as exc:  # unsupported compression, encryption
        raise PoolError(f"{path}: unsupported .npz member ({_one_line(exc)})") from None
    except ValueError as exc:  # np.lib.format: bad magic or header
        raise PoolError(f"{path}: invalid .npy data ({_one_line(exc)})") from None
    except OSError as exc:
        raise PoolError(f"{path}: unreadable: {_one_line(exc)}") from None


def scan_npz(path: str | Path, num_classes: int | None = None) -> tuple[tuple[int, int, int], int, int]:
    """Check headers and every label of an .npz without reading its images.

    Returns ``(image_shape, num_rows, max_label + 1)``; labels must be >= 0 and, if
    ``num_classes`` is given, below it.
    """
    path = Path(path)
    _check_regular(path, EXPECTED_INPUT["npz"])
    with _npz_errors(path):
        with ExitStack() as stack:
            reader = _NpzReader(stack.enter_context(zipfile.ZipFile(path)), path, stack)
            top = -1
            for start in range(0, reader.label.rows, NPZ_CHUNK_ROWS):
                labels = reader.label.read(start, min(NPZ_CHUNK_ROWS, reader.label.rows - start)).astype(np.int64)
                _check_labels(labels, num_classes, path, start)
                top = max(top, int(labels.max()))
            reader.label.check_end()
            height, width, channels = reader.image.shape[1:]  # _NpzReader checked: 4 dims
            return (height, width, channels), reader.image.rows, top + 1


def read_npz(path: str | Path, *, num_classes: int | None = None) -> Iterator[Batch]:
    """Stream an .npz of ``image`` (N, H, W, C) uint8 and ``label`` (N,) integers.

    Rows come in chunks of ``NPZ_CHUNK_ROWS`` read from the zip members (stored or
    deflated); the arrays are never loaded whole and pickle is never used.
    """
    path = Path(path)
    _check_regular(path, EXPECTED_INPUT["npz"])
    logger.info("reading %s", path)
    with _npz_errors(path):
        with ExitStack() as stack:
            reader = _NpzReader(stack.enter_context(zipfile.ZipFile(path)), path, stack)
            for start in range(0, reader.image.rows, NPZ_CHUNK_ROWS):
                count = min(NPZ_CHUNK_ROWS, reader.image.rows - start)
                images = reader.image.read(start, count)
                labels = reader.label.read(start, count).astype(np.int64)
                _check_labels(labels, num_classes, path, start)
                yield Batch(images, labels, str(path), start)
            reader.image.check_end()
            reader.label.check_end()


# ----------------------------------------------------------------------------- image folder


def _folder_listing(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    problem = _dir_problem(root)
    if problem:
        raise PoolError(f"{root}: not a directory ({problem}; expected one subfolder of images per class)")
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise PoolError(f"{root}: unreadable: {_one_line(exc)}") from None
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    stray = [e.name for e in entries if e.is_file() and not e.name.startswith(".")]
    if stray:
        logger.warning("%s: ignoring %d file(s) outside the class subfolders, e.g. %s", root, len(stray), stray[0])
    if all(c.isdigit() for c in classes) and classes != sorted(classes, key=int):
        logger.warning("%s: class folders are numbers but are indexed in string order (%s)", root, ", ".join(classes))
    files: list[tuple[Path, int]] = []
    skipped = 0
    for label, name in enumerate(classes):
        count = 0
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                if Path(filename).suffix.lower() in IMAGE_EXTENSIONS:
                    _check_regular(Path(dirpath) / filename, "a regular image file")
                    files.append((Path(dirpath) / filename, label))
                    count += 1
                else:
                    skipped += 1
        if count == 0:
            logger.warning("%s: class %d (%s) has no images", root, label, name)
    if skipped:
        logger.info("%s: skipped %d file(s) without an image extension", root, skipped)
    if not files:
        raise PoolError(
            f"{root}: no images found (expected one subfolder per class holding {', '.join(IMAGE_EXTENSIONS)} files)"
        )
    return classes, files


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # PIL raises many types for bad files
        raise PoolError(f"{path}: unreadable image ({_one_line(exc)})") from None


def _mixed_sizes(path: Path, size, first: Path, first_size) -> PoolError:
    return PoolError(
        f"{path}: mixed image sizes: this image is {size[1]}x{size[0]} (HxW) but {first} is "
        f"{first_size[1]}x{first_size[0]}; all images of a pool must have one size"
    )


def scan_folder(path: str | Path) -> tuple[tuple[int, int, int], int, list[str]]:
    """List a class-folder dataset and check every image header: ``(shape, rows, class names)``."""
    root = Path(path)
    classes, files = _folder_listing(root)
    first = files[0][0]
    first_size = _image_size(first)
    for file, _ in files[1:]:
        size = _image_size(file)
        if size != first_size:
            raise _mixed_sizes(file, size, first, first_size)
    return (first_size[1], first_size[0], 3), len(files), classes


def read_folder(path: str | Path) -> Iterator[Batch]:
    """Batches of a class-folder dataset (RGB, all one size), rows in sorted file order.

    A batch's ``origin`` is the folder and ``first_row`` the index of its first image
    in the sorted listing; errors about one image name that image's file.
    """
    from PIL import Image

    root = Path(path)
    logger.info("reading %s", root)
    classes, files = _folder_listing(root)
    first, first_size = files[0][0], None
    for start in range(0, len(files), FOLDER_BATCH_ROWS):
        chunk = files[start : start + FOLDER_BATCH_ROWS]
        images = None
        for i, (file, _) in enumerate(chunk):
            try:
                with Image.open(file) as im:
                    size = im.size
                    if first_size is None:
                        first_size = size
                    if size != first_size:
                        raise _mixed_sizes(file, size, first, first_size)
                    pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except PoolError:
                raise
            except Exception as exc:  # truncated or corrupt image data
                raise PoolError(f"{file}: unreadable image ({_one_line(exc)})") from None
            if images is None:
                images = np.empty((len(chunk), *pixels.shape), np.uint8)
            images[i] = pixels
        assert images is not None  # a chunk is never empty
        labels = np.array([label for _, label in chunk], np.int64)
        yield Batch(images, labels, str(root), start)


# ----------------------------------------------------------------------------- convert


def inspect_input(spec: InputSpec) -> InputInfo:
    """Check an input without writing anything: shape, classes, rows (cheap passes only)."""
    declared = spec.num_classes
    if spec.kind == "cifar10":
        names = cifar10_class_names(spec.path, spec.split)
        if names and len(names) != CIFAR10_CLASSES:
            raise PoolError(f"{spec.describe()}: batches.meta lists {len(names)} class names; CIFAR-10 has 10")
        shape, rows, observed = CIFAR10_SHAPE, None, CIFAR10_CLASSES
    elif spec.kind == "npz":
        shape, rows, observed = scan_npz(spec.path, declared)
        names = []
    else:
        shape, rows, names = scan_folder(spec.path)
        observed = len(names)
    if declared is not None and declared < observed:
        raise PoolError(f"{spec.describe()}: has {observed} classes but num_classes is {declared}")
    return InputInfo(spec, shape, declared or observed, rows, list(names))


def read_input(spec: InputSpec) -> Iterator[Batch]:
    """The batches of one input."""
    if spec.kind == "cifar10":
        return read_cifar10(spec.path, spec.split)
    if spec.kind == "npz":
        return read_npz(spec.path, num_classes=spec.num_classes)
    return read_folder(spec.path)


def _resolved(path: Path, what: str) -> Path:
    """``path`` with symbolic links and ``..`` resolved, to compare locations."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise PoolError(f"{what} {path} cannot be resolved ({_one_line(exc)})") from None


def _check_out_dir(out_dir: Path, inputs: list[InputSpec], overwrite: bool) -> None:
    """Before any input is read: the output directory is none of the inputs, lies inside
    none of them (writing would change an input) and holds none of them (overwriting would
    replace it), all after resolving links; and the writer may use it (``check_output_dir``)."""
    out = _resolved(out_dir, "the output directory")
    for spec in inputs:
        src = _resolved(spec.path, f"the {spec.kind} input")
        if src == out:
            raise PoolError(f"the output directory {out_dir} is the {spec.describe()}; choose another output directory")
        if out in src.parents:
            raise PoolError(f"{spec.describe()} lies inside the output directory {out_dir}; choose another output")
        if src in out.parents:
            raise PoolError(f"the output directory {out_dir} lies inside the {spec.describe()}; writing there would "
                            "change an input: choose an output directory outside it")
    check_output_dir(out_dir, overwrite)


def _check_pool_shape_and_classes(infos: list[InputInfo], num_classes: int) -> None:
    """Refuse, before anything is written, a pool rayprune could not read back: images with
    more channels than a pool allows, or fewer than 2 classes."""
    problem = image_shape_problem(infos[0].image_shape)
    if problem:
        raise PoolError(f"{infos[0].spec.describe()}: images are {_shape_str(infos[0].image_shape)} (HxWxC); "
                        f"a pool's image shape {problem}")
    if num_classes < MIN_CLASSES:
        what = "; ".join(f"{info.spec.describe()} has {info.num_classes} class"
                         + (f" ({', '.join(info.class_names)})" if info.class_names else "") for info in infos)
        raise PoolError(f"the pool would have {num_classes} class ({what}); {WHY_TWO_CLASSES}. Give data with "
                        f"more classes, or declare num_classes (--num-classes N, N >= {MIN_CLASSES}) if the "
                        "data has classes its labels do not show")


def _merge_class_names(infos: list[InputInfo], num_classes: int) -> list[str]:
    names: list[str] = []
    for info in infos:
        if not info.class_names:
            continue
        if not names:
            names = list(info.class_names)
        elif names[: len(info.class_names)] != info.class_names[: len(names)]:
            logger.warning("%s: class names %s differ from the first input's %s; keeping the first",
                           info.spec.describe(), info.class_names, names)
    return names if len(names) == num_classes else []


def convert(
    inputs: Iterable[InputSpec], out_dir: str | Path, *, rows_per_file: int = 50_000, overwrite: bool = False
) -> PoolInfo:
    """Convert ``inputs`` (in order) into one pool at ``out_dir``; ids are 0..N-1 in order.

    All inputs are checked first (shapes must agree; labels, headers and image sizes are
    validated); ``num_classes`` of the pool is the largest over the inputs (at least 2). If
    anything fails, ``out_dir`` is left as it was: absent, or the old pool when
    ``overwrite`` replaces one (see ``pool.replaceable_entries``).
    """
    from tqdm.auto import tqdm

    inputs = list(inputs)
    if not inputs:
        raise PoolError("no inputs given: pass at least one cifar10, npz or folder input")
    for spec in inputs:
        if not isinstance(spec, InputSpec):
            raise PoolError(f"inputs must be InputSpec objects; got {type(spec).__name__}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, inputs, overwrite)
    infos: list[InputInfo] = []
    for spec in inputs:
        info = inspect_input(spec)
        if infos and info.image_shape != infos[0].image_shape:
            raise PoolError(
                f"{spec.describe()}: images are {_shape_str(info.image_shape)} (HxWxC) but "
                f"{infos[0].spec.describe()} has {_shape_str(infos[0].image_shape)}; a pool has one image shape"
            )
        infos.append(info)
    shape = infos[0].image_shape
    num_classes = max(info.num_classes for info in infos)
    _check_pool_shape_and_classes(infos, num_classes)
    class_names = _merge_class_names(infos, num_classes)
    known_rows = [info.num_rows for info in infos if info.num_rows is not None]
    total = sum(known_rows) if len(known_rows) == len(infos) else None
    logger.info("converting %d input(s) into %s: images %s, %d classes",
                len(infos), out_dir, _shape_str(shape), num_classes)

    next_id = 0
    with PoolWriter(out_dir, image_shape=shape, num_classes=num_classes, rows_per_file=rows_per_file,
                    class_names=class_names, overwrite=overwrite) as writer:
        with tqdm(total=total, unit="img", desc="converting", disable=not sys.stderr.isatty()) as bar:
            for info in infos:
                spec, source, start_id = info.spec, info.spec.source_name, next_id
                last_log = 0
                for batch in read_input(spec):
                    n = len(batch.labels)
                    ids = np.arange(next_id, next_id + n, dtype=np.int64)
                    writer.add(ids, batch.images, batch.labels, source, origin=batch.origin, first_row=batch.first_row)
                    next_id += n
                    bar.update(n)
                    if next_id - start_id - last_log >= LOG_EVERY_ROWS:
                        last_log = next_id - start_id
                        logger.info("%s: %d rows so far", spec.describe(), last_log)
                if next_id == start_id:
                    raise PoolError(f"{spec.describe()}: the input is empty (0 rows)")
                logger.info("%s: %d rows (source %r, ids %d..%d)", spec.describe(), next_id - start_id, source,
                            start_id, next_id - 1)
    return read_pool_info(out_dir)
