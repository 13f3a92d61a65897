"""Benchmark 1: neighbour search, rayprune's kNN paths against faiss and the reference code.

On the same seeded, clustered Gaussian embeddings, in one process and with one thread
count, it times

* ``exact``: ``knn_search(method="exact")``, rayprune's blocked PyTorch search, and
  ``extrapolate_scores`` on top of it (search plus the weighted score mean);
* ``faiss flat``: ``faiss.IndexFlatL2``, the usual exact baseline;
* ``naive``: the published reference code's approach, written out here: batches of 16
  queries, a ``16 x references x dims`` difference tensor, its norm, then top-k. It is so
  slow that only a subsample of queries is timed and its throughput extrapolated;
* ``approx`` (faiss HNSW) and ``ivf`` (faiss IVF-Flat) as the job runs them: the search
  width (efSearch, nprobe) calibrated on a sample of queries until recall@k reaches
  ``MIN_RECALL`` against exact search (``calibrate_search``), the index built once (as the
  extrapolation actors keep it; the build is timed apart), then timed beside exact
  search; recall is measured over every query. This runs on the clustered data and on
  three more kinds (``HARD_DATA``): model embeddings (what the job searches: a demo pool
  embedded by the job's default model, adversarially trained on the reference rows as
  the scoring run trains on its subset), unclustered (one Gaussian with the decaying
  spectrum of learned embeddings, as hard for ``ivf`` at 4 probes as the hardest real
  embeddings we know of) and isotropic (one isotropic Gaussian: no structure at all,
  the worst case for any approximate search). The recall of ``ivf`` at a fixed 4
  probes is reported for each, as a measure of how hard it is.

All variants run chunk by chunk in rotating order, so load from other processes on a
shared machine hits them alike. Exact, faiss flat and naive must find the same
neighbours (ties aside) or the benchmark fails: a fast wrong search is worth nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import BenchResult, Comparison
from rayprune.config import ModelSection
from rayprune.data.demo_pool import DemoPoolSpec
from rayprune.scoring import (
    ExtrapolationConfig,
    SearchConfig,
    extrapolate_scores,
    knn_search,
)
from rayprune.scoring.neighbours import approx_index, calibrate_search, set_search_width

logger = logging.getLogger(__name__)

K = ExtrapolationConfig().k  # the job's default k
# Same references and dims in "small" and "full": only the number of queries differs, so
# per-query throughputs (and their ratios) carry over; "small" just times fewer queries.
# ``model_steps``: adversarial-training steps of the model that embeds the demo pool.
PRESETS = {
    "ci": {"queries": 2_000, "references": 1_000, "dims": 32, "k": K, "clusters": 10, "chunks": 4,
           "repeats": 1, "naive_seconds": 0.2, "model_steps": 5},
    "small": {"queries": 50_000, "references": 50_000, "dims": 128, "k": K, "clusters": 100, "chunks": 10,
              "repeats": 2, "naive_seconds": 2.0, "model_steps": 400},
    "full": {"queries": 1_000_000, "references": 50_000, "dims": 128, "k": K, "clusters": 100, "chunks": 50,
             "repeats": 1, "naive_seconds": 10.0, "model_steps": 400},
}
SEED = 0
CENTRE_SPREAD = 2.0  # std of cluster centres per dim, relative to the within-cluster std of 1
NAIVE_BATCH = 16  # the reference code's query batch
WARMUP_QUERIES = 256
TIE_RTOL = 1e-4  # float64 distances of two neighbour sets closer than this count as ties
MIN_RECALL = 0.95  # the job's default extrapolation.min_recall
CALIBRATION_QUERIES = 2000  # as the extrapolate stage samples
FIXED_PROBES = 4  # the fixed ivf width whose recall shows how hard a data set is
SPECTRUM_DECAY = 0.5  # of the unclustered data's standard deviations over dimensions


def clustered_embeddings(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n`` float32 points, each a random centre plus unit Gaussian noise."""
    labels = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return noise + centres[labels]


