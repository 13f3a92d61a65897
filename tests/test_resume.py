"""A job killed during the scoring run resumes from its checkpoint when rerun."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_JOB, job_flags, kill_process_group

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 12


def job_command(out: Path) -> list[str]:
    options = {**TINY_JOB, "train.epochs": EPOCHS, "final.enabled": "false", "output_dir": str(out)}
    return [sys.executable, str(ROOT / "jobs" / "prune.py"), *job_flags(options)]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.2)


def test_killed_job_resumes_scoring_run_without_lost_or_repeated_epochs(tmp_path):
    out = tmp_path / "out"
    records = out / "score_subset" / "records"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(job_command(out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(records / "epoch_0002-rank_000.parquet", proc, timeout=600)
    finally:
        kill_process_group(proc.pid)  # the driver and the local Ray it started, nothing else
        proc.wait()
    assert not (out / "score_subset" / "_COMMITTED.json").exists()
    assert not (out / "manifest.json").exists()
    first_epoch = (records / "epoch_0000-rank_000.parquet").stat().st_mtime_ns
    split_commit = (out / "split" / "_COMMITTED.json").stat().st_mtime_ns

    rerun = subprocess.run(job_command(out), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    # Resumed, not restarted: epoch 0 was not recorded again, the split not redone.
    assert (records / "epoch_0000-rank_000.parquet").stat().st_mtime_ns == first_epoch
    assert (out / "split" / "_COMMITTED.json").stat().st_mtime_ns == split_commit
    # Every epoch recorded exactly once.
    names = sorted(p.name for p in records.glob("epoch_*.parquet"))
    assert names == [f"epoch_{e:04d}-rank_000.parquet" for e in range(EPOCHS)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["scored"] == 90 and manifest["summary"]["pool_size"] == 600
