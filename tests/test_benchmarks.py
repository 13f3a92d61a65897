"""The benchmark suite runs in CI-sized form and produces well-formed results (never its speed)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.report import BenchResult, Comparison, markdown_table, read_json, write_json
from benchmarks.report import main as report_main
from benchmarks.run import run_suite


def test_comparison_ratio_when_higher_is_better():
    c = Comparison("search", "base", "cand", "queries/s", baseline_value=200.0, candidate_value=500.0, target=2.0)
    assert c.ratio == pytest.approx(2.5)  # 500 / 200
    assert c.met is True
    assert Comparison("s", "b", "c", "q/s", 200.0, 300.0, target=2.0).met is False  # 1.5 < 2


def test_comparison_ratio_when_lower_is_better():
    c = Comparison("run", "base", "cand", "seconds", baseline_value=30.0, candidate_value=12.0,
                   higher_is_better=False, target=2.0)
    assert c.ratio == pytest.approx(2.5)  # 30 / 12: the candidate takes less time, so it wins
    assert c.met is True
    slower = Comparison("run", "b", "c", "seconds", 10.0, 40.0, higher_is_better=False, target=0.5)
    assert slower.ratio == pytest.approx(0.25)
    assert slower.met is False


def test_comparison_without_target_or_with_zero_denominator():
    assert Comparison("x", "b", "c", "m", 1.0, 2.0).met is None
    assert Comparison("x", "b", "c", "m", 0.0, 2.0).ratio == math.inf
    assert Comparison("x", "b", "c", "m", 2.0, 0.0, higher_is_better=False).ratio == math.inf
    assert Comparison("x", "b", "c", "m", 2.0, 1.0, target=1.0).to_dict()["ratio"] == pytest.approx(0.5)


def test_results_read_back_from_json_render_the_same_table(tmp_path, capsys):
    a = BenchResult("neighbours", "full", {"queries": 10}, rows=[{"v": 1}], notes=["n"], seconds=3.0,
                    comparisons=[Comparison("search", "flat", "exact", "queries/s", 200.0, 500.0, target=0.9)])
    b = BenchResult("scaling", "full", {}, seconds=60.0,
                    comparisons=[Comparison("memory", "10k", "1M", "MiB", 900.0, 1000.0, higher_is_better=False)])
    write_json([a], tmp_path / "a.json", "full")
    write_json([b], tmp_path / "b.json", "full")
    machine, (back,) = read_json(tmp_path / "a.json")
    assert machine["cpus"] >= 1
    assert (back.benchmark, back.params, back.rows, back.notes, back.seconds) == ("neighbours", {"queries": 10},
                                                                                  [{"v": 1}], ["n"], 3.0)
    assert markdown_table([back]) == markdown_table([a])
    assert report_main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert markdown_table([a, b]) in capsys.readouterr().out  # one table for both runs
    assert report_main([]) == 2


@pytest.fixture(scope="module")
def neighbours_ci() -> BenchResult:
    (result,) = run_suite("ci", only=["neighbours"])
    return result


def test_neighbours_benchmark_is_well_formed(neighbours_ci):
    res = neighbours_ci
    assert res.benchmark == "neighbours" and res.preset == "ci" and res.seconds > 0
    from benchmarks.neighbours import HARD_DATA

    data_sets = ["clustered", *HARD_DATA]
    # exact x3; (approx, ivf) x (speed, recall) per data set
    assert len(res.comparisons) == 3 + 2 * 2 * len(data_sets) and res.notes
    for c in res.comparisons:
        for value in (c.baseline_value, c.candidate_value, c.ratio):
            assert math.isfinite(value) and value > 0, c
        assert c.target is not None and isinstance(c.met, bool)
    rows = {(row["data"], row["variant"]): row for row in res.rows}
    assert set(rows) == {("clustered", v) for v in ("exact", "faiss_flat", "exact_extrapolation", "naive",
                                                    "approx_calibrated", "ivf_calibrated")} | {
        (data, v) for data in HARD_DATA for v in ("exact", "approx_calibrated", "ivf_calibrated")}
    for row in rows.values():
        assert row["queries_timed"] > 0 and row["queries_per_s"] > 0
    clustered = {v: row for (d, v), row in rows.items() if d == "clustered"}
    assert clustered["naive"]["queries_timed"] <= res.params["queries"]  # usually a subsample
    assert clustered["faiss_flat"]["agrees_with_exact"] is True
    assert clustered["naive"]["agrees_with_exact"] is True
    assert clustered["exact_extrapolation"]["same_neighbours_as_exact"] is True
    for (data, variant), row in rows.items():
        if variant.endswith("_calibrated"):
            # Calibrated on a sample, the recall over every query stays near the target.
            assert row[f"recall_at_{res.params['k']}"] >= res.params["min_recall"] - 0.03, (data, variant, row)
            assert row["calibrated"]["recall"] >= res.params["min_recall"]
        if variant == "ivf_calibrated":
            # More probes visit a superset of lists, so recall cannot fall as the width grows.
            k, fixed = res.params["k"], row[f"recall_at_{res.params['k']}_fixed_probes"]
            width = row["calibrated"]["search_width"]
            if width is None or width >= row["fixed_probes"]:  # None: exact search, recall 1
                assert row[f"recall_at_{k}"] >= fixed - 1e-9, (data, row)
            else:
                assert fixed >= row[f"recall_at_{k}"] - 1e-9, (data, row)
    assert res.params["torch_threads"] == res.params["faiss_threads"]


def test_unclustered_data_has_the_stated_spectrum_and_no_clusters():
    from benchmarks.neighbours import SPECTRUM_DECAY, spectrum_data

    p = {"queries": 20_000, "references": 20_000, "dims": 16}
    queries, references = spectrum_data(p)
    for x in (queries, references):
        assert x.shape == (20_000, 16) and x.dtype == np.float32
        expected = np.arange(1, 17) ** -SPECTRUM_DECAY
        np.testing.assert_allclose(x.std(axis=0), expected, rtol=0.03)
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.03)
        # One Gaussian: every dimension's kurtosis is a normal's 3 (a mixture's is not).
        z = (x - x.mean(axis=0)) / x.std(axis=0)
        np.testing.assert_allclose((z**4).mean(axis=0), 3.0, atol=0.15)


def test_neighbours_table_and_json(neighbours_ci, tmp_path):
    table = markdown_table([neighbours_ci])
    lines = table.splitlines()
    assert len(lines) == 2 + len(neighbours_ci.comparisons)
    for c in neighbours_ci.comparisons:
        assert sum(f"{c.what}: {c.candidate} vs {c.baseline}" in line for line in lines) == 1
    path = tmp_path / "out" / "bench.json"
    write_json([neighbours_ci], path, "ci")
    data = json.loads(path.read_text())
    assert data["preset"] == "ci"
    assert data["machine"]["cpus"] >= 1 and data["machine"]["faiss"] and data["machine"]["torch"]
    (saved,) = data["results"]
    assert saved["benchmark"] == "neighbours"
    assert [c["ratio"] for c in saved["comparisons"]] == pytest.approx([c.ratio for c in neighbours_ci.comparisons])


RAY_BENCHMARKS = ["embedding", "training_step", "scaling", "streaming", "end_to_end"]


@pytest.fixture(scope="module")
def ray_suite_ci(tmp_path_factory):
    """The Ray benchmarks at their CI size, through the same entry point as the command, on
    one local Ray instance (each would otherwise start and stop its own)."""
    import ray

    from benchmarks.run import main

    out = tmp_path_factory.mktemp("bench") / "results.json"
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20, dashboard_host="127.0.0.1")
    try:
        assert main(["--preset", "ci", "--only", ",".join(RAY_BENCHMARKS), "--json", str(out)]) == 0
    finally:
        ray.shutdown()
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ray_benchmarks_run_and_write_well_formed_results(ray_suite_ci):
    results = {r["benchmark"]: r for r in ray_suite_ci["results"]}
    assert set(results) == {"embedding", "training_step", "scaling", "streaming", "end_to_end", "fidelity"}
    assert ray_suite_ci["preset"] == "ci" and ray_suite_ci["machine"]["cpus"] >= 1
    for name, res in results.items():
        # Fidelity ratios need positive correlations, which the ci pool is too small to give.
        assert res["comparisons"] or name == "fidelity", name
        for c in res["comparisons"]:
            assert math.isfinite(c["ratio"]) and c["baseline_value"] != 0, (name, c)
            assert c["met"] is None or c["met"] == (c["ratio"] >= c["target"]), (name, c)
    # The two paths of the embedding and training benchmarks did the same work.
    assert all(row["max_embedding_difference"] <= 1e-3 for row in results["embedding"]["rows"])
    assert results["training_step"]["rows"][0]["max_loss_difference"] <= 1e-3


@pytest.mark.slow
def test_end_to_end_compute_matches_the_budget_formula(ray_suite_ci):
    """Recording passes: epochs x (attack steps + 2) per scored sample, counted independently here."""
    from benchmarks.end_to_end import PRESETS

    p = PRESETS["ci"]
    rows = {r["run"]: r for r in next(r for r in ray_suite_ci["results"] if r["benchmark"] == "end_to_end")["rows"]}
    per_sample = p["train.epochs"] * (p["attack.steps"] + 2)
    assert set(rows) == {"subset", "full"}  # the ceiling's run stops after scoring: no compute row
    for run in ("subset", "full"):
        assert rows[run]["recording_passes"] == rows[run]["scored"] * per_sample
    assert rows["full"]["scored"] == p["pool.demo.n_synthetic"]  # every prunable sample scored
    assert rows["subset"]["scored"] == round(0.1 * p["pool.demo.n_synthetic"])
    assert rows["subset"]["training_passes"] == rows["full"]["training_passes"]  # the same step budget
    assert rows["subset"]["pool_pass"] == rows["subset"]["pool"]  # one forward pass per row (clean signals)
    fidelity = next(r for r in ray_suite_ci["results"] if r["benchmark"] == "fidelity")
    for row in fidelity["rows"]:
        for key in ("ceiling", "subset_own", "learned", "knn_default", "best_knn", "learned_probe", "knn_probe"):
            assert -1.0 <= row[key] <= 1.0, (key, row)
        assert row["best_knn"] >= row["knn_default"]  # the default is one of the variants
        assert row["learned_probe_bias"] == pytest.approx(row["learned_probe"] - row["learned"])
        assert row["n_rest"] == p["pool.demo.n_synthetic"] - rows["subset"]["scored"]


@pytest.mark.slow
def test_scaling_reports_every_size(ray_suite_ci):
    from benchmarks.scaling import PRESETS

    scaling = next(r for r in ray_suite_ci["results"] if r["benchmark"] == "scaling")
    assert [row["rows"] for row in scaling["rows"]] == PRESETS["ci"]["sizes"]
    for row in scaling["rows"]:
        assert row["seconds"] > 0 and row["driver_peak_mib"] > 0 and row["workers_peak_total_mib"] > 0


CPU_PROBE = """
import sys, threading, time
spun, done = threading.Event(), threading.Event()
def spin():  # stays alive after spinning: /proc lists live threads only
    end = time.thread_time() + 0.4
    while time.thread_time() < end:
        pass
    spun.set()
    done.wait()
