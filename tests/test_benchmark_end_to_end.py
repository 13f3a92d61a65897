"""The end-to-end benchmark (three small pipelines) runs in CI-sized form with well-formed,
self-consistent results (never its speed)."""

import pytest
from conftest import run_ci_benchmarks


@pytest.fixture(scope="module")
def ray_suite_ci(tmp_path_factory):
    return run_ci_benchmarks(["end_to_end"], tmp_path_factory.mktemp("bench") / "results.json")


@pytest.mark.slow
def test_end_to_end_and_fidelity_results_are_well_formed(ray_suite_ci):
    import math

    results = {r["benchmark"]: r for r in ray_suite_ci["results"]}
    assert set(results) == {"end_to_end", "fidelity"}
    assert results["end_to_end"]["comparisons"]  # fidelity ratios need correlations the ci pool is too small for
    for res in results.values():
        for c in res["comparisons"]:
            assert math.isfinite(c["ratio"]) and c["baseline_value"] != 0, c
            assert c["met"] is None or c["met"] == (c["ratio"] >= c["target"]), c


@pytest.mark.slow
def test_end_to_end_compute_matches_the_budget_formula(ray_suite_ci):
    """Recording passes: epochs x (attack steps + 2) per scored sample, counted independently here."""
    from benchmarks.end_to_end import PRESETS

    p = PRESETS["ci"]
    rows = {r["run"]: r for r in next(r for r in ray_suite_ci["results"] if r["benchmark"] == "end_to_end")["rows"]}
    per_sample = p["train.epochs"] * (p["attack.steps"] + 2)
    for run in ("subset", "full", "full_seed1"):
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
