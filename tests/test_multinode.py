"""The job on a multi-node cluster simulated on one machine (ray.cluster_utils.Cluster)."""

import numpy as np
import pyarrow.dataset as pads
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


def test_pool_blocks_are_embedded_on_more_than_one_node(cluster, tmp_path):
    overrides = {
        **TINY_JOB,
        "output_dir": str(tmp_path / "out"),
        "ray.address": cluster.address,
        "ray.embed_actors": 2,
        "final.enabled": "false",
        "pool.demo.n_synthetic": 1850,  # 2000 rows: 16 blocks of 128 rows to spread
    }
    summary = run_pipeline(load_config(None, overrides))
    per_node = summary.embedded_rows_per_node
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(per_node) <= alive
    assert len(per_node) >= 2, f"all pool rows were embedded on one node: {per_node}"
    assert sum(per_node.values()) == 2000
    ids = pads.dataset(summary.outputs["scores"], format="parquet").to_table(columns=["id"])["id"].to_numpy()
    np.testing.assert_array_equal(np.sort(ids), np.arange(2000))
