"""Benchmarks 5 and 6: compute of the extrapolation pipeline, and fidelity of its scores.

Three runs of the job's own pipeline (final training off) on one demo pool:

* ``subset``: the default recipe, a 10% subset scored and the rest extrapolated;
* ``full``: the same step budget with every prunable sample scored directly
  (``split.subset_fraction=1.0``): the expensive truth;
* ``full_seed1``: the full run again with another training seed: the noise ceiling.

Benchmark 5 compares sample-gradient steps (training and recording passes counted
apart) and wall time of ``subset`` against ``full``. Benchmark 6 reports Spearman
correlations with the ``full`` scores: of the subset run's own scores on its subset, of
the extrapolated scores on the rest (the pipeline's choice and every variant of the
probe grid, recomputed from the pool's embeddings), and of ``full_seed1``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from benchmarks.common import local_ray
from benchmarks.report import BenchResult, Comparison
from rayprune.config import JobConfig, load_config

logger = logging.getLogger(__name__)

_CI = {"pool.demo.n_real": 100, "pool.demo.n_synthetic": 900, "pool.demo.image_size": 8,
       "pool.demo.num_classes": 3, "model.width": 8, "train.epochs": 4, "train.batch_size": 32,
       "attack.steps": 1, "scoring.window": 2, "extrapolation.k": 5, "ray.inference_batch_size": 256}
PRESETS = {
    "ci": _CI,
    "small": {"pool.demo.n_real": 400, "pool.demo.n_synthetic": 4000, "train.epochs": 15},
    "full": {"pool.demo.n_real": 1000, "pool.demo.n_synthetic": 10000, "train.epochs": 15},
}
STAGES = ("split", "score_subset", "extrapolate", "select")


def _config(preset: str, out: Path, **overrides) -> JobConfig:
    return load_config(None, {**PRESETS[preset], "output_dir": str(out), "final.enabled": "false",
                              "tracking.enabled": "false", "split.subset_fraction": 0.1, **overrides})


def _scores(path) -> dict[int, float]:
    table = pads.dataset(str(path), format="parquet").to_table(columns=["id", "score"])
    return dict(zip(table["id"].to_pylist(), table["score"].to_pylist()))


def _spearman(truth: dict, other: dict, ids) -> float:
    from rayprune.scoring.quality import spearman

    return spearman([truth[i] for i in ids], [other[i] for i in ids])


def _pool_embeddings(config: JobConfig, summary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, embeddings) of every pool row under the subset run's model, in one process."""
    from rayprune.data.pool import pool_files, read_pool_info
    from rayprune.robust.recording import compute_embeddings
    from rayprune.robust.training import to_float_images
    from rayprune.stages.training import load_model_file, load_rows

    pool_dir = Path(summary.outputs["pool"])
    info = read_pool_info(pool_dir)
    ids = np.arange(info.num_rows, dtype=np.int64)
    ids, images, labels, _ = load_rows(pool_files(pool_dir, info), ids, info.image_shape)
    model = load_model_file(config, summary.outputs["subset_model"], info.num_classes, info.image_shape[2]).eval()
    return ids, labels, compute_embeddings(model, to_float_images(images))


def _variant_fidelity(config: JobConfig, summary, truth: dict, query_ids: np.ndarray) -> list[dict]:
    """Spearman vs the full run on ``query_ids`` for every probe-grid variant."""
    from rayprune.scoring.extrapolate import extrapolate_scores
    from rayprune.scoring.quality import split_probe, spearman
    from rayprune.stages.extrapolate import _variant_config, read_references, variant_grid

    refs = read_references(Path(summary.outputs["subset_embeddings"]))
    probe = split_probe(len(refs["id"]), config.extrapolation.probe_fraction, config.split.seed)
    neighbours = {k: v[~probe] for k, v in refs.items()}
    ids, labels, emb = _pool_embeddings(config, summary)
    pos = np.searchsorted(ids, query_ids)
    want = np.asarray([truth[i] for i in query_ids])
    rows = []
    for k, w, m, sl in variant_grid(config, neighbours["label"]):
        result = extrapolate_scores(neighbours["embedding"], neighbours["score"], emb[pos],
                                    _variant_config(k, w, m, sl),
                                    reference_labels=neighbours["label"], query_labels=labels[pos])
        rows.append({"k": k, "weighting": w, "metric": m, "same_label": sl,
                     "spearman_vs_full": spearman(want, result.scores)})
    return rows


