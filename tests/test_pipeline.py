"""The Ray pipeline end to end on a local Ray instance: check its outputs, not just the run."""

import json

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import TINY_JOB

from rayprune.config import load_config
from rayprune.data.pool import decode_images, pool_files, read_pool_info
from rayprune.pipeline import run_pipeline
from rayprune.robust.training import to_float_images
from rayprune.scoring import class_quotas, draw_subset
from rayprune.stages.score import model_from_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "out"
    config = load_config(None, {**TINY_JOB, "output_dir": str(out)})
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, dashboard_host="127.0.0.1")
    try:
        summary = run_pipeline(config)
        marks = {p: p.stat().st_mtime_ns for p in out.glob("*/_COMMITTED.json")}
        rerun = run_pipeline(config)
        marks_after = {p: p.stat().st_mtime_ns for p in out.glob("*/_COMMITTED.json")}
    finally:
        ray.shutdown()
    pool = pads.dataset(pool_files(out / "pool" / "data"), format="parquet").to_table().sort_by("id")
    scores = pads.dataset(str(out / "extrapolate" / "scores"), format="parquet").to_table().sort_by("id").to_pandas()
    return {"config": config, "summary": summary, "rerun": rerun, "marks": (marks, marks_after), "out": out,
            "pool": pool, "scores": scores}


def test_scores_table_has_every_pool_id_once(job):
    ids = job["scores"]["id"].to_numpy()
    np.testing.assert_array_equal(ids, np.arange(600))
    assert set(job["scores"].columns) >= {"id", "label", "source", "score", "measured", "neighbour_distance"}
    np.testing.assert_array_equal(job["scores"]["label"].to_numpy(), job["pool"]["label"].to_numpy())


def test_measured_ids_are_exactly_the_subset(job):
    synthetic = np.asarray(job["pool"]["source"].to_pylist()) == "synthetic"
    subset = draw_subset(600, 0.2, job["config"].split.seed, eligible=synthetic)
    measured = np.flatnonzero(job["scores"]["measured"].to_numpy())
    np.testing.assert_array_equal(measured, subset)
    subset_scores = pq.read_table(job["summary"].outputs["subset_scores"]).to_pandas()
    np.testing.assert_array_equal(subset_scores["id"], subset)
    np.testing.assert_allclose(job["scores"]["score"].to_numpy()[subset], subset_scores["score"])
    assert job["summary"].scored == 90 and job["summary"].extrapolated == 510


def test_kept_counts_per_class_and_real_all_kept(job):
    kept = pq.read_table(job["out"] / "select" / "kept_ids.parquet").to_pandas()
    scores = job["scores"]
    assert set(scores.id[scores.source == "real"]) <= set(kept.id)
    syn = scores[scores.source == "synthetic"]
    sizes = syn.groupby("label").size()
    quotas = dict(zip(sizes.index, class_quotas(sizes.to_numpy(), round(0.4 * len(syn)))))
    kept_syn = syn[syn.id.isin(kept.id)]
    for label, group in syn.groupby("label"):
        chosen = group[group.id.isin(kept.id)]
        assert len(chosen) == quotas[label]
        assert chosen.score.min() >= group[~group.id.isin(kept.id)].score.max()  # the top of the class
    assert len(kept) == job["summary"].kept == 150 + len(kept_syn)


def test_pruned_pool_rows_are_identical_to_input_rows(job):
    pruned_dir = job["out"] / "select" / "pruned_pool"
    info = read_pool_info(pruned_dir)
    pruned = pads.dataset(pool_files(pruned_dir, info), format="parquet").to_table().sort_by("id")
    kept = pq.read_table(job["out"] / "select" / "kept_ids.parquet")["id"].to_numpy()
    np.testing.assert_array_equal(pruned["id"].to_numpy(), np.sort(kept))
    assert info.num_rows == len(kept) and info.image_shape == (8, 8, 3)
    source_rows = job["pool"].take(pruned["id"].to_numpy())
    assert source_rows.equals(pruned.select(source_rows.column_names))


def test_extrapolated_scores_match_brute_force_from_saved_embeddings(job):
    refs = pq.read_table(job["summary"].outputs["subset_embeddings"])
    ref_emb = np.stack(refs["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
    ref_scores = refs["score"].to_numpy()
    model = model_from_config(job["config"], 3, 3)
    model.load_state_dict(torch.load(job["summary"].outputs["subset_model"], weights_only=True))
    model.eval()
    rng = np.random.default_rng(0)
    sample = rng.choice(np.flatnonzero(~job["scores"]["measured"].to_numpy()), 40, replace=False)
    rows = job["pool"].take(sample)
    with torch.no_grad():
        emb = model.embed(to_float_images(decode_images(rows["image"], (8, 8, 3)))).double().numpy()
    dist = np.sqrt(((emb[:, None, :] - ref_emb[None]) ** 2).sum(-1))
    nearest = np.argsort(dist, axis=1)[:, :5]
    expected = ref_scores[nearest].mean(axis=1)
    np.testing.assert_allclose(job["scores"]["score"].to_numpy()[sample], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        job["scores"]["neighbour_distance"].to_numpy()[sample], np.take_along_axis(dist, nearest, 1).mean(1), rtol=1e-3
    )


def test_rerun_skips_finished_stages_and_manifest(job):
    marks, marks_after = job["marks"]
    assert len(marks) == 5 and marks == marks_after  # no stage recommitted
    assert job["rerun"].kept == job["summary"].kept
    manifest = json.loads((job["out"] / "manifest.json").read_text())
    assert manifest["config"]["train"]["epochs"] == 4
    assert set(manifest["stages"]) == {"pool", "split", "score_subset", "extrapolate", "select"}
    assert manifest["summary"]["training_steps"] == 12
    assert sum(manifest["summary"]["embedded_rows_per_node"].values()) == 600
    assert not list(job["out"].glob("*/.*partial"))  # no temporary directories left
