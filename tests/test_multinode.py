"""The job on a multi-node cluster simulated on one machine (ray.cluster_utils.Cluster)."""

import shutil
import threading
import time

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
from conftest import TINY_JOB
from ray.cluster_utils import Cluster

from rayprune.config import load_config
from rayprune.pipeline import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20})
    for _ in range(2):
        c.add_node(num_cpus=2, object_store_memory=200 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def _overrides(cluster, out) -> dict:
    # 6000 rows in blocks of 128: enough blocks to spread, and a stream long enough to
    # remove a node while it runs. The simulated nodes share this machine's cores, so one
    # torch thread per embedding actor.
    # kNN extrapolation here: the learned path is checked in test_pipeline.py, this keeps the kNN actors covered.
    # Two DDP workers (2 CPUs each: one per worker node) for the scoring run, so it runs sharded.
    return {**TINY_JOB, "output_dir": str(out), "ray.address": cluster.address, "ray.embed_actors": 2,
            "ray.train_workers": 2,
            "extrapolation.model": "knn",
            "ray.embed_threads": 1, "final.enabled": "false", "pool.demo.n_synthetic": 5850,
            "ray.inference_batch_size": 128}


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    """One job on the 3-node cluster; the node-removal test reruns its last stages."""
    out = tmp_path_factory.mktemp("multinode") / "out"
    return out, run_pipeline(load_config(None, _overrides(cluster, out)))


def test_pool_blocks_are_embedded_on_more_than_one_node(first_run):
    _, summary = first_run
    per_node = summary.embedded_rows_per_node
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(per_node) <= alive
    assert len(per_node) >= 2, f"all pool rows were embedded on one node: {per_node}"
    assert sum(per_node.values()) == 6000
    ids = pads.dataset(summary.outputs["scores"], format="parquet").to_table(columns=["id"])["id"].to_numpy()
    np.testing.assert_array_equal(np.sort(ids), np.arange(6000))


def test_the_scoring_run_trains_two_shards_and_records_each_ones_references(first_run):
    """Two DDP workers each hold every other scored id (in id order), record their shard
    every epoch and their references in the last; together they cover the subset once."""
    out, summary = first_run
    subset = np.sort(pq.read_table(out / "split" / "subset_ids.parquet")["id"].to_numpy())
    assert summary.scored == len(subset) > 1000  # 20% of the 5850 synthetic rows
    for epoch in range(TINY_JOB["train.epochs"]):
        shards = [pq.read_table(out / "score_subset" / "records" / f"epoch_{epoch:04d}-rank_{rank:03d}.parquet")
                  ["id"].to_numpy() for rank in (0, 1)]
        for rank, shard in enumerate(shards):
            np.testing.assert_array_equal(shard, subset[rank::2])
    references = [pq.read_table(out / "score_subset" / "references" / f"rank_{rank:03d}.parquet") for rank in (0, 1)]
    for rank, table in enumerate(references):
        np.testing.assert_array_equal(table["id"].to_numpy(), subset[rank::2])
    saved = pq.read_table(summary.outputs["subset_embeddings"])
    np.testing.assert_array_equal(saved["id"].to_numpy(), subset)
    assert not (out / "score_subset" / "records" / "epoch_0000-rank_002.parquet").exists()


def test_job_waits_for_the_workers_it_asks_the_autoscaler_for(cluster):
    from rayprune.config import RaySection
    from rayprune.stages.resources import release_cluster, request_cluster

    want = int(ray.cluster_resources()["CPU"]) + 2
    config = RaySection(address=cluster.address, request_cpus=want, resource_wait_s=120)
    outcome = {}

    def request():
        start = time.monotonic()
        try:
            request_cluster(config)
            outcome["waited"] = time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    waiter = threading.Thread(target=request, daemon=True)
    waiter.start()
    time.sleep(3.0)
    assert waiter.is_alive(), f"returned before the cluster had {want} CPUs: {outcome}"
    cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)  # what the autoscaler would do
    waiter.join(timeout=150)
    release_cluster(config)
    assert "waited" in outcome, outcome
    assert outcome["waited"] >= 3.0  # it really waited for the node
    assert ray.cluster_resources()["CPU"] >= want
    with pytest.raises(RuntimeError, match=r"after waiting 1 s for ray.request_cpus=999"):
        request_cluster(RaySection(address=cluster.address, request_cpus=999, resource_wait_s=1))


def test_job_finishes_when_a_node_is_removed_mid_stage(cluster, first_run):
    """Rerun the first job from its extrapolate stage (split and scoring stay committed)
    and remove a worker node while the scores stream.

    The rerun also finds the scoring run as an older rayprune left it, without the
    references its last epoch records: the extrapolate stage must then embed the subset
    in a pass of its own, on the cluster, and get the references the scoring run recorded
    (same embeddings and clean statistics, up to float rounding)."""
    out, first = first_run
    overrides = _overrides(cluster, out)
    recorded = pq.read_table(first.outputs["subset_embeddings"])
    for stage in ("extrapolate", "select"):
        shutil.rmtree(out / stage)
    shutil.rmtree(out / "score_subset" / "references")
    scoring_commit = (out / "score_subset" / "_COMMITTED.json").stat().st_mtime_ns
    partial = out / "extrapolate" / ".scores.partial"
    removed = []

    def remove_a_worker_node_once_scoring_streams():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not removed:
            if partial.exists() and any(partial.glob("*.parquet")):
                victim = next(n for n in cluster.worker_nodes if n is not cluster.head_node)
                cluster.remove_node(victim)
                removed.append(victim)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=remove_a_worker_node_once_scoring_streams, daemon=True)
    watcher.start()
    summary = run_pipeline(load_config(None, overrides))
    watcher.join(timeout=5)
    assert removed, "no node was removed while the extrapolate stage streamed: the test proved nothing"
    ids = pads.dataset(summary.outputs["scores"], format="parquet").to_table(columns=["id"])["id"].to_numpy()
    np.testing.assert_array_equal(np.sort(ids), np.arange(6000))  # every id exactly once
    assert (out / "score_subset" / "_COMMITTED.json").stat().st_mtime_ns == scoring_commit  # not redone
    embedded = pq.read_table(summary.outputs["subset_embeddings"])
    for name in ("id", "label", "score"):
        np.testing.assert_array_equal(embedded[name].to_numpy(), recorded[name].to_numpy(), err_msg=name)
    for name in ("embedding", "p_clean", "margin_clean", "l2_error_clean"):
        np.testing.assert_allclose(np.stack(embedded[name].to_numpy(zero_copy_only=False)),
                                   np.stack(recorded[name].to_numpy(zero_copy_only=False)), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
