"""The Ray pipeline end to end, submitted to a Ray head with `ray job submit`: check its outputs, not just the run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import TINY_JOB, job_flags, ray_head, starting_mlflow_server, with_venv_path

from rayprune.choices import AUTOATTACK
from rayprune.config import load_config
from rayprune.data.pool import decode_images, pool_files, read_pool_info
from rayprune.pipeline import run_pipeline
from rayprune.robust.training import to_float_images
from rayprune.scoring import class_quotas, draw_subset
from rayprune.stages.training import model_from_config

pytestmark = pytest.mark.slow


ROOT = Path(__file__).resolve().parents[1]
#: What `ray job submit --working-dir` leaves out of the upload.
UPLOAD_EXCLUDES = [".venv", ".git", "outputs", "mlruns", "mlflow.db"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The tiny job run as a user runs it on a cluster: `ray job submit -- python
    jobs/prune.py` on a head started with `ray start`, tracking to an MLflow server that
    MLFLOW_TRACKING_URI names in the runtime env. Then this process joins the same head,
    reruns the job in-process (every stage committed: nothing may be redone; its summary
    is the one the tests read) and runs the pieces some tests look into. One pipeline
    serves the cluster path and the output checks: each costs minutes on 2 cores."""
    base = tmp_path_factory.mktemp("pipeline")
    out = base / "out"
    options = {**TINY_JOB, "output_dir": str(out), "tracking.enabled": "true", "final.compare_random": "true",
               "final.data_loading": "stream", "final.shuffle_buffer": 64, "publish_uri": str(base / "published")}
    # The server for the whole module (the tests read the tracked runs), started beside the head.
    with starting_mlflow_server(base) as (uri, _, mlflow_ready):
        with ray_head(base) as (dashboard, gcs_address):
            mlflow_ready()
            job = _submit_and_rerun(base, out, options, uri, dashboard, gcs_address)
        yield job


def _submit_and_rerun(base, out, options: dict, uri: str, dashboard: str, gcs_address: str) -> dict:
    """The fixture's work on a live head and MLflow server; returns what the tests read."""
    runtime_env = json.dumps({"excludes": UPLOAD_EXCLUDES, "env_vars": {"MLFLOW_TRACKING_URI": uri}})
    submit = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", dashboard,
              "--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--",
              "python", "jobs/prune.py", *job_flags(options)]
    submitted = subprocess.run(submit, env=with_venv_path(), capture_output=True, text=True, timeout=900)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    config = load_config(None, {**options, "tracking.uri": uri})
    marks = {p: p.stat().st_mtime_ns for p in out.glob("*/_COMMITTED.json")}
    submitted_manifest = json.loads((out / "manifest.json").read_text())
    ray.init(address=gcs_address)
    try:
        summary = run_pipeline(config)
        marks_after = {p: p.stat().st_mtime_ns for p in out.glob("*/_COMMITTED.json")}
        sharded = _evaluate_on_three_actors(config, summary.outputs["final_model"], base / "sharded")
        one_pass = _one_stream_pass_per_worker(config, summary.outputs["pruned_pool"], workers=2, batch=16)
        paced = _scheduling_steps_of_one_driver_pass(summary.outputs["pruned_pool"])
    finally:
        ray.shutdown()
    pool = pads.dataset(pool_files(summary.outputs["pool"]), format="parquet").to_table().sort_by("id")
    scores = pads.dataset(summary.outputs["scores"], format="parquet").to_table().sort_by("id").to_pandas()
    return {"config": config, "summary": summary, "submitted": submitted, "submitted_manifest": submitted_manifest,
            "marks": (marks, marks_after), "out": out, "pool": pool, "scores": scores, "uri": uri,
            "sharded": sharded, "one_pass": one_pass, "paced": paced}


