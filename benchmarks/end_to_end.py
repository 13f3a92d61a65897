"""Compute of the extrapolation pipeline, fidelity of its scores, and what they are worth.

For each kind of generated pool (the demo's default, a noisier one, one with fewer
classes), three runs of the job's own pipeline (final training off):

* ``subset``: the default recipe, a 10% subset scored and the rest extrapolated by the
  default (learned) model;
* ``full``: the same step budget with every prunable sample scored directly
  (``split.subset_fraction=1.0``): the expensive truth;
* ``full_seed1``: the full run's stages up to its scoring run again, with another training
  seed: the noise ceiling (its measured scores are all the ceiling needs).

``end_to_end`` compares sample-gradient steps (training, recording passes and the pool
pass counted apart) and wall time of ``subset`` against ``full`` on the first kind.

``fidelity`` reports, per kind, Spearman correlations with the ``full`` scores on the
rows the subset run did not score: the learned model (the pipeline's scores), the
published kNN default and the best of the probe grid's kNN variants (recomputed from the
pool's embeddings under the subset model), each as a fraction of the noise ceiling; and
the probe's bias: the probe's Spearman minus the rest's, for the learned model and kNN.

``payoff`` (not in the ci preset) prunes the first kind's pool to half its synthetic part
by each score (learned, kNN, the full run's measured scores) and at random, trains the
robust model on each at the same step budget, and evaluates it (worst case over the
configured attacks), for two seeds: the accuracy each score buys over random pruning.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from benchmarks.common import local_ray, score_subset
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
#: 30% of labels flipped to the class mixed into the image: noise that misleads a model
#: (uniform flips largely cancel out), so that pruning has something to gain.
MISLEADING = {"pool.demo.label_noise": 0.3, "pool.demo.label_noise_kind": "distractor", "pool.demo.noise_std": 0.15,
              "pool.demo.duplicate_fraction": 0.3}
#: Kinds of generated pools, as overrides of the preset (the first is also timed and paid off).
KINDS = {
    "ci": {"default": {}},
    "small": {"default": {}, "noisy": {"pool.demo.label_noise": 0.15, "pool.demo.noise_std": 0.15,
                                       "pool.demo.duplicate_fraction": 0.3},
              "4 classes": {"pool.demo.num_classes": 4}, "misleading labels": MISLEADING},
    "full": {"default": {}, "noisy": {"pool.demo.label_noise": 0.15, "pool.demo.noise_std": 0.15,
                                      "pool.demo.duplicate_fraction": 0.3},
             "4 classes": {"pool.demo.num_classes": 4}, "misleading labels": MISLEADING},
}
#: The final training and evaluation of the payoff runs; seeds vary the final training. The
#: budget is explicit: the default (one pass over the real part per epoch) would be two steps
#: per epoch at these sizes, too few for the kept set to matter (seeds then differed by 0.11).
PAYOFF = {"ci": None,
          "small": {"seeds": (0, 1), "overrides": {"evaluation.attacks": "clean,pgd_ce,apgd_ce",
                                                   "evaluation.demo_test_size": 1000, "final.val_size": 100,
                                                   "final.train.epochs": 10, "final.train.steps_per_epoch": 40}},
          "full": {"seeds": (0, 1), "overrides": {"evaluation.attacks": "clean,pgd_ce,apgd_ce",
                                                  "evaluation.demo_test_size": 1000, "final.val_size": 100,
                                                  "final.train.epochs": 20, "final.train.steps_per_epoch": 60}}}
STAGES = ("split", "score_subset", "extrapolate", "select")
LEARNED_MIN_GAIN = 0.1  # goal: learned extrapolation >= kNN + 0.1 Spearman
CEILING_SHARE = 0.9  # and the default extrapolation >= 0.9x the noise ceiling


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


def knn_scores(config: JobConfig, summary) -> list[dict]:
    """Every kNN variant of the probe grid extrapolated to the whole pool from the subset run's
    neighbours (measured rows keep their scores): ``[{"name", "scores": {id: score}}]``, the
    configured variant first."""
    from rayprune.scoring.extrapolate import extrapolate_scores
    from rayprune.scoring.quality import split_probe
    from rayprune.stages.extrapolate import _variant_config, knn_name, read_references, variant_grid

    refs = read_references(Path(summary.outputs["subset_embeddings"]))
    probe = split_probe(len(refs["id"]), config.extrapolation.probe_fraction, config.split.seed)
    neighbours = {k: v[~probe] for k, v in refs.items()}
    ids, labels, emb = _pool_embeddings(config, summary)
    measured = _scores(summary.outputs["subset_scores"])
    out = []
    for k, w, m, sl in variant_grid(config, neighbours["label"]):
        result = extrapolate_scores(neighbours["embedding"], neighbours["score"], emb, _variant_config(k, w, m, sl),
                                    reference_labels=neighbours["label"], query_labels=labels)
        scores = dict(zip(ids.tolist(), result.scores.tolist())) | measured
        out.append({"name": knn_name(k, w, m, sl), "scores": scores})
    return out


def _compute(summary) -> tuple[int, int, int]:
    c = summary.compute
    return c["scoring_training"]["spent"], c["scoring_recording"]["spent"], c["pool_pass"]["spent"]


def run_kind(preset: str, kind: str, workdir: Path) -> dict:
    """The runs of one pool kind: the subset and full pipelines (summaries, configs, wall
    times) and the ceiling's measured scores (``ceiling_scores``, a parquet file)."""
    from rayprune.pipeline import run_pipeline

    runs = {"subset": {}, "full": {"split.subset_fraction": 1.0}}
    summaries, configs, walls = {}, {}, {}
    for name, overrides in runs.items():
        configs[name] = _config(preset, workdir / name, **KINDS[preset][kind], **overrides)
        start = time.perf_counter()
        summaries[name] = run_pipeline(configs[name])
        walls[name] = time.perf_counter() - start
        logger.info("end_to_end %s: run %s took %.1f s", kind, name, walls[name])
    ceiling = _config(preset, workdir / "full_seed1", **KINDS[preset][kind], **runs["full"], **{"train.seed": 1})
    start = time.perf_counter()
    ceiling_scores = score_subset(ceiling)[1].scores_file  # its measured scores are all the ceiling needs
    logger.info("end_to_end %s: the ceiling's scoring run (seed 1) took %.1f s", kind, time.perf_counter() - start)
    return {"summaries": summaries, "configs": configs, "walls": walls, "ceiling_scores": ceiling_scores}


