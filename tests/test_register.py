"""The registered model's description: written out by hand for a known small case."""

from __future__ import annotations

from types import SimpleNamespace

from rayprune.config import load_config
from rayprune.stages.register import evaluation_table, model_description


def test_the_autoattack_table_is_cumulative_with_the_worst_case_last():
    metrics = {"clean": 0.8, "apgd_ce": 0.5, "apgd_t": 0.45, "fab_t": 0.45, "square": 0.4375, "worst": 0.4375,
               "n": 16}
    protocol = {"protocol": "autoattack", "attacks": ["apgd_ce", "apgd_t", "fab_t", "square"]}
    assert evaluation_table(metrics, protocol) == [
        "| attack | robust accuracy (after this and every attack above) |", "|---|---|",
        "| clean | 0.8000 |", "| apgd_ce | 0.5000 |", "| apgd_t | 0.4500 |", "| fab_t | 0.4500 |",
        "| square | 0.4375 |", "| **worst case** | **0.4375** |"]
    every = evaluation_table({"clean": 1.0, "pgd_ce": 0.25, "worst": 0.25}, {"protocol": "every_attack",
                                                                            "attacks": ["clean", "pgd_ce"]})
    assert every[0] == "| attack | accuracy under this attack |"
    assert every[2:] == ["| clean | 1.0000 |", "| pgd_ce | 0.2500 |", "| **worst case** | **0.2500** |"]


def test_the_description_names_the_pool_the_kept_share_the_recipe_and_the_warning():
    config = load_config(None, {"selection.keep_fraction": "0.25", "extrapolation.model": "knn",
                                "extrapolation.k": "7"})
    pool = SimpleNamespace(path="/data/pool", info=SimpleNamespace(num_rows=2000), digest="abcdef0123456789")
    selected = SimpleNamespace(kept=650)
    evaluation = SimpleNamespace(metrics={"clean": 0.5, "worst": 0.25, "n": 500}, protocol={
        "protocol": "autoattack", "attacks": [], "label": "reduced (Square queries 500 < 5000)",
        "warning": "Square beat the gradient attacks"})
    text = model_description(config, pool, selected, evaluation)
    assert "- pool: the generated demo pool (2,000 rows, digest abcdef012345)" in text  # pool.path empty = demo
    assert "- kept: 650 rows (32.5% of the pool; selection.keep_fraction 0.25 of the prunable sources synthetic" in text
    assert "extrapolated by the knn model (k=7)" in text and "dynamic_uncertainty on adv inputs" in text
    assert "- evaluation on 500 test images: autoattack, reduced (Square queries 500 < 5000)" in text
    assert "float32" in text and "[0, 1]" in text and "NCHW" in text
    assert text.endswith("Warning: Square beat the gradient attacks")