def _one_stream_pass_per_worker(config, pruned_pool, workers: int, batch: int) -> dict:
    """One pass of the final training's stream over the pruned pool, split as Ray Train
    splits it (``streaming_split``, equal shares) and read by ``workers`` concurrent readers."""
    import threading

    from rayprune.stages.final import split_train_val
    from rayprune.stages.prepare import read_ids_and_sources
    from rayprune.stages.stream import stream_dataset, stream_passes

    info = read_pool_info(pruned_pool)
    files = pool_files(pruned_pool, info)
    ids, sources = read_ids_and_sources(files)
    _, val = split_train_val(ids, sources, config.pool.prunable_sources, config.final.val_size)
    splits = stream_dataset(files, list(config.pool.prunable_sources), val, seed=0).streaming_split(workers, equal=True)
    got: list = [None] * workers

    def read(rank: int) -> None:
        got[rank] = [b for b in stream_passes(splits[rank], batch, tuple(info.image_shape), 64, rank, 0)]

    readers = [threading.Thread(target=read, args=(r,)) for r in range(workers)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=300)
    expected = ids[np.isin(sources, list(config.pool.prunable_sources)) & ~np.isin(ids, val)]
    return {"batches": got, "expected_ids": expected, "batch": batch}


def _scheduling_steps_of_one_driver_pass(pruned_pool) -> dict:
    """One pass of the training stream read slowly in this process, with the time
    (monotonic) each step of Ray Data's scheduling loop went on at and whether the
    consumer had blocks waiting, recorded by wrapping the stream's pacer."""
    import time

    from rayprune.stages import stream

    info = read_pool_info(pruned_pool)
    steps: list[tuple[float, bool]] = []
    pace = stream.PacedSchedulingLoop.on_execution_step

    def recorded(self, executor):
        served = not executor._consumer_idling()
        pace(self, executor)
        steps.append((self._last, served))

    stream.PacedSchedulingLoop.on_execution_step = recorded
    rows = 0
    try:
        dataset = stream.stream_dataset(pool_files(pruned_pool, info), None, np.empty(0, np.int64), seed=0)
        for batch in dataset.iter_batches(batch_size=32, batch_format="pyarrow"):
            rows += len(batch["id"])
            time.sleep(0.02)  # a slow consumer, so blocks wait for it
    finally:
        stream.PacedSchedulingLoop.on_execution_step = pace
    return {"steps": steps, "rows": rows, "pool_rows": info.num_rows}


def _evaluate_on_three_actors(config, model_file, root):
    """The evaluate stage on its own, with the test set in batches of 32 spread over 3 actors."""
    from rayprune.stages.evaluate import run_evaluate
    from rayprune.stages.prepare import run_test_pool
    from rayprune.stages.resources import plan_resources

    config = load_config(None, {**TINY_JOB, "output_dir": str(root), "evaluation.actors": "3",
                                "evaluation.batch_size": "32"})
    test = run_test_pool(config, root)
    result = run_evaluate(config, test, model_file, {"final_train": "the pipeline's"}, root, plan_resources(config.ray))
    return {"config": config, "test": test, "result": result}


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
    kept = pq.read_table(job["summary"].outputs["kept_ids"]).to_pandas()
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
    pruned_dir = job["summary"].outputs["pruned_pool"]
    info = read_pool_info(pruned_dir)
    pruned = pads.dataset(pool_files(pruned_dir, info), format="parquet").to_table().sort_by("id")
    kept = pq.read_table(job["summary"].outputs["kept_ids"])["id"].to_numpy()
    np.testing.assert_array_equal(pruned["id"].to_numpy(), np.sort(kept))
    assert info.num_rows == len(kept) and info.image_shape == (8, 8, 3)
    source_rows = job["pool"].take(pruned["id"].to_numpy())
    assert source_rows.equals(pruned.select(source_rows.column_names))