def fidelity_of(kind: str, runs: dict) -> tuple[dict, dict]:
    """One kind's fidelity row (Spearman on the rest, fractions of the ceiling, probe bias)
    and the score tables the payoff prunes by."""
    sub, full = runs["summaries"]["subset"], runs["summaries"]["full"]
    truth = _scores(full.outputs["subset_scores"])
    seed1 = _scores(runs["ceiling_scores"])
    own = _scores(sub.outputs["subset_scores"])
    learned = _scores(sub.outputs["scores"])
    rest = sorted(i for i in truth if i not in own)
    variants = knn_scores(runs["configs"]["subset"], sub)
    for v in variants:
        v["spearman"] = _spearman(truth, v["scores"], rest)
    knn, best = variants[0], max(variants, key=lambda v: v["spearman"])
    ceiling = _spearman(truth, seed1, sorted(truth))
    report = json.loads((Path(sub.outputs["scores"]).parent / "quality.json").read_text())
    quality = {v["name"]: v for v in report["variants"]}
    row = {
        "kind": kind, "n_rest": len(rest), "ceiling": ceiling,
        "subset_own": _spearman(truth, own, sorted(own)),
        "learned": _spearman(truth, learned, rest), "knn_default": knn["spearman"],
        "best_knn": best["spearman"], "best_knn_variant": best["name"],
        "learned_probe": sub.extrapolation_quality["probe_spearman"],
        "knn_probe": quality[knn["name"]]["probe_spearman"],
        "search": sub.neighbour_search,
    }
    row["learned_share_of_ceiling"] = row["learned"] / ceiling
    row["knn_share_of_ceiling"] = row["knn_default"] / ceiling
    row["learned_probe_bias"] = row["learned_probe"] - row["learned"]
    row["knn_probe_bias"] = row["knn_probe"] - row["knn_default"]
    tables = {"learned": learned, "knn": knn["scores"], "measured": _scores(full.outputs["scores"])}
    return row, tables


