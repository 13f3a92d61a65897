"""The single-process job end to end on a tiny demo pool: check the outputs, not just the run."""

import json
import statistics

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayprune.config import load_config
from rayprune.local_run import run_local
from rayprune.scoring import draw_subset

TINY = {
    "pool.demo.n_real": 150,
    "pool.demo.n_synthetic": 450,
    "pool.demo.image_size": 8,
    "pool.demo.num_classes": 3,
    "model.width": 8,
    "train.epochs": 4,
    "train.steps_per_epoch": 3,
    "train.batch_size": 32,
    "attack.steps": 1,
    "scoring.window": 2,
    "split.subset_fraction": 0.2,
    "selection.keep_fraction": 0.4,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "out"
    config = load_config(None, {**TINY, "output_dir": str(out)})
    summary = run_local(config)
    table = pq.read_table(out / "scores.parquet").to_pandas()
    return config, summary, table, np.load(out / "subset_history.npz"), out


def test_every_pool_id_once_and_subset_measured(run):
    config, summary, table, history, _ = run
    assert sorted(table.id) == list(range(600))
    synthetic = (table.source == "synthetic").to_numpy()
    subset = draw_subset(600, 0.2, config.split.seed, eligible=synthetic)
    np.testing.assert_array_equal(np.flatnonzero(table.measured), subset)
    np.testing.assert_array_equal(history["ids"], subset)
    assert summary.scored == 90 and summary.extrapolated == 510 and summary.pool_size == 600


def test_measured_scores_are_dynamic_uncertainty_of_saved_history(run):
    _, _, table, history, _ = run
    p = history["p_adv"]
    assert p.shape == (4, 90)
    expected = [np.mean([statistics.stdev(p[i : i + 2, n].tolist()) for i in range(2)]) for n in range(90)]
    np.testing.assert_allclose(table.score[table.measured], expected, rtol=1e-6)
    assert (table.neighbour_distance[table.measured] == 0).all()
    assert (table.neighbour_distance[~table.measured] > 0).all()


def test_selection_keeps_real_and_top_synthetic_per_class(run):
    _, summary, table, _, _ = run
    real = table.source == "real"
    assert table.kept[real].all()
    syn = table[~real]
    for label, group in syn.groupby("label"):
        n_kept = int(group.kept.sum())
        assert abs(n_kept - 0.4 * len(group)) <= 1
        threshold = group.score.sort_values(ascending=False).iloc[n_kept - 1]
        assert (group.score[group.kept] >= threshold).all()
        assert (group.score[~group.kept] <= threshold).all()
    assert int(table.kept.sum()) == summary.kept == 150 + 180


def test_manifest_and_atomic_output(run):
    config, summary, _, _, out = run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["train"]["epochs"] == 4
    assert set(manifest["summary"]["stage_seconds"]) >= {"split", "score_subset", "embed", "extrapolate", "select"}
    assert summary.training_steps == 12
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