t = threading.Thread(target=spin); t.start(); spun.wait()
print(time.process_time(), flush=True)
sys.stdin.readline()
done.set(); t.join()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_cpu_accounting_matches_what_a_child_process_measured_of_itself():
    """A child (titled ``cpu-probe``) spins one thread for 0.4 CPU-seconds, prints its own
    CPU time and waits: the snapshots must give it that much CPU, most of it in one thread."""
    import subprocess
    import sys
    import time

    from benchmarks.common import cores_between, cpu_snapshot

    before, started = cpu_snapshot(threads_of="cpu-probe"), time.monotonic()
    child = subprocess.Popen(["cpu-probe", "-c", CPU_PROBE], executable=sys.executable, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        own = float(child.stdout.readline())
        after, seconds = cpu_snapshot(threads_of="cpu-probe"), time.monotonic() - started
    finally:
        child.communicate("\n", timeout=30)
    by_title, threads = cores_between(before, after, seconds)
    assert by_title["cpu-probe"] * seconds == pytest.approx(own, abs=0.03)  # /proc counts in 10 ms ticks
    assert threads[0] * seconds == pytest.approx(0.4, abs=0.03)  # the spinning thread, busiest first
    assert sum(threads) * seconds == pytest.approx(own, abs=0.03)


def test_unknown_pool_kinds_are_refused_naming_the_allowed_ones(capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "small", "--only", "end_to_end", "--kinds", "default,nope"])
    assert exit_info.value.code == 2
    assert "unknown pool kind(s) nope for preset small; allowed: default, noisy, 4 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_streaming_benchmark_trains_both_paths_at_every_size(ray_suite_ci):
    from benchmarks.streaming import PRESETS

    p = PRESETS["ci"]
    streaming = next(r for r in ray_suite_ci["results"] if r["benchmark"] == "streaming")
    assert [(row["rows"], row["loading"]) for row in streaming["rows"]] == [
        (n, loading) for n in p["sizes"] for loading in ("memory", "stream")]
    for row in streaming["rows"]:
        assert row["repeat"] == 0  # the ci preset runs one pair
        assert len(row["losses"]) == p["epochs"] and all(math.isfinite(v) for v in row["losses"])
        assert row["samples_per_s"] > 0 and row["worker_peak_single_mib"] > 0
        waits = row["stream_wait_seconds"]
        if row["loading"] == "stream":
            assert all(0 <= w <= t for w, t in zip(waits, row["train_seconds"], strict=True)), row
        else:
            assert waits == [None] * p["epochs"]
        # Private memory is part of RSS (read a moment later, so a little slack).
        assert 0 < row["worker_peak_single_private_mib"] <= row["worker_peak_single_mib"] + 64
        # The second epoch's CPU: the worker's threads are the worker; Ray Data runs only when streaming.
        assert 0 < row["epoch2_seconds"] <= sum(row["train_seconds"]) + 30, row
        assert sum(row["epoch2_worker_thread_cores"]) <= row["epoch2_worker_cores"] + 0.02 / row["epoch2_seconds"]
        assert row["epoch2_worker_cores"] > 0 and row["epoch2_other_cores"] >= 0
        if row["loading"] == "memory":  # (the suite's other benchmarks share this Ray: only the stream's own)
            assert not any("SplitCoordinator" in title for title in row["epoch2_cores_by_process"]), row
    assert any("cores used in the second epoch" in note for note in streaming["notes"])


