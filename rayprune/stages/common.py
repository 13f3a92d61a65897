"""What every stage shares: its directory, input digest, and commit marker.

A stage writes under ``<output_dir>/<stage>/``. ``_STARTED.json`` records the digest of
the inputs the stage is working from; ``_COMMITTED.json`` is written last, atomically,
when every output is complete. A rerun skips a stage whose committed digest matches,
resumes a stage started with the same digest (e.g. training from its checkpoints), and
wipes a stage whose inputs changed. Outputs that look complete therefore are complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayprune.errors import InputError

logger = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")
STARTED = "_STARTED.json"
COMMITTED = "_COMMITTED.json"


def digest(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (configs, upstream digests, file facts)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


@dataclass
class Stage:
    """One stage's directory and bookkeeping."""

    name: str
    root: Path
    input_digest: str
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def dir(self) -> Path:
        return output_path(self.root, self.name)

    def committed(self) -> dict | None:
        """The commit record if this stage finished with the same inputs, else None."""
        marker = self.dir / COMMITTED
        try:
            record = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return record if record.get("input_digest") == self.input_digest else None

    def begin(self) -> None:
        """Prepare the directory: keep a same-digest partial run, wipe anything else."""
        started = self.dir / STARTED
        try:
            same = json.loads(started.read_text()).get("input_digest") == self.input_digest
        except (OSError, json.JSONDecodeError):
            same = False
        if self.dir.exists() and not same:
            logger.info("stage %s: inputs changed or no record; starting afresh", self.name)
            shutil.rmtree(self.dir)
        (self.dir / COMMITTED).unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(started, {"input_digest": self.input_digest})
        self.started_at = time.perf_counter()

    def commit(self, outputs: dict[str, Any]) -> dict:
        """Mark the stage complete; ``outputs`` (counts, digests, paths) go in the record."""
        record = {
            "stage": self.name,
            "input_digest": self.input_digest,
            "output_digest": digest(self.input_digest, outputs),
            "seconds": round(time.perf_counter() - self.started_at, 3),
            "outputs": outputs,
        }
        write_json_atomic(self.dir / COMMITTED, record)
        return record


def safe_name(name: str, what: str = "name") -> str:
    """``name`` if it is safe as one path component (no separators, no leading dot, no ``..``)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise InputError(f"{what} {name!r} cannot be used as a file name under the output directory: "
                         "allowed are letters, digits and . _ = + - (not first), without / or ..")
    return name


def output_path(root: Path, *names: str) -> Path:
    """``root/name/...`` with every name checked by :func:`safe_name`, so never outside ``root``
    (symlinks the user placed under ``root`` are followed as usual)."""
    return Path(root).joinpath(*(safe_name(n, "output name") for n in names))


def fresh_dir(path: Path) -> Path:
    """An empty directory at ``path`` (removing what was there)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete directory ``tmp``."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
