"""What every stage shares: its directory, input digest, and commit marker.

A stage writes under ``<output_dir>/<stage>/``. ``_STARTED.json`` records the inputs
the stage is working from (options, upstream digests, facts) and their digest;
``_COMMITTED.json`` is written last, atomically, when every output is complete. A rerun
skips a stage whose committed digest matches and resumes a stage started with the same
digest (e.g. training from its checkpoints). Results made from other inputs are never
removed silently (``rayprune.rundir``). Outputs that look complete therefore are complete.
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

from rayprune.config import JobConfig, select_options
from rayprune.errors import InputError
from rayprune.rundir import COMMITTED, STARTED, changed_inputs, read_record, set_aside

logger = logging.getLogger(__name__)

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")


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
    """One stage's directory and bookkeeping.

    ``options`` (dotted config keys and values), ``upstream`` (stage name -> that stage's
    input digest) and ``facts`` (other inputs by name: the pool's content digest, the
    number of training workers) are everything its results depend on; their digest is
    the stage's identity, and they are recorded so that a rerun can say what changed.
    ``resumable``: an unfinished run of this stage holds progress worth keeping
    (training checkpoints). ``stale_results``: what :meth:`begin` does with kept results
    made from other inputs (``refuse``, ``archive`` or ``delete``; see rayprune.rundir).
    """

    name: str
    root: Path
    options: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    resumable: bool = False
    stale_results: str = "refuse"
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def input_digest(self) -> str:
        return digest(self.options, self.upstream, self.facts)

    @property
    def dir(self) -> Path:
        return output_path(self.root, self.name)

    def _inputs(self) -> dict:
        return {"stage": self.name, "input_digest": self.input_digest, "options": self.options,
                "upstream": self.upstream, "facts": self.facts, "resumable": self.resumable}

    def committed(self) -> dict | None:
        """The commit record if this stage finished with the same inputs, else None."""
        record, committed = read_record(self.dir)
        return record if committed and record.get("input_digest") == self.input_digest else None

    def begin(self) -> None:
        """Prepare the directory: keep a same-input partial run (to resume), clear our own
        unfinished work, and never remove kept results silently (see ``stale_results``)."""
        record, committed = read_record(self.dir)
        if self.dir.exists():
            if record is None and (not self.dir.is_dir() or any(self.dir.iterdir())):
                raise InputError(f"{self.dir} was not written by rayprune (no {STARTED}); move it away or choose "
                                 "another --output-dir")
            if record is not None and record.get("input_digest") != self.input_digest:
                if committed or record.get("resumable"):
                    self._set_aside(record, committed)
                else:
                    logger.info("stage %s: clearing an unfinished earlier attempt made from other inputs", self.name)
                    shutil.rmtree(self.dir)
        (self.dir / COMMITTED).unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / STARTED, self._inputs())
        self.started_at = time.perf_counter()

    def _set_aside(self, record: dict, committed: bool) -> None:
        changes = "; ".join(changed_inputs(record, self._inputs()))
        kept = "committed results" if committed else "an unfinished run that could resume"
        if self.stale_results == "refuse":
            raise InputError(f"stage {self.name}: {self.dir} holds {kept} made from other inputs ({changes}); "
                             "rerun with --stale_results archive (moves them under _archive/) or --stale_results "
                             "delete, or choose another --output-dir")
        set_aside(self.dir, record, self.stale_results)

    def commit(self, outputs: dict[str, Any]) -> dict:
        """Mark the stage complete; ``outputs`` (counts, digests, paths) go in the record."""
        record = {
            **self._inputs(),
            "output_digest": digest(self.input_digest, outputs),
            "seconds": round(time.perf_counter() - self.started_at, 3),
            "outputs": outputs,
        }
        write_json_atomic(self.dir / COMMITTED, record)
        return record


def stage_for(config: JobConfig, root: Path, name: str, options: tuple[str, ...], *, exclude: tuple[str, ...] = (),
              upstream: dict[str, str] | None = None, facts: dict[str, Any] | None = None,
              resumable: bool = False) -> Stage:
    """A :class:`Stage` whose results depend on the config ``options`` (sections or dotted keys)."""
    return Stage(name, root, select_options(config, *options, exclude=exclude), dict(upstream or {}),
                 dict(facts or {}), resumable, config.stale_results)


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