def _compute(summary) -> tuple[int, int]:
    c = summary.compute
    return c["scoring_training"]["spent"], c["scoring_recording"]["spent"]


def run(preset: str, workdir: Path) -> list[BenchResult]:
    from rayprune.pipeline import run_pipeline

    runs = {"subset": {}, "full": {"split.subset_fraction": 1.0}, "full_seed1": {"split.subset_fraction": 1.0,
                                                                                   "train.seed": 1}}
    summaries, configs, walls = {}, {}, {}
    with local_ray():
        for name, overrides in runs.items():
            configs[name] = _config(preset, workdir / name, **overrides)
            start = time.perf_counter()
            summaries[name] = run_pipeline(configs[name])
            walls[name] = time.perf_counter() - start
            logger.info("end_to_end: run %s took %.1f s", name, walls[name])

    sub, full = summaries["subset"], summaries["full"]
    stage_time = {n: sum(s.stage_seconds.get(st, 0.0) for st in STAGES) for n, s in summaries.items()}
    (sub_train, sub_rec), (full_train, full_rec) = _compute(sub), _compute(full)
    e2e = BenchResult("end_to_end", preset, dict(PRESETS[preset]))
    for name, s in summaries.items():
        train, rec = _compute(s)
        e2e.rows.append({"run": name, "scored": s.scored, "pool": s.pool_size, "training_passes": train,
                         "recording_passes": rec, "pipeline_seconds": stage_time[name],
                         "stage_seconds": s.stage_seconds})
    e2e.comparisons += [
        Comparison("scoring compute (training + recording)", "score the whole pool", "10% subset + extrapolate",
                   "sample-gradient steps", full_train + full_rec, sub_train + sub_rec, higher_is_better=False,
                   target=5.0, note=f"training {sub_train:,} vs {full_train:,}; recording {sub_rec:,} vs {full_rec:,}"),
        Comparison("recording pass", "score the whole pool", "10% subset + extrapolate", "sample-gradient steps",
                   full_rec, sub_rec, higher_is_better=False),
        Comparison("wall time, split to select", "score the whole pool", "10% subset + extrapolate", "seconds",
                   stage_time["full"], stage_time["subset"], higher_is_better=False),
    ]
    e2e.notes.append(f"same step budget ({sub.training_steps} optimiser steps) in both runs; recording passes are "
                     f"{full_rec / max(1, full_train + full_rec):.0%} of the whole-pool run's compute")

    truth, seed1 = _scores(full.outputs["subset_scores"]), _scores(summaries["full_seed1"].outputs["subset_scores"])
    own = _scores(sub.outputs["subset_scores"])
    extrapolated = _scores(sub.outputs["scores"])
    measured = set(own)
    rest = np.asarray(sorted(i for i in truth if i not in measured), dtype=np.int64)
    subset_ids = np.asarray(sorted(measured), dtype=np.int64)
    fid = BenchResult("fidelity", preset, dict(PRESETS[preset]))
    ceiling = _spearman(truth, seed1, sorted(truth))
    a = _spearman(truth, own, subset_ids)
    b = _spearman(truth, extrapolated, rest)
    variants = _variant_fidelity(configs["subset"], sub, truth, rest)
    fid.rows += [{"what": "(c) full run, other seed (noise ceiling)", "n": len(truth), "spearman_vs_full": ceiling},
                 {"what": "(a) subset run's own scores, subset samples", "n": len(subset_ids), "spearman_vs_full": a},
                 {"what": "(b) extrapolated, rest (pipeline's variant)", "n": len(rest), "spearman_vs_full": b,
                  "variant": sub.extrapolation_quality}]
    fid.rows += [{"what": "(b) extrapolated, rest", "n": len(rest), **v} for v in variants]
    best = max(variants, key=lambda v: v["spearman_vs_full"])
    fid.comparisons += [
        Comparison("Spearman vs full-pool scores", "noise ceiling (full run, other seed)",
                   "subset run's own scores", "Spearman", ceiling, a),
        Comparison("Spearman vs full-pool scores", "noise ceiling (full run, other seed)",
                   "extrapolated scores (chosen variant)", "Spearman", ceiling, b),
    ]
    fid.notes.append(f"best variant on the rest: k={best['k']} {best['weighting']} {best['metric']}"
                     f"{' same-label' if best['same_label'] else ''}: Spearman {best['spearman_vs_full']:.3f}; "
                     f"probe Spearman of the chosen variant {sub.extrapolation_quality.get('probe_spearman', float('nan')):.3f}")
    return [e2e, fid]
