"""The output directory: what makes it a rayprune run, and what a rerun may replace in it.

rayprune writes only inside ``output_dir`` and deletes only what a run wrote there,
recognised by its markers:

* ``_RAYPRUNE_RUN.json`` at the top marks the directory as a run. A non-empty directory
  without it (or without the stage markers of a run from an older version) is refused
  before anything starts: it may hold someone's data.
* each stage directory holds ``_STARTED.json`` (and ``_COMMITTED.json`` when complete)
  recording the inputs its results were made from: the config options (dotted keys and
  values), the upstream stages' digests and other facts (the pool's content digest,
  the number of training workers). A stage-named folder without them is not ours.

A committed stage (or a resumable one, such as a scoring run with checkpoints) whose
inputs differ from the new run's is *stale*. By default the job stops before any work
and names the stage and the options that changed; ``stale_results=archive`` moves such
stages to ``_archive/<stage>-<UTC time>-<digest>/`` and ``stale_results=delete``
removes them. Unfinished stages that cannot resume are ours and worthless, so they are
cleared without asking.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayprune.errors import InputError

logger = logging.getLogger(__name__)

RUN_MARKER = "_RAYPRUNE_RUN.json"
STARTED = "_STARTED.json"
COMMITTED = "_COMMITTED.json"
ARCHIVE_DIR = "_archive"
MANIFEST = "manifest.json"
# Every stage directory a run may write, in pipeline order.
STAGE_NAMES = ("pool", "split", "score_subset", "extrapolate", "select", "final_train", "test_pool", "evaluate",
               "random_baseline", "final_train_random", "evaluate_random")


def read_record(stage_dir: Path) -> tuple[dict | None, bool]:
    """(the stage's record, committed?): ``_COMMITTED.json`` if there, else ``_STARTED.json``, else None."""
    for name, committed in ((COMMITTED, True), (STARTED, False)):
        try:
            record = json.loads((stage_dir / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "input_digest" in record:
            return record, committed
    return None, False


def is_run_dir(root: Path) -> bool:
    """``root`` carries a run's marker, or (runs of older versions) a manifest or a stage record."""
    if (root / RUN_MARKER).is_file():
        return True
    if (root / MANIFEST).is_file():
        return True
    return any(read_record(root / name)[0] is not None for name in STAGE_NAMES)


def changed_inputs(old: dict, new: dict, known_facts_only: bool = False) -> list[str]:
    """What differs between two stage records' inputs, e.g. ``["split.seed: 0 -> 3", "pool: ..."]``.

    ``known_facts_only``: ``new`` holds only the facts known so far (before Ray starts),
    so facts it lacks are not compared.
    """
    out = []
    old_options, new_options = old.get("options") or {}, new.get("options") or {}
    for key in sorted(set(old_options) | set(new_options)):
        if key not in new_options:
            out.append(f"{key} (no longer an option)")
        elif old_options.get(key, _ABSENT) != new_options[key]:
            before = "unset" if key not in old_options else json.dumps(old_options[key])
            out.append(f"{key}: {before} -> {json.dumps(new_options[key])}")
    old_facts, new_facts = old.get("facts") or {}, new.get("facts") or {}
    keys = set(old_facts) & set(new_facts) if known_facts_only else set(old_facts) | set(new_facts)
    for key in sorted(keys):
        if old_facts.get(key, _ABSENT) != new_facts.get(key, _ABSENT):
            out.append(f"{key}: {_fact(old_facts.get(key, 'unset'))} -> {_fact(new_facts.get(key, 'unset'))}")
    if "upstream" in new:
        for name in sorted(set(old.get("upstream") or {}) | set(new["upstream"])):
            if (old.get("upstream") or {}).get(name) != new["upstream"].get(name):
                out.append(f"the results of stage {name}")
    if not out and "options" not in old:
        out.append("it was written by an older version of rayprune")
    return out


_ABSENT = object()


def _fact(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class StaleStage:
    name: str
    changes: list[str]  # own changed inputs; empty when only an upstream stage is stale
    because_of: str = ""  # the upstream stage that makes it stale


def find_stale_stages(root: Path, planned: tuple[str, ...], options: dict[str, Any],
                      facts: dict[str, Any]) -> list[StaleStage]:
    """Stages in ``root`` that this run would redo although their results are kept (committed or resumable).

    ``planned``: the stages the run will execute; ``options``: the run's flat config;
    ``facts``: the inputs known before Ray starts (e.g. the pool's content digest). A
    stage is stale when one of its recorded options or known facts differs, or when a
    stage it was made from is stale. Returned in pipeline order.
    """
    stale: dict[str, StaleStage] = {}
    records = {}
    for name in planned:
        record, committed = read_record(root / name)
        if record is not None and (committed or record.get("resumable")):
            records[name] = record
    for name in sorted(records, key=STAGE_NAMES.index):  # upstream stages come first in pipeline order
        record = records[name]
        new: dict[str, Any] = {"facts": {k: v for k, v in facts.items() if k in (record.get("facts") or {})}}
        if record.get("options") is not None:
            new["options"] = {k: options[k] for k in record["options"] if k in options}
        changes = changed_inputs(record, new, known_facts_only=True)
        upstream = [u for u in (record.get("upstream") or {}) if u in stale]
        if changes or upstream:
            stale[name] = StaleStage(name, changes, "" if changes else upstream[0])
    return list(stale.values())


def describe_stale(root: Path, stale: list[StaleStage]) -> str:
    """One line: which stages hold results made from other inputs, and what changed."""
    own = [s for s in stale if s.changes]
    parts = [f"{s.name} ({'; '.join(s.changes)})" for s in own]
    after = [s.name for s in stale if not s.changes]
    text = f"{root} holds committed results of stage {', '.join(parts)}"
    if after:
        text += f", and of {', '.join(after)} made from them"
    return text


def claim(root: Path) -> None:
    """Create ``root`` if needed and mark it as a run (idempotent)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / RUN_MARKER
    if not marker.exists():
        tmp = root / f".{RUN_MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"tool": "rayprune", "created": _utc_now()}, indent=2))
        os.replace(tmp, marker)


def set_aside(stage_dir: Path, record: dict, how: str) -> Path | None:
    """Archive (move under ``_archive/``) or delete a stale stage directory of ours; returns the archive path."""
    if how == "delete":
        logger.warning("deleting stage %s (results from other inputs), as stale_results=delete asks", stage_dir)
        shutil.rmtree(stage_dir)
        return None
    archive = stage_dir.parent / ARCHIVE_DIR
    archive.mkdir(exist_ok=True)
    dest = archive / f"{stage_dir.name}-{_utc_now(compact=True)}-{str(record.get('input_digest'))[:8]}"
    os.replace(stage_dir, dest)
    logger.warning("moved stage %s (results from other inputs) to %s", stage_dir.name, dest)
    return dest


def remove_unfinished(root: Path) -> list[str]:
    """Remove the stage directories of ``root`` that started, did not commit and cannot resume.

    Called when a run fails, so that nothing half-written looks like progress. Resumable
    stages (training with checkpoints) are kept: a rerun continues them.
    """
    removed = []
    for name in STAGE_NAMES:
        record, committed = read_record(root / name)
        if record is not None and not committed and not record.get("resumable"):
            shutil.rmtree(root / name, ignore_errors=True)
            removed.append(name)
    if removed:
        logger.info("removed the unfinished stage(s) %s", ", ".join(removed))
    return removed


def check_claimable(root: Path) -> None:
    """Raise ``InputError`` unless ``root`` is missing, empty or a run, with no foreign stage-named folders."""
    if not root.exists():
        return
    if not root.is_dir():
        raise InputError(f"output_dir {root} exists and is not a directory")
    if not any(root.iterdir()):
        return
    if not is_run_dir(root):
        raise InputError(f"output_dir {root} is not empty and is not a rayprune run (no {RUN_MARKER}); rayprune only "
                         "writes into a new or empty directory or one of its earlier runs: choose another --output-dir")
    for name in STAGE_NAMES:
        path = root / name
        if path.exists() and (not path.is_dir() or (read_record(path)[0] is None and any(path.iterdir()))):
            raise InputError(f"{path} was not written by rayprune (no {STARTED}), but a run writes its {name} stage "
                             "there: move it away or choose another --output-dir")


def _utc_now(compact: bool = False) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ" if compact else "%Y-%m-%dT%H:%M:%SZ", time.gmtime())