def payoff(preset: str, runs: dict, tables: dict, workdir: Path) -> list[dict]:
    """Robust accuracy after keeping half of the synthetic part by each score, and at random."""
    import pyarrow as pa

    from rayprune.stages.evaluate import run_evaluate
    from rayprune.stages.final import run_final
    from rayprune.stages.prepare import open_pool, read_ids_and_sources, run_test_pool
    from rayprune.stages.resources import plan_resources
    from rayprune.stages.select import choose_kept, write_pruned_pool

    spec = PAYOFF[preset]
    base = runs["configs"]["subset"]
    pool = open_pool(runs["summaries"]["subset"].outputs["pool"])
    ids, sources = read_ids_and_sources(pool.files)
    labels = pads.dataset(pool.files, format="parquet").to_table(columns=["id", "label"]).sort_by("id")["label"]
    truth = demo_truth(base)
    rows = []
    for seed in spec["seeds"]:
        for name in ("learned", "knn", "measured", "random"):
            root = workdir / "payoff" / f"{name}-seed{seed}"
            config = load_config(None, {**_flat(base), "output_dir": str(root),
                                        "final.enabled": "true", "final.train.seed": seed, "selection.seed": seed,
                                        "selection.strategy": "random" if name == "random" else "score",
                                        **spec["overrides"]})
            plan = plan_resources(config.ray)
            scores = tables.get(name, tables["learned"])
            table = pa.table({"id": ids, "label": labels, "source": sources.tolist(),
                              "score": np.asarray([scores[i] for i in ids.tolist()])})
            kept = choose_kept(config, table)
            keep = np.isin(ids, kept)
            per_source = {s: int((sources[keep] == s).sum()) for s in np.unique(sources[keep])}
            pruned = root / "pruned_pool"
            write_pruned_pool(pool, kept, per_source, pruned)
            start = time.perf_counter()
            final = run_final(config, pool, pruned, {"payoff": f"{name}-{seed}"}, root, plan)
            test = run_test_pool(config, root)
            metrics = run_evaluate(config, test, final.model_file, {"final_train": final.digest}, root, plan).metrics
            rows.append({"score": name, "seed": seed, "kept": int(len(kept)), "worst": metrics["worst"],
                         "clean": metrics["clean"], "training_steps": final.training_steps,
                         "seconds": time.perf_counter() - start, **kept_truth(truth, kept)})
            logger.info("payoff: %s seed %d: worst-case robust accuracy %.3f, %s", name, seed, metrics["worst"],
                        {k: v for k, v in rows[-1].items() if k.startswith("kept_")})
    return rows


def demo_truth(config: JobConfig):
    """The demo pool's rows with their hidden truth, or None for a pool read from files."""
    if config.pool.path:
        return None
    from rayprune.data.demo_pool import generate_rows

    return generate_rows(config.pool.demo)


def kept_truth(truth, kept) -> dict:
    """What a kept set holds of the demo pool's hidden truth (:func:`demo_truth`), over its
    synthetic rows: the share with flipped labels, the share of near-duplicates, the mean
    difficulty. Nothing for a pool without one."""
    if truth is None:
        return {}
    synthetic = np.isin(truth.ids, np.asarray(kept)) & (truth.sources == "synthetic")
    return {"kept_flipped": float((truth.labels != truth.true_labels)[synthetic].mean()),
            "kept_duplicates": float((truth.duplicate_of >= 0)[synthetic].mean()),
            "kept_difficulty": float(truth.difficulty[synthetic].mean())}