def test_streaming_throughput_compares_medians_over_alternating_pairs():
    from benchmarks.streaming import throughput_comparison

    speeds = {("memory", 0): 700.0, ("stream", 0): 560.0, ("memory", 1): 760.0, ("stream", 1): 740.0,
              ("memory", 2): 720.0, ("stream", 2): 700.0}
    rows = [{"rows": 400_000, "loading": loading, "repeat": i, "samples_per_s": v}
            for (loading, i), v in speeds.items()]
    c = throughput_comparison(rows)
    assert (c.baseline_value, c.candidate_value) == (720.0, 700.0)  # medians, not one pair
    assert c.ratio == pytest.approx(700 / 720) and c.met is True
    assert "median of 3 alternating pair(s), pair ratios 0.80x, 0.97x, 0.97x" in c.note
    assert "400,000 rows" in c.what


def test_kept_truth_counts_the_demo_pools_hidden_truth_over_kept_synthetic_rows():
    from benchmarks.end_to_end import demo_truth, kept_truth
    from rayprune.config import load_config
    from rayprune.data.demo_pool import generate_rows

    config = load_config(None, {"pool.demo.n_real": 50, "pool.demo.n_synthetic": 450, "pool.demo.label_noise": 0.2,
                                "pool.demo.duplicate_fraction": 0.3})
    rows = generate_rows(config.pool.demo)
    dups = [int(i) for i in rows.ids if rows.duplicate_of[i] >= 0]
    truth = demo_truth(config)
    real_and_dups = kept_truth(truth, [*range(50), *dups])  # real rows are not counted
    assert real_and_dups["kept_duplicates"] == 1.0
    flipped = [i for i in range(50, 500) if rows.labels[i] != rows.true_labels[i]]
    assert kept_truth(truth, flipped)["kept_flipped"] == 1.0
    half = list(range(50, 500, 2))
    got = kept_truth(truth, half)
    assert got["kept_flipped"] == pytest.approx(sum(rows.labels[i] != rows.true_labels[i] for i in half) / len(half))
    assert got["kept_difficulty"] == pytest.approx(np.mean([rows.difficulty[i] for i in half]), rel=1e-6)
    assert demo_truth(load_config(None, {"pool.path": "/some/pool"})) is None  # no hidden truth in a real pool
    assert kept_truth(None, half) == {}
