"""Faults during a run: killed training workers and actors, unreachable MLflow, determinism.

One local Ray for the module, one clean reference run and one run with a fault in every
stage, which must end with the reference's subset, scores and kept ids. Being a separate
run of the same config, it is also the determinism check (no separate clean rerun: it
would cost a whole pipeline and prove nothing the fault run does not).
"""

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
from conftest import TINY_JOB, free_port

from benchmarks.common import ray_worker_pids
from rayprune.config import load_config
from rayprune.pipeline import run_pipeline

pytestmark = pytest.mark.slow

EPOCHS = 6
# Epochs long enough (a second or two each) that a kill lands mid-run, not after it.
FAULT_JOB = {**TINY_JOB, "pool.demo.image_size": 12, "model.width": 12, "train.epochs": EPOCHS,
             "train.steps_per_epoch": 12, "train.batch_size": 64, "attack.steps": 2, "scoring.window": 3,
             "pool.demo.n_synthetic": 3850, "ray.inference_batch_size": 128, "final.enabled": "false"}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


def run_job(out: Path, **overrides):
    return run_pipeline(load_config(None, {**FAULT_JOB, "output_dir": str(out), **overrides}))


def outputs(out: Path) -> dict:
    """What a run decided: its subset, the subset's scores, every pool score, the kept ids.

    Files are found where the run's manifest says they are; the subset's id list has no
    entry there, so it is read from the split stage's directory."""
    where = json.loads((out / "manifest.json").read_text())["summary"]["outputs"]
    scores = pads.dataset(where["scores"], format="parquet").to_table().sort_by("id")
    subset = pq.read_table(out / "split" / "subset_ids.parquet")["id"].to_numpy()
    subset_scores = where["subset_scores"]
    kept = pq.read_table(where["kept_ids"])["id"].to_numpy()
    return {"subset": np.sort(subset), "subset_scores": pq.read_table(subset_scores).sort_by("id"),
            "ids": scores["id"].to_numpy(), "scores": scores["score"].to_numpy(), "kept": np.sort(kept)}


@pytest.fixture(scope="module")
def reference(local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    run_job(out)
    return outputs(out)


def assert_same_results(got: dict, want: dict) -> None:
    np.testing.assert_array_equal(got["subset"], want["subset"])
    np.testing.assert_array_equal(got["subset_scores"]["id"].to_numpy(), want["subset_scores"]["id"].to_numpy())
    np.testing.assert_allclose(got["subset_scores"]["score"].to_numpy(), want["subset_scores"]["score"].to_numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["kept"], want["kept"])


def _actor_pids(class_fragment: str) -> list[int]:
    """Live actors of this test's Ray whose class name contains ``class_fragment``, found
    by process title under this process: instant, where Ray's state API can take seconds
    on a busy machine, long enough to miss a stage that lasts a few."""
    return [int(pid) for pid in ray_worker_pids(title_contains=class_fragment)]


class Killer(threading.Thread):
    """Once ``ready()`` is true, SIGKILL one live actor whose class name contains ``class_fragment``."""

    def __init__(self, ready, class_fragment: str, timeout: float = 600) -> None:
        super().__init__(daemon=True)
        self.ready, self.fragment, self.timeout = ready, class_fragment, timeout
        self.killed: int | None = None
        self.state_at_kill = None
        self.ready_without_actor = 0  # polls that found the moment but no such actor
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            state = self.ready()
            if state:
                pids = _actor_pids(self.fragment)
                if pids:
                    self.state_at_kill = state
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed = pids[0]
                    return
                self.ready_without_actor += 1
            time.sleep(0.1)


def run_job_with_killers(out: Path, killers: list[Killer], **overrides):
    """Run the job while ``killers`` watch; always stop the watchers. Returns the job's summary."""
    for killer in killers:
        killer.start()
    try:
        return run_job(out, **overrides)
    finally:
        for killer in killers:
            killer.stop.set()
            killer.join()


FINAL_EPOCHS = 5


def test_a_fault_in_every_stage_leaves_the_results_of_the_clean_run(reference, tmp_path, caplog):
    """Four faults in one run (each fault run is a whole pipeline, so they share one):

    - a worker of the scoring run dies after its second epoch's records;
    - an embedding actor dies while the pool's scores stream;
    - the job tracks to an MLflow server that is not there;
    - a worker of the final training, which streams its rows from Ray Data, dies after
      its first checkpoint.

    The job must write every output, say once, clearly, that tracking failed, and end
    with the reference's subset, scores and kept ids. Both training runs resume from
    their checkpoints: every epoch exactly once, the final step budget spent, and the
    scoring run's histories (so its scores) those of the run that was never interrupted."""
    out = tmp_path / "out"
    records = out / "score_subset" / "records"
    partial = out / "extrapolate" / ".scores.partial"
    final_checkpoints = out / "final_train" / "train"

    def after_second_epoch():
        done = sorted(p.name for p in records.glob("epoch_*.parquet")) if records.exists() else []
        return done if len(done) >= 2 else None

    def streaming():
        return partial.exists() and list(partial.glob("*.parquet")) or None

    def final_checkpointed():
        return final_checkpoints.exists() and sorted(p.name for p in final_checkpoints.glob("checkpoint_*")) or None

    uri = f"http://127.0.0.1:{free_port()}"
    caplog.set_level(logging.WARNING, logger="rayprune.tracking")
    scorer = Killer(after_second_epoch, "RayTrainWorker")
    embedder, trainer = Killer(streaming, "Embedder"), Killer(final_checkpointed, "RayTrainWorker")
    summary = run_job_with_killers(out, [scorer, embedder, trainer], **{
        "tracking.enabled": "true", "tracking.uri": uri, "final.enabled": "true", "final.data_loading": "stream",
        "final.train.epochs": FINAL_EPOCHS, "final.train.steps_per_epoch": 12, "final.train.batch_size": 64,
        "final.shuffle_buffer": 256})
    for killer, what in ((scorer, "scoring worker"), (embedder, "embedding actor"), (trainer, "final worker")):
        assert killer.killed, (f"no {what} was killed: the test proved nothing (the moment to kill was seen "
                               f"{killer.ready_without_actor} times with no such actor alive)")
    assert scorer.killed != trainer.killed
    assert len(scorer.state_at_kill) < EPOCHS, f"killed after the last scoring epoch: {scorer.state_at_kill}"
    assert len(trainer.state_at_kill) < FINAL_EPOCHS, f"killed after the last final epoch: {trainer.state_at_kill}"
    # The scoring run resumed from its checkpoint, with the batch stream replayed: every
    # epoch's records once, and the histories, scores and kept set of the clean run.
    names = sorted(p.name for p in records.glob("epoch_*.parquet"))
    assert names == [f"epoch_{e:04d}-rank_000.parquet" for e in range(EPOCHS)]
    assert_same_results(outputs(out), reference)  # includes: every pool id exactly once
    assert len(reference["ids"]) == 4000 and np.array_equal(reference["ids"], np.arange(4000))
    assert (out / "manifest.json").exists() and summary.registered_version is None
    failures = [r.getMessage() for r in caplog.records if r.name == "rayprune.tracking"]
    assert len(failures) == 1 and uri in failures[0] and "continues without tracking" in failures[0], failures
    # The final training streamed, was resumed, and trained every epoch once.
    assert summary.final_data_loading.startswith("stream")
    state = json.loads((out / "final_train" / "history.json").read_text())
    assert [h["epoch"] for h in state["history"]] == list(range(FINAL_EPOCHS))
    assert summary.final_training_steps == FINAL_EPOCHS * 12
    assert all(np.isfinite(h["loss"]) for h in state["history"])