def make_data(p: dict, clustered: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Queries and references drawn from one seeded Gaussian mixture (or, unclustered,
    one isotropic Gaussian: the hard case for approximate search)."""
    rng = np.random.default_rng(SEED if clustered else SEED + 7)
    centres = rng.standard_normal((p["clusters"] if clustered else 1, p["dims"]), dtype=np.float32)
    centres *= CENTRE_SPREAD if clustered else 0.0
    return clustered_embeddings(p["queries"], centres, rng), clustered_embeddings(p["references"], centres, rng)


def spectrum_data(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Queries and references from one zero-mean Gaussian whose i-th dimension has standard
    deviation ``i ** -SPECTRUM_DECAY``: no clusters, but the decaying spectrum of learned
    embeddings. The decay is chosen so that ``ivf`` at 4 probes finds about half of the
    true neighbours, as on the hardest real embeddings we know of (0.34-0.49)."""
    rng = np.random.default_rng(SEED + 11)
    scale = np.arange(1, p["dims"] + 1, dtype=np.float32) ** -SPECTRUM_DECAY
    return (rng.standard_normal((p["queries"], p["dims"]), dtype=np.float32) * scale,
            rng.standard_normal((p["references"], p["dims"]), dtype=np.float32) * scale)


def model_embeddings(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Queries and references as the job searches them, from a seeded demo pool (the job's
    default size, classes and noise) of ``references + queries`` rows.

    The job's default model (``model.*``) is adversarially trained (PGD-AT, the job's
    default attack and batch) for ``model_steps`` steps on the first ``references`` rows,
    as the scoring run trains on its subset; every row is then embedded by it
    (penultimate layer, ``2 x model.width`` dims). The references are the rows it was
    trained on, the queries the rest: the regime split the job searches across.
    """
    from rayprune.config import load_config
    from rayprune.data.demo_pool import generate_rows
    from rayprune.robust.at_losses import pgd_at_loss
    from rayprune.robust.recording import compute_embeddings
    from rayprune.robust.training import learning_rate, to_float_images
    from rayprune.stages.training import attack_from_config, model_from_config

    config = load_config(None, {})
    spec = DemoPoolSpec(n_real=0, n_synthetic=p["references"] + p["queries"], seed=SEED)
    refs = generate_rows(spec, 0, p["references"])
    torch.manual_seed(SEED)
    model = model_from_config(config, spec.num_classes, 3)
    optimiser = torch.optim.SGD(model.parameters(), lr=config.train.lr, momentum=0.9, weight_decay=5e-4)
    attack, batch = attack_from_config(config), config.train.batch_size
    rng, generator = np.random.default_rng(SEED + 5), torch.Generator().manual_seed(SEED)
    images, labels = to_float_images(refs.images), torch.as_tensor(refs.labels)
    model.train()
    for step in range(p["model_steps"]):
        rows = torch.as_tensor(rng.choice(len(images), min(batch, len(images)), replace=False))
        for group in optimiser.param_groups:  # cosine decay, so the last steps settle the embedding
            group["lr"] = learning_rate(step, p["model_steps"], config.train.lr)
        loss, stats = pgd_at_loss(model, images[rows], labels[rows], attack, generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if (step + 1) % 100 == 0:
            logger.info("neighbours: model embeddings, training step %d/%d, adversarial accuracy %.2f",
                        step + 1, p["model_steps"], stats["adv_acc"])
    references = compute_embeddings(model, images)
    block = 50_000  # query rows generated and embedded at a time
    queries = [compute_embeddings(model, to_float_images(
        generate_rows(spec, start, min(block, spec.n_rows - start)).images))
        for start in range(p["references"], spec.n_rows, block)]
    return np.ascontiguousarray(np.concatenate(queries)), references


#: The data sets beyond the clustered one on which calibrated approximate search is timed.
HARD_DATA: dict[str, Callable[[dict], tuple[np.ndarray, np.ndarray]]] = {
    "model embeddings": model_embeddings,
    "unclustered": spectrum_data,
    "isotropic": partial(make_data, clustered=False),
}


def faiss_flat(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss exact search; returns (Euclidean distances, indices) like ``knn_search``."""
    import faiss

    index = faiss.IndexFlatL2(references.shape[1])
    index.add(references)
    sq_dist, idx = index.search(queries, k)
    return np.sqrt(np.clip(sq_dist, 0.0, None)), idx


def naive_search(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference code's search: a broadcast difference tensor per batch of 16 queries."""
    refs = torch.from_numpy(references)
    dist, idx = [], []
    with torch.inference_mode():
        for q0 in range(0, len(queries), NAIVE_BATCH):
            q = torch.from_numpy(queries[q0 : q0 + NAIVE_BATCH])
            d = (q[:, None, :] - refs[None, :, :]).norm(dim=2)
            best = torch.topk(d, k, dim=1, largest=False)
            dist.append(best.values.numpy())
            idx.append(best.indices.numpy())
    return np.concatenate(dist), np.concatenate(idx)


def naive_per_chunk(queries: np.ndarray, references: np.ndarray, k: int, seconds: float, chunks: int) -> int:
    """Queries (whole batches of 16) per chunk for the naive search to run about ``seconds`` in all."""
    naive_search(queries[:NAIVE_BATCH], references, k)  # warm-up
    start = time.perf_counter()
    naive_search(queries[: 2 * NAIVE_BATCH], references, k)
    per_batch = (time.perf_counter() - start) / 2
    batches = max(1, math.ceil(seconds / max(per_batch, 1e-9) / chunks))
    return min(len(queries) // chunks, batches * NAIVE_BATCH)


def true_distances(queries: np.ndarray, references: np.ndarray, idx: np.ndarray, block: int = 4096) -> np.ndarray:
    """Float64 distances from each query to the references ``idx`` names, computed directly."""
    out = np.empty(idx.shape, dtype=np.float64)
    for r0 in range(0, len(idx), block):
        q = queries[r0 : r0 + block].astype(np.float64)[:, None, :]
        out[r0 : r0 + block] = np.sqrt(((q - references[idx[r0 : r0 + block]]) ** 2).sum(axis=2))
    return out


def agreement(queries: np.ndarray, references: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray) -> dict:
    """Whether two exact searches found the same neighbours, ties (equal distances) aside.

    Rows whose index lists differ are re-measured in float64: if both lists have the
    same sorted distances (within ``TIE_RTOL``) the difference is a tie, not an error.
    """
    differ = np.flatnonzero((idx_a != idx_b).any(axis=1))
    bad = 0
    if len(differ):
        d_a = np.sort(true_distances(queries[differ], references, idx_a[differ]), axis=1)
        d_b = np.sort(true_distances(queries[differ], references, idx_b[differ]), axis=1)
        bad = int((~np.isclose(d_a, d_b, rtol=TIE_RTOL, atol=0.0)).any(axis=1).sum())
    return {"identical_index_fraction": float((idx_a == idx_b).mean()), "rows_differing_by_ties": len(differ) - bad,
            "rows_disagreeing": bad, "agrees": bad == 0}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true k nearest neighbours that ``found`` contains
    (written out here, not rayprune's, so the benchmark checks the product independently)."""
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2)
    return float(hits.mean())


def calibrated(queries: np.ndarray, references: np.ndarray, k: int) -> dict[str, dict]:
    """For ``approx`` and ``ivf``: the calibrated options, the built index and its build time."""
    rng = np.random.default_rng(SEED + 3)
    sample = queries[np.sort(rng.choice(len(queries), min(len(queries), CALIBRATION_QUERIES), replace=False))]
    out = {}
    for method in ("approx", "ivf"):
        options = SearchConfig(method=method)
        build_seconds, index = timed(lambda options=options: approx_index(references, options, k))
        start = time.perf_counter()
        cal = calibrate_search(sample, references, k, options, MIN_RECALL)
        out[method] = {"calibration": cal, "index": index, "build_seconds": build_seconds,
                       "calibration_seconds": time.perf_counter() - start}
        if cal.options.method != "exact":
            set_search_width(index, cal.options, k)
    return out


def calibrated_variant(entry: dict, queries: np.ndarray, references: np.ndarray, k: int) -> Callable:
    """Search on the calibrated index (or exactly, when calibration fell back to exact)."""
    options = entry["calibration"].options
    if options.method == "exact":
        return lambda s: knn_search(queries[s], references, k, options)[1]
    return lambda s: entry["index"].search(queries[s], k)[1]


def time_interleaved(variants: dict[str, Callable], n: int, chunks: int, repeats: int):
    """Time per-chunk variants chunk by chunk, rotating their order from chunk to chunk, so
    a burst of load from other processes hits every variant alike.

    Each variant takes a slice of the queries and returns neighbour indices. Returns per
    variant the sum over chunks of each chunk's fastest round (the least disturbed
    measurement), every round's total, and the first round's indices.
    """
    bounds = np.linspace(0, n, chunks + 1).astype(int)
    names = list(variants)
    times = {name: np.zeros((repeats, chunks)) for name in names}
    parts: dict[str, list] = {name: [] for name in names}
    for rep in range(repeats):
        for c in range(chunks):
            shift = (rep + c) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                idx = variants[name](slice(bounds[c], bounds[c + 1]))
                times[name][rep, c] = time.perf_counter() - start
                if rep == 0:
                    parts[name].append(idx)
        logger.info("neighbours round %d: %s", rep, ", ".join(f"{name} {t[rep].sum():.2f} s"
                                                            for name, t in times.items()))
    best = {name: float(t.min(axis=0).sum()) for name, t in times.items()}
    rounds = {name: t.sum(axis=1).tolist() for name, t in times.items()}
    return best, rounds, {name: np.concatenate(p) for name, p in parts.items()}


def timed(fn: Callable) -> tuple[float, object]:
    """Wall seconds of one call of ``fn``, and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def warm_up(queries: np.ndarray, references: np.ndarray, k: int) -> None:
    """First calls pay one-off costs (thread pools, BLAS initialisation): keep them out."""
    few = queries[:WARMUP_QUERIES]
    knn_search(few, references, k)
    faiss_flat(few, references, k)


def set_faiss_threads(threads: int) -> int:
    """Give faiss (OpenMP) the same thread count as torch; returns what faiss reports."""
    import faiss

    faiss.omp_set_num_threads(threads)
    return int(faiss.omp_get_max_threads())


def faiss_simd() -> str | None:
    """The SIMD level faiss dispatches to (None where faiss cannot say)."""
    import faiss

    config = getattr(faiss, "SIMDConfig", None)
    return config.get_level_name() if config is not None else None


def measure(p: dict, queries: np.ndarray, references: np.ndarray, naive_n: int) -> dict:
    """Time every variant; returns best and per-round seconds, neighbour indices, naive rows
    and the approx index build and single-call times."""
    k, chunks = p["k"], p["chunks"]
    exact = SearchConfig()
    scores = np.random.default_rng(SEED + 1).random(len(references))
    config = ExtrapolationConfig(k=k, search=exact)
    approximate = calibrated(queries, references, k)
    variants = {
        "exact": lambda s: knn_search(queries[s], references, k, exact)[1],
        "faiss_flat": lambda s: faiss_flat(queries[s], references, k)[1],
        "exact_extrapolation": lambda s: extrapolate_scores(references, scores, queries[s], config).indices,
        "naive": lambda s: naive_search(queries[s][:naive_n], references, k)[1],
        **{f"{m}_calibrated": calibrated_variant(e, queries, references, k) for m, e in approximate.items()},
    }
    best, rounds, idx = time_interleaved(variants, len(queries), chunks, p["repeats"])
    starts = np.linspace(0, len(queries), chunks + 1).astype(int)[:-1]
    return {"best": best, "rounds": rounds, "idx": idx, "approximate": approximate,
            "naive_rows": np.concatenate([np.arange(b, b + naive_n) for b in starts]),
            "fixed_width_recall": fixed_width_recall(approximate["ivf"]["index"], queries, k, idx["exact"])}


def measure_calibrated(p: dict, queries: np.ndarray, references: np.ndarray) -> dict:
    """Exact against calibrated approx and ivf on one data set."""
    k = p["k"]
    approximate = calibrated(queries, references, k)
    variants = {"exact": lambda s: knn_search(queries[s], references, k)[1],
                **{f"{m}_calibrated": calibrated_variant(e, queries, references, k) for m, e in approximate.items()}}
    best, rounds, idx = time_interleaved(variants, len(queries), p["chunks"], p["repeats"])
    return {"best": best, "rounds": rounds, "idx": idx, "approximate": approximate,
            "fixed_width_recall": fixed_width_recall(approximate["ivf"]["index"], queries, k, idx["exact"])}


def fixed_width_recall(ivf_index, queries: np.ndarray, k: int, exact_idx: np.ndarray) -> float:
    """Recall@k over every query of the ivf index searched at ``FIXED_PROBES`` lists (as
    the job searched before calibration): how hard the data set is for a fixed width."""
    calibrated_probes = ivf_index.nprobe
    set_search_width(ivf_index, SearchConfig(method="ivf", ivf_probes=FIXED_PROBES), k)
    try:
        return recall_at_k(ivf_index.search(queries, k)[1], exact_idx)
    finally:
        ivf_index.nprobe = calibrated_probes


def run(preset: str, workdir: Path) -> BenchResult:
    """Time the four searches side by side on one data set; see the module docstring."""
    p = PRESETS[preset]
    k, n = p["k"], p["queries"]
    torch_threads = torch.get_num_threads()
    faiss_threads = set_faiss_threads(torch_threads)
    queries, references = make_data(p)
    warm_up(queries, references, k)
    naive_n = naive_per_chunk(queries, references, k, p["naive_seconds"], p["chunks"])
    logger.info("neighbours: %d queries x %d references x %d dims, k=%d, %d torch / %d faiss threads; "
                "naive on %d queries per chunk", n, len(references), p["dims"], k, torch_threads,
                faiss_threads, naive_n)
    m = measure(p, queries, references, naive_n)
    checks = check_results(queries, references, m["idx"], m["naive_rows"])
    hard = {}
    for data, make in HARD_DATA.items():
        logger.info("neighbours: calibrated approximate search on %s data", data)
        hard[data] = measure_calibrated(p, *make(p))

    counts = dict.fromkeys(m["best"], n) | {"naive": len(m["naive_rows"])}
    qps = {name: counts[name] / seconds for name, seconds in m["best"].items()}
    params = {**p, "seed": SEED, "centre_spread": CENTRE_SPREAD, "torch_threads": torch_threads,
              "faiss_threads": faiss_threads, "faiss_simd": faiss_simd(), "min_recall": MIN_RECALL,
              "calibration_queries": CALIBRATION_QUERIES}
    result = BenchResult("neighbours", preset, params)
    extra = row_details(checks, len(m["naive_rows"]) < n)
    result.rows = [{"data": "clustered", "variant": name, "queries_timed": count, "best_seconds": m["best"][name],
                    "round_seconds": m["rounds"][name], "queries_per_s": qps[name], **extra.get(name, {})}
                   for name, count in counts.items()]
    result.comparisons = comparisons(qps, len(m["naive_rows"]))
    for data, run_ in {"clustered": m, **hard}.items():
        rows, comps = calibrated_results(data, run_, n, k)
        result.rows += rows
        result.comparisons += comps
    result.notes = notes(p, k, len(m["naive_rows"]), torch_threads, faiss_threads, checks["faiss"])
    return result


def calibrated_results(data: str, run_: dict, n: int, k: int) -> tuple[list[dict], list[Comparison]]:
    """Rows and comparisons of the calibrated approximate searches on one data set."""
    exact_qps = n / run_["best"]["exact"]
    rows, comps = [], []
    if data != "clustered":
        rows.append({"data": data, "variant": "exact", "queries_timed": n, "best_seconds": run_["best"]["exact"],
                     "round_seconds": run_["rounds"]["exact"], "queries_per_s": exact_qps})
    for method, label in (("approx", "approx (HNSW)"), ("ivf", "ivf (IVF-Flat)")):
        entry, name = run_["approximate"][method], f"{method}_calibrated"
        cal = entry["calibration"]
        recall = recall_at_k(run_["idx"][name], run_["idx"]["exact"])
        qps = n / run_["best"][name]
        width = cal.as_dict()["search_width"]
        setting = f"{'efSearch' if method == 'approx' else 'nprobe'} {width}" if width is not None else "exact fallback"
        rows.append({"data": data, "variant": name, "queries_timed": n, "best_seconds": run_["best"][name],
                     "round_seconds": run_["rounds"][name], "queries_per_s": qps, f"recall_at_{k}": recall,
                     "calibrated": cal.as_dict(), "index_build_seconds": entry["build_seconds"],
                     "calibration_seconds": entry["calibration_seconds"],
                     **({"fixed_probes": FIXED_PROBES, f"recall_at_{k}_fixed_probes": run_["fixed_width_recall"]}
                        if method == "ivf" else {})})
        fixed = (f"; at a fixed {FIXED_PROBES} probes {run_['fixed_width_recall']:.3f}" if method == "ivf" else "")
        comps += [
            Comparison(f"approximate search at calibrated recall, {data} data", "rayprune exact",
                       f"rayprune {label}", "queries/s", exact_qps, qps, target=5,
                       note=f"{setting}, chosen on {cal.sample} sample queries for recall >= {MIN_RECALL}; index "
                            f"built once ({entry['build_seconds']:.1f} s) and calibrated "
                            f"({entry['calibration_seconds']:.1f} s) apart"),
            Comparison(f"approximate search quality, {data} data", "required recall", f"rayprune {label}",
                       f"recall@{k}", MIN_RECALL, recall, target=1.0,
                       note=f"over all {n:,} queries; ratio = recall / {MIN_RECALL}: met means recall >= "
                            f"{MIN_RECALL}{fixed}"),
        ]
    return rows, comps


def check_results(queries: np.ndarray, references: np.ndarray, idx: dict, naive_rows: np.ndarray) -> dict:
    """Exact, faiss flat, extrapolation and naive must agree (ties aside); raise if not."""
    exact = idx["exact"]
    checks = {"faiss": agreement(queries, references, exact, idx["faiss_flat"]),
              "naive": agreement(queries[naive_rows], references, exact[naive_rows], idx["naive"]),
              "extrapolation_same": bool(np.array_equal(idx["exact_extrapolation"], exact))}
    for name, key in (("faiss IndexFlatL2", "faiss"), ("the naive search", "naive")):
        if not checks[key]["agrees"]:
            raise RuntimeError(f"exact search and {name} disagree on {checks[key]['rows_disagreeing']} queries "
                               f"beyond ties")
    if not checks["extrapolation_same"]:
        raise RuntimeError("extrapolate_scores used other neighbours than knn_search(method='exact')")
    return checks


def row_details(checks: dict, naive_subsampled: bool) -> dict[str, dict]:
    """Per-variant fields beyond the timings: settings and correctness checks."""
    exact = SearchConfig()
    return {
        "exact": {"query_block": exact.query_block, "reference_block": exact.reference_block},
        "faiss_flat": {"agrees_with_exact": checks["faiss"]["agrees"], **checks["faiss"]},
        "exact_extrapolation": {"same_neighbours_as_exact": checks["extrapolation_same"]},
        "naive": {"batch": NAIVE_BATCH, "agrees_with_exact": checks["naive"]["agrees"], "subsample": naive_subsampled},
    }


def comparisons(qps: dict, n_naive: int) -> list[Comparison]:
    """The exact-search targets as ratios."""
    metric = "queries/s"
    return [
        Comparison("exact search", "faiss IndexFlatL2", "rayprune exact", metric, qps["faiss_flat"], qps["exact"],
                   target=0.9, note="same threads, same data"),
        Comparison("exact extrapolation", "faiss IndexFlatL2 (search only)", "rayprune extrapolate_scores", metric,
                   qps["faiss_flat"], qps["exact_extrapolation"], target=0.9,
                   note="search plus the weighted score mean, against faiss doing the search alone"),
        Comparison("exact search", "naive reference code", "rayprune exact", metric, qps["naive"], qps["exact"],
                   target=50, note=f"naive timed on {n_naive:,} queries, queries/s extrapolated"),
    ]


def notes(p: dict, k: int, n_naive: int, torch_threads: int, faiss_threads: int, vs_faiss: dict) -> list[str]:
    """What was measured, in words."""
    data = (f"{p['queries']:,} queries x {p['references']:,} references x {p['dims']} dims (float32), clustered "
            f"({p['clusters']} Gaussian clusters, seed {SEED}), unclustered (one Gaussian, standard deviation of "
            f"dimension i = i^-{SPECTRUM_DECAY}) and isotropic (one isotropic Gaussian), k={k}; "
            f"model embeddings: the same counts, {2 * ModelSection().width} dims, from a seeded demo pool "
            f"({DemoPoolSpec().image_size}px, {DemoPoolSpec().num_classes} classes) and the job's default model "
            f"adversarially trained {p['model_steps']} steps on the references; "
            f"{torch_threads} torch threads, {faiss_threads} faiss threads")
    timing = (f"every variant timed chunk by chunk ({p['chunks']} chunks, order rotated per chunk, each call "
              f"doing its own set-up except the approximate searches, whose indexes are built and calibrated "
              f"once and timed apart); per chunk the fastest of {p['repeats']} round(s)")
    naive = (f"naive reference search (batches of {NAIVE_BATCH}, broadcast difference tensor) timed on "
             f"{n_naive:,} of the {p['queries']:,} queries (the start of every chunk); its queries/s is "
             f"extrapolated from them")
    agree = (f"exact vs faiss flat: {vs_faiss['identical_index_fraction']:.4%} of neighbour indices identical, "
             f"{vs_faiss['rows_differing_by_ties']} queries differ only by ties, "
             f"{vs_faiss['rows_disagreeing']} disagree")
    return [data, timing, naive, agree]