def test_learned_scores_match_an_in_process_recomputation(job):
    """The default (learned) extrapolation, recomputed without Ray: the subset model's
    embeddings and clean signals of sampled pool rows from their raw images, brute-force
    k-NN features from the saved references, and the regressor refitted on the
    neighbours. The streamed scores must be its predictions."""
    from rayprune.robust.recording import embed_with_signals
    from rayprune.scoring.learned import cross_fitted_knn_features, feature_names, fit_score_model

    refs = pq.read_table(job["summary"].outputs["subset_embeddings"])
    probe_ids = pq.read_table(job["out"] / "extrapolate" / "probe.parquet")["id"].to_numpy()
    neighbours = ~np.isin(refs["id"].to_numpy(), probe_ids)  # the probe is not used as neighbours
    ref_emb = np.stack(refs["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)[neighbours]
    ref_scores, ref_labels = refs["score"].to_numpy()[neighbours], refs["label"].to_numpy()[neighbours]
    model = model_from_config(job["config"], 3, 3)
    model.load_state_dict(torch.load(job["summary"].outputs["subset_model"], weights_only=True))
    sample = np.random.default_rng(0).choice(np.flatnonzero(~job["scores"]["measured"].to_numpy()), 40, replace=False)
    rows = job["pool"].take(sample)
    labels = rows["label"].to_numpy()
    emb, signals = embed_with_signals(model, to_float_images(decode_images(rows["image"], (8, 8, 3))),
                                      torch.as_tensor(labels))
    # Brute-force k-NN features: mean score and distance of the k nearest (same-label: of that label).
    dist = np.sqrt(((emb[:, None, :].astype(np.float64) - ref_emb[None].astype(np.float64)) ** 2).sum(-1))
    features = dict(signals)
    for suffix, allowed in (("", np.ones_like(dist, bool)), ("_sl", labels[:, None] == ref_labels[None])):
        order = np.argsort(np.where(allowed, dist, np.inf), axis=1, kind="stable")
        for k in (5, 12, 25):
            kk = np.minimum(k, allowed.sum(1))[:, None]  # a class with fewer than k references uses them all
            use = np.arange(25)[None] < kk
            features[f"knn{k}{suffix}"] = (ref_scores[order[:, :25]] * use).sum(1) / kk[:, 0]
            features[f"dist{k}{suffix}"] = (np.take_along_axis(dist, order[:, :25], 1) * use).sum(1) / kk[:, 0]
    fit_columns = {name: refs[name].to_numpy()[neighbours] for name in signals}
    fit_columns.update(cross_fitted_knn_features(ref_emb, ref_scores, ref_labels, seed=job["config"].split.seed))
    refit = fit_score_model(fit_columns, ref_scores, feature_names(("clean",)), seed=job["config"].split.seed)
    np.testing.assert_allclose(job["scores"]["score"].to_numpy()[sample], refit.predict(features), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(job["scores"]["neighbour_distance"].to_numpy()[sample], features["dist12"], rtol=1e-3)


def test_references_are_the_subset_models_view_from_the_last_scoring_epoch(job):
    """The extrapolation's references come from the scoring run's last recording pass, not
    from a pass of their own: every scored id once, with its measured score; the
    embeddings and clean statistics the saved subset model gives on each row's raw image
    (recomputed here without Ray); the adversarial statistics of the last epoch's record."""
    from rayprune.robust.recording import embed_with_signals

    refs = pq.read_table(job["summary"].outputs["subset_embeddings"])
    ids = refs["id"].to_numpy()
    measured = pq.read_table(job["summary"].outputs["subset_scores"])
    np.testing.assert_array_equal(ids, measured["id"].to_numpy())
    np.testing.assert_array_equal(refs["score"].to_numpy(), measured["score"].to_numpy())
    rows = job["pool"].take(ids)
    np.testing.assert_array_equal(rows["id"].to_numpy(), ids)
    np.testing.assert_array_equal(refs["label"].to_numpy(), rows["label"].to_numpy())
    model = model_from_config(job["config"], 3, 3)
    model.load_state_dict(torch.load(job["summary"].outputs["subset_model"], weights_only=True))
    emb, signals = embed_with_signals(model, to_float_images(decode_images(rows["image"], (8, 8, 3))),
                                      torch.as_tensor(rows["label"].to_numpy()))
    np.testing.assert_allclose(np.stack(refs["embedding"].to_numpy(zero_copy_only=False)), emb, rtol=1e-4, atol=1e-5)
    for name, values in signals.items():
        np.testing.assert_allclose(refs[name].to_numpy(), values, rtol=1e-4, atol=1e-5, err_msg=name)
    last = pq.read_table(job["out"] / "score_subset" / "records" / "epoch_0003-rank_000.parquet")
    np.testing.assert_array_equal(np.sort(last["id"].to_numpy()), ids)
    last = last.sort_by("id")
    for name in ("p_adv", "margin_adv", "l2_error_adv"):
        np.testing.assert_array_equal(refs[name].to_numpy(), last[name].to_numpy())
    assert refs["p_adv"].to_numpy().mean() < refs["p_clean"].to_numpy().mean()  # attacked, not a clean copy


def test_rerun_skips_finished_stages_and_manifest(job):
    marks, marks_after = job["marks"]
    assert len(marks) == 11 and marks == marks_after  # no stage recommitted
    manifest = json.loads((job["out"] / "manifest.json").read_text())

    def decided(summary: dict) -> dict:  # all but the stages' wall times
        return {key: value for key, value in summary.items() if key != "stage_seconds"}

    assert decided(manifest["summary"]) == decided(job["submitted_manifest"]["summary"])  # the rerun's is the job's
    assert manifest["config"]["train"]["epochs"] == 4
    assert set(manifest["stages"]) == {"pool", "split", "score_subset", "extrapolate", "select", "final_train",
                                       "test_pool", "evaluate", "random_baseline", "final_train_random",
                                       "evaluate_random"}
    assert manifest["summary"]["training_steps"] == 12
    assert sum(manifest["summary"]["embedded_rows_per_node"].values()) == 600
    assert not list(job["out"].glob("*/.*partial"))  # no temporary directories left


def test_a_rerun_with_other_options_is_refused_then_archives_exactly_the_stale_stages(job, tmp_path):
    """On a copy of the real run: its records name what changed, and archiving moves only
    the stages made from it, byte for byte (the unit tests in test_output_dir.py use fake
    records; these are the stages' own)."""
    import dataclasses
    import shutil

    from rayprune.config import ConfigError
    from rayprune.pipeline import planned_stages, prepare_output_dir
    from rayprune.preflight import preflight

    out = tmp_path / "copy"
    shutil.copytree(job["out"], out)
    config = dataclasses.replace(job["config"], output_dir=str(out), publish_uri="")
    assert {p.parent.name for p in out.glob("*/_COMMITTED.json")} == set(planned_stages(config))
    preflight(config)  # the same options: nothing stale
    changed = dataclasses.replace(config, extrapolation=dataclasses.replace(config.extrapolation, k=6))
    with pytest.raises(ConfigError, match=r"stage extrapolate \(extrapolation\.k: 5 -> 6\), and of select, "
                                          r"final_train, evaluate made from them"):
        preflight(changed)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    prepare_output_dir(dataclasses.replace(changed, stale_results="archive"))
    moved = {p.name.split("-")[0]: p for p in (out / "_archive").iterdir()}
    assert set(moved) == {"extrapolate", "select", "final_train", "evaluate"}
    assert not (out / "manifest.json").exists()  # a run in progress has no manifest
    for rel, content in before.items():
        stage = rel.parts[0]
        if stage == "manifest.json":
            continue
        now = moved[stage] / rel.relative_to(stage) if stage in moved else out / rel
        assert now.read_bytes() == content


def test_ray_data_paces_the_training_streams_scheduling_loop(job):
    """The pacer is a Ray Data execution callback: Ray must call it on the stream's loop,
    and a step taken while the consumer has blocks waiting starts at least an interval
    after the one before it."""
    from rayprune.stages.stream import MIN_STEP_INTERVAL_S

    paced = job["paced"]
    assert paced["rows"] == paced["pool_rows"]  # nothing excluded: every row of the pruned pool
    times = np.array([t for t, _ in paced["steps"]])
    served = np.array([s for _, s in paced["steps"]])
    assert len(times) >= 2 and served[1:].any()
    gaps = np.diff(times)[served[1:]]  # a step taken while the consumer had blocks waiting
    assert gaps.min() >= MIN_STEP_INTERVAL_S - 1e-3  # sleep never ends early; clock rounding


def test_one_pass_of_the_training_stream_reads_each_streamed_row_at_most_once(job):
    """Streamed rows are the pruned pool's synthetic training rows (no validation or real
    row), decoded to the stored bytes, each at most once per pass, the workers' shares
    equal, and at most a batch per worker dropped."""
    one_pass, pool = job["one_pass"], job["pool"]
    by_bytes = {bytes(b): int(i) for b, i in zip(pool["image"].to_pylist(), pool["id"].to_pylist())}
    labels = dict(zip(pool["id"].to_pylist(), pool["label"].to_pylist()))
    seen = []
    for batches in one_pass["batches"]:
        assert batches is not None, "a reader did not finish its pass"
        ids = [by_bytes[img.tobytes()] for images, _ in batches for img in images]
        assert [labels[i] for i in ids] == [int(v) for _, lab in batches for v in lab]
        seen.append(ids)
    assert len({len(ids) for ids in seen}) == 1  # equal shares: the workers step in lockstep
    flat = [i for ids in seen for i in ids]
    assert len(flat) == len(set(flat))  # no row twice in a pass
    assert set(flat) <= set(one_pass["expected_ids"].tolist())
    assert len(flat) > len(one_pass["expected_ids"]) - len(seen) * one_pass["batch"]


def test_final_model_and_evaluation(job):
    """The evaluation's clean accuracy equals a direct computation with the saved model."""
    summary = job["summary"]
    metrics = summary.robust_metrics
    assert metrics["n"] == 120
    order = ("clean", "apgd_ce", "apgd_t", "fab_t", "square")
    assert set(metrics) == {*order, "worst", "n"}
    assert all(metrics[a] >= metrics[b] for a, b in zip(order, order[1:]))  # the AutoAttack cascade
    assert metrics["worst"] == metrics["square"]
    per_sample = pq.read_table(summary.outputs["evaluation"]).to_pandas()
    assert (per_sample["broken_by"] == "").mean() == pytest.approx(metrics["worst"])  # the survivors
    protocol = json.loads((job["out"] / "evaluate" / "protocol.json").read_text())
    assert protocol["protocol"] == "autoattack" and not protocol["standard"]  # the tiny job's budgets are reduced
    assert "Square queries 20 < 5000" in protocol["reductions"] and summary.evaluation.endswith(protocol["label"])
    manifest = json.loads((job["out"] / "manifest.json").read_text())
    test_dir = manifest["stages"]["test_pool"]["outputs"]["path"]  # the demo test split the run generated
    test = pads.dataset(pool_files(test_dir), format="parquet").to_table().sort_by("id")
    model = model_from_config(job["config"], 3, 3)
    model.load_state_dict(torch.load(summary.outputs["final_model"], weights_only=True))
    model.eval()
    with torch.no_grad():
        logits = model(to_float_images(decode_images(test["image"], (8, 8, 3))))
    clean = (logits.argmax(1).numpy() == test["label"].to_numpy()).mean()
    assert metrics["clean"] == pytest.approx(clean)
    per_sample = pq.read_table(summary.outputs["evaluation"]).to_pandas()
    assert sorted(per_sample.id) == sorted(test["id"].to_pylist())
    assert summary.final_training_steps == 6  # 2 epochs x 3 steps, the explicit budget
    assert summary.final_data_loading.startswith("stream; set by final.data_loading")
    assert [h["epoch"] for h in manifest["final_history"]] == [0, 1]
    # Streamed: of each epoch's training time, how long it waited for batches (the first
    # epoch's includes starting the stream, so it is never zero).
    assert all(0.0 <= h["stream_wait_seconds"] <= h["train_seconds"] for h in manifest["final_history"])
    assert manifest["final_history"][0]["stream_wait_seconds"] > 0.0
    compute = manifest["summary"]["compute"]
    assert compute["scoring_recording"]["spent"] < compute["scoring_recording"]["whole_pool"]


def test_mlflow_records_runs_datasets_artifacts_and_registry(job):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(job["uri"])
    experiment = client.get_experiment_by_name("rayprune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2  # the job and its rerun
    parent = sorted(parents, key=lambda r: r.info.start_time)[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "4" and parent.data.params["extrapolation.k"] == "5"
    assert parent.data.metrics["kept"] == job["summary"].kept
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"pool", "split", "score_subset", "extrapolate", "select", "final_train", "evaluate",
                             "register", "random_baseline"}
    history = client.get_metric_history(children["score_subset"].info.run_id, "adv_acc")
    assert [m.step for m in history] == [0, 1, 2, 3]
    final_curve = client.get_metric_history(children["final_train"].info.run_id, "val_robust_acc")
    assert [m.step for m in final_curve] == [0, 1]
    waits = client.get_metric_history(children["final_train"].info.run_id, "stream_wait_seconds")
    manifest_history = json.loads((job["out"] / "manifest.json").read_text())["final_history"]
    assert [m.value for m in sorted(waits, key=lambda m: m.step)] == pytest.approx(
        [h["stream_wait_seconds"] for h in manifest_history])
    assert children["evaluate"].data.metrics["test_n"] == 120
    assert children["evaluate"].data.metrics["test_worst"] == pytest.approx(job["summary"].robust_metrics["worst"])
    manifest = json.loads((job["out"] / "manifest.json").read_text())
    datasets = {d.dataset.name: d for r in children.values() for d in r.inputs.dataset_inputs}
    assert datasets["pool"].dataset.digest == manifest["digests"]["pool"]
    assert datasets["pruned pool"].dataset.digest == manifest["digests"]["select"]
    assert "scored subset" in datasets and "test set" in datasets
    artifacts = {a.path for a in client.list_artifacts(children["select"].info.run_id)}
    assert {"kept_ids.parquet", "composition_label.png", "composition_source.png"} <= artifacts
    assert "score_distributions.png" in {a.path for a in client.list_artifacts(children["extrapolate"].info.run_id)}

    versions = client.search_model_versions("name = 'rayprune-robust'")
    assert len(versions) == 1  # the rerun found its model already registered
    model = client.get_registered_model("rayprune-robust")
    assert model.aliases == {"candidate": 1, "champion": 1} or model.aliases == {"candidate": "1", "champion": "1"}
    tags = versions[0].tags
    assert tags["pruned_dataset_digest"] == manifest["digests"]["select"]
    assert tags["scoring_run_id"] == children["score_subset"].info.run_id
    assert float(tags["robust_accuracy"]) == pytest.approx(job["summary"].robust_metrics["worst"])
    description = versions[0].description  # what it was trained on and the per-attack table
    metrics = job["summary"].robust_metrics
    assert f"kept: {job['summary'].kept:,} rows" in description and "dynamic_uncertainty" in description
    for name in ("clean", *AUTOATTACK):
        assert f"| {name} | {metrics[name]:.4f} |" in description
    assert f"| **worst case** | **{metrics['worst']:.4f}** |" in description

    mlflow.set_tracking_uri(job["uri"])
    try:
        loaded = mlflow.pytorch.load_model("models:/rayprune-robust@champion")
    finally:
        mlflow.set_tracking_uri(None)
    test_dir = manifest["stages"]["test_pool"]["outputs"]["path"]
    test = pads.dataset(pool_files(test_dir), format="parquet").to_table().sort_by("id")
    with torch.no_grad():
        logits = loaded(to_float_images(decode_images(test["image"], (8, 8, 3))))  # exported in eval mode
    clean = (logits.argmax(1).numpy() == test["label"].to_numpy()).mean()
    assert clean == pytest.approx(children["evaluate"].data.metrics["test_clean"])


def test_probe_quality_report_matches_direct_computation(job):
    from scipy import stats

    refs = pq.read_table(job["summary"].outputs["subset_embeddings"]).to_pandas().set_index("id")
    probe = pq.read_table(job["out"] / "extrapolate" / "probe.parquet").to_pandas()
    assert len(probe) == 9  # 10% of the 90 scored samples
    np.testing.assert_allclose(probe["measured"], refs.loc[probe["id"], "score"])
    quality = json.loads((job["out"] / "extrapolate" / "quality.json").read_text())
    chosen = quality["chosen"]
    assert chosen["model"] == "learned" and quality["variants"][0] == chosen  # the default, measured first
    # The configured kNN variant's probe entry: k=5 uniform neighbours among the other 81 references.
    others = refs.drop(index=probe["id"])
    emb = np.stack(others["embedding"].to_numpy()).astype(np.float64)
    q = np.stack(refs.loc[probe["id"], "embedding"].to_numpy()).astype(np.float64)
    nearest = np.argsort(((q[:, None] - emb[None]) ** 2).sum(-1), axis=1)[:, :5]
    knn = others["score"].to_numpy()[nearest].mean(1)
    (entry,) = [v for v in quality["variants"] if v["name"] == "knn k=5 uniform euclidean"]
    assert entry["probe_spearman"] == pytest.approx(stats.spearmanr(probe["measured"], knn)[0])
    assert chosen["probe_spearman"] == pytest.approx(stats.spearmanr(probe["measured"], probe["extrapolated"])[0])
    assert chosen["probe_pearson"] == pytest.approx(stats.pearsonr(probe["measured"], probe["extrapolated"])[0])
    k = round(0.4 * 9)
    top_m = set(probe.nlargest(k, "measured").index)
    top_e = set(probe.nlargest(k, "extrapolated").index)
    assert chosen["probe_kept_overlap"] == pytest.approx(len(top_m & top_e) / k)
    assert job["summary"].extrapolation_quality == chosen
    # Probe rows keep their measured scores in the scores table.
    table = job["scores"].set_index("id")
    assert table.loc[probe["id"], "measured"].all()
    np.testing.assert_allclose(table.loc[probe["id"], "score"], probe["measured"])


def test_random_baseline_has_the_same_size_composition_and_budget(job):
    out = job["out"]
    chosen = read_pool_info(job["summary"].outputs["pruned_pool"])
    random = read_pool_info(out / "random_baseline" / "pruned_pool")
    assert random.num_rows == chosen.num_rows and random.sources == chosen.sources
    table = pads.dataset(pool_files(out / "random_baseline" / "pruned_pool"), format="parquet").to_table()
    pool = job["pool"]
    real_ids = set(np.asarray(pool["id"])[np.asarray(pool["source"].to_pylist()) == "real"])
    assert real_ids <= set(table["id"].to_pylist())  # real samples kept here too
    syn = job["scores"][job["scores"].source == "synthetic"]
    kept_syn = syn[syn.id.isin(table["id"].to_pylist())]
    sizes = syn.groupby("label").size()
    quotas = dict(zip(sizes.index, class_quotas(sizes.to_numpy(), len(kept_syn))))
    assert kept_syn.groupby("label").size().to_dict() == quotas  # class-balanced like the selection
    selected = set(pq.read_table(job["summary"].outputs["kept_ids"])["id"].to_pylist())
    assert set(kept_syn.id) != selected & set(syn.id)  # a different subset
    history = json.loads((out / "final_train_random" / "history.json").read_text())["history"]
    assert len(history) == 2  # the same explicit budget as the final training
    metrics = job["summary"].random_baseline_metrics
    assert metrics["n"] == 120 and 0.0 <= metrics["worst"] <= metrics["clean"] <= 1.0


def test_finished_products_are_published_with_a_complete_marker(job):
    from rayprune.storage import read_published

    published = job["out"].parent / "published"
    record = read_published(str(published))
    assert record is not None and job["summary"].published_uri == str(published)
    for name, size in record["files"].items():
        assert (published / name).stat().st_size == size
        assert (published / name).read_bytes() == (job["out"] / name).read_bytes()
    names = set(record["files"])
    assert "manifest.json" in names and "final_train/model.pt" in names
    assert any(n.startswith("extrapolate/scores/") for n in names)
    assert any(n.startswith("select/pruned_pool/") for n in names)


def test_an_evaluation_sharded_over_three_actors_equals_one_process_evaluating_it_all(job):
    """Seeds follow global batch indices: 4 batches over 3 Ray actors give exactly what one
    in-process call over the whole test set gives."""
    from rayprune.robust.evaluation import robust_correct
    from rayprune.stages.evaluate import EVALUATION_SEED, eval_config

    config, test = job["sharded"]["config"], job["sharded"]["test"]
    table = pads.dataset(pool_files(test.path), format="parquet").to_table().sort_by("id")
    model = model_from_config(config, 3, 3)
    model.load_state_dict(torch.load(job["summary"].outputs["final_model"], weights_only=True))
    model.eval()
    x = to_float_images(decode_images(table["image"], (8, 8, 3)))
    y = torch.as_tensor(table["label"].to_numpy())
    want = robust_correct(model, x, y, eval_config(config), generator=torch.Generator().manual_seed(EVALUATION_SEED))
    got = pq.read_table(job["sharded"]["result"].per_sample_file).to_pandas().sort_values("id")
    np.testing.assert_array_equal(got["id"].to_numpy(), table["id"].to_numpy())
    assert len(table) == 120 and config.evaluation.batch_size == 32  # 4 batches over 3 actors
    for name, column in want.items():
        np.testing.assert_array_equal(got[name].to_numpy(), column, err_msg=name)


def test_the_job_ran_under_ray_job_submit_and_tracked_to_the_server_its_runtime_env_named(job):
    from mlflow.tracking import MlflowClient

    submitted = job["submitted"]
    assert "succeeded" in submitted.stdout + submitted.stderr
    assert "rayprune summary" in submitted.stdout
    summary = job["submitted_manifest"]["summary"]
    assert summary["pool_size"] == 600 and summary["scored"] == 90
    client = MlflowClient(job["uri"])
    runs = client.search_runs([client.get_experiment_by_name("rayprune").experiment_id])
    first = min((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert first.info.status == "FINISHED" and first.data.params["output_dir"] == str(job["out"])
    assert client.get_registered_model("rayprune-robust").aliases["champion"] in (1, "1")


def test_the_job_console_shows_its_epochs_without_ray_noise(job):
    """The submitted job's console: the job's own line per epoch, without Ray Train's two
    lines per report, Ray Data's stale no-free-CPU warning (rayprune.ray_logs) or torch's
    warning on a read-only array."""
    from rayprune.ray_logs import RAY_DATA_NO_FREE_CPU, RAY_TRAIN_PER_REPORT

    console = job["submitted"].stdout + job["submitted"].stderr
    epochs = job["config"].train.epochs, job["config"].final.train.epochs
    assert f"scoring epoch {epochs[0]}/{epochs[0]}" in console and f"final epoch {epochs[1]}/{epochs[1]}" in console
    for noise in (RAY_DATA_NO_FREE_CPU, *RAY_TRAIN_PER_REPORT, "NumPy array is not writable"):
        assert noise not in console, noise