def _flat(config: JobConfig) -> dict:
    from rayprune.config import flat_options

    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flat_options(config).items()}


def check_kinds(preset: str, kinds: list[str]) -> None:
    """``kinds`` must be kinds of generated pool that ``preset`` defines."""
    unknown = [k for k in kinds if k not in KINDS[preset]]
    if unknown or not kinds:
        raise ValueError(f"unknown pool kind(s) {', '.join(unknown) or '(none given)'} for preset {preset}; "
                         f"allowed: {', '.join(KINDS[preset])}")


def run(preset: str, workdir: Path, kinds: list[str] | None = None) -> list[BenchResult]:
    """Every kind of pool of the preset (or ``kinds``, in that order; the first is timed and paid off)."""
    if kinds:
        check_kinds(preset, kinds)
    kinds = list(kinds or KINDS[preset])
    with local_ray():
        per_kind = {kind: run_kind(preset, kind, workdir / kind.replace(" ", "_")) for kind in kinds}
        first = next(iter(kinds))
        fid_rows, tables = {}, {}
        for kind, runs in per_kind.items():
            fid_rows[kind], tables[kind] = fidelity_of(kind, runs)
        paid = payoff(preset, per_kind[first], tables[first], workdir / "payoff") if PAYOFF[preset] else []
    return [compute_result(preset, per_kind[first]), fidelity_result(preset, fid_rows),
            *([payoff_result(preset, paid)] if paid else [])]


def compute_result(preset: str, runs: dict) -> BenchResult:
    summaries = runs["summaries"]
    sub, full = summaries["subset"], summaries["full"]
    stage_time = {n: sum(s.stage_seconds.get(st, 0.0) for st in STAGES) for n, s in summaries.items()}
    (sub_train, sub_rec, sub_pool), (full_train, full_rec, _) = _compute(sub), _compute(full)
    e2e = BenchResult("end_to_end", preset, dict(PRESETS[preset]))
    for name, s in summaries.items():
        train, rec, pool_pass = _compute(s)
        e2e.rows.append({"run": name, "scored": s.scored, "pool": s.pool_size, "training_passes": train,
                         "recording_passes": rec, "pool_pass": pool_pass, "pipeline_seconds": stage_time[name],
                         "stage_seconds": s.stage_seconds})
    e2e.comparisons += [
        Comparison("scoring compute (training + recording + pool pass)", "score the whole pool",
                   "10% subset + extrapolate", "sample-gradient steps", full_train + full_rec,
                   sub_train + sub_rec + sub_pool, higher_is_better=False, target=5.0,
                   note=f"training {sub_train:,} vs {full_train:,}; recording {sub_rec:,} vs {full_rec:,}; "
                        f"pool pass (embeddings and the learned model's signals) {sub_pool:,}"),
        Comparison("recording pass", "score the whole pool", "10% subset + extrapolate", "sample-gradient steps",
                   full_rec, sub_rec, higher_is_better=False),
        Comparison("wall time, split to select", "score the whole pool", "10% subset + extrapolate", "seconds",
                   stage_time["full"], stage_time["subset"], higher_is_better=False),
    ]
    e2e.notes.append(f"same step budget ({sub.training_steps} optimiser steps) in both runs; recording passes are "
                     f"{full_rec / max(1, full_train + full_rec):.0%} of the whole-pool run's compute")
    return e2e


def fidelity_result(preset: str, rows: dict) -> BenchResult:
    fid = BenchResult("fidelity", preset, {**PRESETS[preset], "kinds": {k: KINDS[preset][k] for k in rows}})
    fid.rows = list(rows.values())
    for kind, r in rows.items():
        r["learned_minus_knn"] = r["learned"] - r["knn_default"]
        r["learned_gain_target_met"] = r["learned_minus_knn"] >= LEARNED_MIN_GAIN
        if r["ceiling"] <= 0 or r["knn_default"] <= 0:  # ratios of non-positive correlations mean nothing
            fid.notes.append(f"{kind}: the pool is too small for meaningful scores (noise ceiling {r['ceiling']:.3f}, "
                             f"kNN {r['knn_default']:.3f}): no comparisons")
            continue
        fid.comparisons += [
            Comparison(f"Spearman vs full-pool scores, {kind} pool", "noise ceiling (full run, other seed)",
                       "learned extrapolation (the default)", "Spearman", r["ceiling"], r["learned"],
                       target=CEILING_SHARE),
            Comparison(f"Spearman vs full-pool scores, {kind} pool", "kNN default (k=12 uniform, published)",
                       "learned extrapolation", "Spearman", r["knn_default"], r["learned"],
                       note=f"learned - kNN = {r['learned_minus_knn']:+.3f} (target >= +{LEARNED_MIN_GAIN}: "
                            f"{'met' if r['learned_gain_target_met'] else 'not met'}); best kNN variant "
                            f"{r['best_knn']:.3f} ({r['best_knn_variant']})"),
        ]
    bias = lambda key: [r[key] for r in rows.values()]  # noqa: E731
    fid.notes.append(
        "probe bias (probe Spearman minus the rest's Spearman vs full-pool scores): learned "
        + ", ".join(f"{b:+.3f}" for b in bias("learned_probe_bias")) + "; kNN default "
        + ", ".join(f"{b:+.3f}" for b in bias("knn_probe_bias")))
    fid.notes += [f"{kind}: ceiling {r['ceiling']:.3f}, subset's own {r['subset_own']:.3f}, learned {r['learned']:.3f} "
                  f"({r['learned_share_of_ceiling']:.2f} of ceiling), kNN default {r['knn_default']:.3f} "
                  f"({r['knn_share_of_ceiling']:.2f}), best kNN {r['best_knn']:.3f}" for kind, r in rows.items()]
    return fid


def payoff_result(preset: str, rows: list[dict]) -> BenchResult:
    res = BenchResult("payoff", preset, {**PRESETS[preset], **PAYOFF[preset]})
    res.rows = rows
    mean = {name: statistics.fmean(r["worst"] for r in rows if r["score"] == name)
            for name in ("learned", "knn", "measured", "random")}
    spread = {name: [r["worst"] for r in rows if r["score"] == name] for name in mean}
    for name in ("learned", "knn", "measured"):
        res.comparisons.append(Comparison("worst-case robust accuracy after keeping half the synthetic part",
                                          "random pruning", f"{name} scores", "accuracy", mean["random"], mean[name],
                                          note=f"seeds {', '.join(f'{v:.3f}' for v in spread[name])}"))
    gain = {name: mean[name] - mean["random"] for name in ("learned", "knn", "measured")}
    if gain["measured"] > 0:
        res.comparisons.append(Comparison("gain over random pruning", "measured full-pool scores",
                                          "learned extrapolation (the default)", "accuracy points",
                                          gain["measured"], max(gain["learned"], 1e-9), target=0.9,
                                          note=f"learned {gain['learned']:+.4f}, kNN {gain['knn']:+.4f}, measured "
                                               f"{gain['measured']:+.4f}; met means >= 90% of the measured gain"))
    res.notes.append("gains over random (mean over seeds): " + ", ".join(f"{k} {v:+.4f}" for k, v in gain.items())
                     + "; random seeds " + ", ".join(f"{v:.3f}" for v in spread["random"]))
    if "kept_flipped" in rows[0]:
        truth = {name: {key: statistics.fmean(r[key] for r in rows if r["score"] == name)
                        for key in ("kept_flipped", "kept_duplicates", "kept_difficulty")} for name in mean}
        res.notes.append("kept synthetic rows (mean over seeds), mislabelled / near-duplicates / mean difficulty: "
                         + "; ".join(f"{name} {t['kept_flipped']:.1%} / {t['kept_duplicates']:.1%} / "
                                     f"{t['kept_difficulty']:.3f}" for name, t in truth.items()))
    if gain["measured"] <= 0:
        res.notes.append("the measured full-pool scores did not beat random pruning here, so the share of their "
                         "gain kept by extrapolation cannot be measured at this size")
    return res
