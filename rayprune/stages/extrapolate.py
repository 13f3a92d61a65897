"""Stage ``extrapolate``: embed the pool with the subset model and score every row.

One streaming Ray Data pipeline, never collected on the driver::

    read_parquet(pool) -> Embedder actors -> Extrapolator actors -> write_parquet(scores)

Embedder actors load the subset model once; Extrapolator actors receive the scored
subset's embeddings, ids, labels and scores once through the object store. The scored
subset's own embeddings and statistics (the references) come from the scoring run's last
recording pass, which saw the subset with the same final model (a scoring run committed
by an older rayprune has none: then the Embedder computes them first). They are saved,
so every extrapolated score can be recomputed by brute force afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayprune import storage
from rayprune.allocator import reuse_freed_memory
from rayprune.config import ConfigError, JobConfig
from rayprune.data.pool import decode_images
from rayprune.robust.recording import embed_with_signals
from rayprune.robust.training import to_float_images
from rayprune.scoring.extrapolate import WEIGHTINGS, ExtrapolationConfig, extrapolate_scores
from rayprune.scoring.learned import (
    KNN_KS,
    SIGNALS,
    cross_fitted_knn_features,
    feature_names,
    fit_score_model,
    knn_features,
)
from rayprune.scoring.neighbours import METRICS, SearchConfig, calibrate_search
from rayprune.scoring.quality import probe_quality, split_probe
from rayprune.scoring.scores import SCORE_DIRECTIONS
from rayprune.stages.common import fresh_dir, stage_for, swap_in, write_json_atomic
from rayprune.stages.prepare import PoolRef, SplitResult
from rayprune.stages.resources import ResourcePlan
from rayprune.stages.score import ScoreResult, embedding_column
from rayprune.stages.training import attack_from_config, load_model_file, write_table_atomic
from rayprune.validation import check_finite_scores

logger = logging.getLogger(__name__)

REFERENCE_FILE = "subset_embeddings.parquet"
QUALITY_FILE = "quality.json"
PROBE_FILE = "probe.parquet"
SCORES_DIR = "scores"


def extrapolation_config(config: JobConfig) -> ExtrapolationConfig:
    e = config.extrapolation
    return ExtrapolationConfig(
        k=e.k, weighting=e.weighting, same_label=e.same_label, search=SearchConfig(metric=e.metric, method=e.method)
    )


@ray.remote(num_cpus=0)
class NodeTally:
    """Counts rows embedded per node, so the manifest shows where the work ran."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def add(self, node: str, rows: int) -> None:
        self.rows[node] = self.rows.get(node, 0) + rows

    def get(self) -> dict[str, int]:
        return dict(self.rows)


class Embedder:
    """Ray Data actor: pool rows -> penultimate-layer embeddings and the subset model's view
    of each row (true-class probability, margin, L2 error; clean, and with ``attack`` also
    adversarial), the model loaded once."""

    def __init__(self, config: JobConfig, model_file: str, num_classes: int, image_shape: list, threads: int,
                 use_gpu: bool, tally=None, attack=None) -> None:
        reuse_freed_memory()
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model_file(config, model_file, num_classes, image_shape[2], self.device).eval()
        self.shape = tuple(image_shape)
        self.attack = attack
        self.tally = tally[0] if tally else None
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        pixels = decode_images(batch["image"], self.shape, ids=batch["id"], origin="pool")
        # The attack's random start is seeded by the batch's first id: the same rows, the same inputs.
        generator = torch.Generator(self.device).manual_seed(int(batch["id"][0])) if self.attack else None
        labels = torch.tensor(batch["label"])  # a copy: torch warns on Ray Data's read-only arrays
        emb, signals = embed_with_signals(self.model, to_float_images(pixels), labels, self.attack, generator=generator)
        if self.tally is not None:
            try:
                ray.get(self.tally.add.remote(self.node, len(emb)))
            except ray.exceptions.RayActorError:  # bookkeeping only: never fail the stream for it
                logger.warning("the per-node row tally is gone; rows per node will be incomplete")
                self.tally = None
        return {"id": batch["id"], "label": batch["label"], "source": batch["source"], "embedding": emb, **signals}


class Extrapolator:
    """Ray Data actor: embeddings -> score, measured flag and neighbour distance per row.

    ``references`` are the neighbours (the scored subset minus the probe); ``measured``
    holds every scored id and score, so scored rows, probe included, keep their own score.
    With ``score_model`` (the learned extrapolator) a row's score is the model's
    prediction from its signals and k-NN features, found with ``extrapolation.search``;
    the neighbour distance is then the mean distance to its 12 nearest references.
    """

    def __init__(self, references: list, extrapolation: ExtrapolationConfig, threads: int,
                 score_model: list | None = None) -> None:
        torch.set_num_threads(threads)
        self.refs = ray.get(references[0])
        self.config = extrapolation
        self.model = ray.get(score_model[0]) if score_model else None
        self.index_cache: dict = {}  # the approx path's index, built on the first batch only

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["id"])
        emb = np.asarray(batch["embedding"], dtype=np.float32)
        if self.model is None:
            result = extrapolate_scores(self.refs["embedding"], self.refs["score"], emb, self.config,
                                        reference_labels=self.refs["label"], query_labels=batch["label"],
                                        index_cache=self.index_cache)
            scores, distance = result.scores.copy(), result.neighbour_distance.astype(np.float64)
        else:
            columns = {name: np.asarray(batch[name]) for name in self.model.features if name in batch}
            columns.update(knn_features(self.refs["embedding"], self.refs["score"], self.refs["label"], emb,
                                        np.asarray(batch["label"]), self.config.search, index_cache=self.index_cache))
            scores, distance = self.model.predict(columns), columns["dist12"].astype(np.float64)
        measured_ids, measured_scores = self.refs["measured_id"], self.refs["measured_score"]
        pos = np.searchsorted(measured_ids, ids).clip(0, len(measured_ids) - 1)
        measured = measured_ids[pos] == ids
        scores[measured], distance[measured] = measured_scores[pos[measured]], 0.0
        return {"id": ids, "label": batch["label"], "source": batch["source"],
                "score": scores, "measured": measured, "neighbour_distance": distance}


def _variant_config(k: int, weighting: str, metric: str, same_label: bool,
                    method: str = "exact") -> ExtrapolationConfig:
    return ExtrapolationConfig(k=k, weighting=weighting, same_label=same_label,
                               search=SearchConfig(metric=metric, method=method))


def variant_grid(config: JobConfig, neighbour_labels: np.ndarray) -> list[tuple[int, str, str, bool]]:
    """(k, weighting, metric, same_label) variants to compare: the configured one first.

    Variants whose k exceeds what the neighbours (or, with same_label, the smallest
    class among them) allow are left out.
    """
    e = config.extrapolation
    smallest_class = int(np.unique(neighbour_labels, return_counts=True)[1].min())
    grid = [(e.k, e.weighting, e.metric, e.same_label)] + [
        (k, w, m, sl) for k in sorted({5, e.k, 25}) for w in WEIGHTINGS for m in METRICS for sl in (False, True)
    ]
    out = []
    for variant in grid:
        if variant not in out and variant[0] <= (smallest_class if variant[3] else len(neighbour_labels)):
            out.append(variant)
    return out


def compare_variants(config: JobConfig, refs: dict, probe: np.ndarray) -> list[dict]:
    """Probe quality of the configured variant and of a small grid around it.

    The first entry is the configured variant (see ``variant_grid``). Neighbours are
    found exactly here: the probe measures extrapolation, and the approximate search's
    recall is measured and reported on its own (:func:`calibrate_for`).
    """
    higher = SCORE_DIRECTIONS[config.scoring.score]
    neighbours = {k: v[~probe] for k, v in refs.items()}
    results = []
    for k, w, m, sl in variant_grid(config, neighbours["label"]):
        result = extrapolate_scores(
            neighbours["embedding"], neighbours["score"], refs["embedding"][probe], _variant_config(k, w, m, sl),
            reference_labels=neighbours["label"], query_labels=refs["label"][probe],
        )
        quality = probe_quality(refs["score"][probe], result.scores, config.selection.keep_fraction, higher)
        results.append({"model": "knn", "name": knn_name(k, w, m, sl), "k": k, "weighting": w, "metric": m,
                        "same_label": sl, **quality.as_dict(), "_extrapolated": result.scores})
    return results


def knn_name(k: int, weighting: str, metric: str, same_label: bool) -> str:
    return f"knn k={k} {weighting} {metric}{' same-label' if same_label else ''}"


def signal_kinds(config: JobConfig) -> tuple[str, ...]:
    """The one-pass signals the learned extrapolator uses (the embedding pass records them)."""
    return ("clean",) if config.extrapolation.signals == "clean" else ("clean", "adv")


def signal_columns(config: JobConfig) -> tuple[str, ...]:
    return tuple(name for kind in signal_kinds(config) for name in SIGNALS[kind])


def fit_learned(config: JobConfig, refs: dict, probe: np.ndarray):
    """The learned extrapolator fitted on the neighbours (the scored subset minus the probe),
    with cross-fitted k-NN features, and its probe quality entry (None without a probe)."""
    neighbours = {k: v[~probe] for k, v in refs.items()}
    features = feature_names(signal_kinds(config))
    columns = {name: neighbours[name] for name in signal_columns(config)}
    columns.update(cross_fitted_knn_features(neighbours["embedding"], neighbours["score"], neighbours["label"],
                                             seed=config.split.seed))
    model = fit_score_model(columns, neighbours["score"], features, seed=config.split.seed)
    if not probe.any():
        return model, None
    probe_columns = {name: refs[name][probe] for name in signal_columns(config)}
    probe_columns.update(knn_features(neighbours["embedding"], neighbours["score"], neighbours["label"],
                                      refs["embedding"][probe], refs["label"][probe]))
    predicted = model.predict(probe_columns)
    quality = probe_quality(refs["score"][probe], predicted, config.selection.keep_fraction,
                            SCORE_DIRECTIONS[config.scoring.score])
    name = f"learned ({' + '.join(signal_kinds(config))} signals + kNN features)"
    return model, {"model": "learned", "name": name, "signals": config.extrapolation.signals,
                   **quality.as_dict(), "_extrapolated": predicted}


@dataclass(frozen=True)
class ExtrapolateResult:
    scores_dir: Path
    reference_file: Path
    rows_per_node: dict[str, int]
    quality: dict
    probe_file: Path | None
    digest: str


CALIBRATION_QUERIES = 2000


def calibrate_for(config: JobConfig, chosen: ExtrapolationConfig, refs: dict, probe: np.ndarray):
    """The chosen variant's search, widened until recall@k reaches ``extrapolation.min_recall``.

    The queries are the probe (scored samples that are not neighbours, like the rest of
    the pool), or without a probe a sample of the neighbours themselves, each leaving
    its own match out. Returns (the config to extrapolate with, the calibration)."""
    neighbours = {k: v[~probe] for k, v in refs.items()}
    rng = np.random.default_rng([config.split.seed, 17])
    if probe.any():
        rows = np.flatnonzero(probe)
        rows = np.sort(rng.choice(rows, min(len(rows), CALIBRATION_QUERIES), replace=False))
        queries, labels, self_index = refs["embedding"][rows], refs["label"][rows], None
    else:
        self_index = np.sort(rng.choice(len(neighbours["id"]), min(len(neighbours["id"]), CALIBRATION_QUERIES),
                                        replace=False))
        queries, labels = neighbours["embedding"][self_index], neighbours["label"][self_index]
    same = {"query_labels": labels, "reference_labels": neighbours["label"]} if chosen.same_label else {}
    calibration = calibrate_search(queries, neighbours["embedding"], chosen.k, chosen.search,
                                   config.extrapolation.min_recall, self_index=self_index, **same)
    if chosen.search.method != "exact":
        if calibration.options.method == "exact":
            logger.warning("extrapolation.method %s: %s; searching exactly (widths tried: %s)", chosen.search.method,
                           calibration.note, ", ".join(f"{w}: {r:.3f}" for w, r in calibration.tried))
        else:
            logger.info("extrapolation.method %s: search width %s gives recall@%d %.3f on %d queries",
                        chosen.search.method, calibration.as_dict()["search_width"], chosen.k, calibration.recall,
                        calibration.sample)
    return dataclasses.replace(chosen, search=calibration.options), calibration


def embed_rows(ds, config: JobConfig, info, model_file, plan: ResourcePlan, actors: int, tally=None,
               rechunk: bool = False):
    """``ds`` (pool rows) -> rows with an ``embedding`` column, on a pool of Embedder actors.

    ``rechunk`` re-chunks the stream into batch-sized blocks first: Ray merges small
    files into few blocks and a block goes to one actor, so without it a pool could be
    embedded by a single actor on a single node.
    """
    size = config.ray.inference_batch_size
    if rechunk:
        ds = ds.repartition(target_num_rows_per_block=size)
    kwargs = {
        "config": config, "model_file": str(model_file), "num_classes": info.num_classes,
        "image_shape": list(info.image_shape), "threads": plan.embed_threads,
        "use_gpu": plan.embed_gpus_per_actor > 0, "tally": [tally] if tally is not None else None,
        "attack": attack_from_config(config) if "adv" in signal_kinds(config) and
        config.extrapolation.model == "learned" else None,
    }
    # Ray Data places actor pools with SPREAD by default (DataContext.scheduling_strategy), so
    # the actors land on different nodes, reads stay local and all nodes work.
    args = {"compute": ray.data.ActorPoolStrategy(size=actors), "num_cpus": plan.embed_cpus_per_actor,
            "batch_format": "numpy"}
    if plan.embed_gpus_per_actor:
        args["num_gpus"] = plan.embed_gpus_per_actor
    return ds.map_batches(Embedder, fn_constructor_kwargs=kwargs, batch_size=size, **args)


def recorded_references(score: ScoreResult, measured: pa.Table) -> pa.Table | None:
    """The scored subset's references as the scoring run recorded them (id, label,
    embedding, the ``measured`` score and the final model's statistics), sorted by id;
    None when the run recorded none (committed by an older rayprune)."""
    files = sorted(score.references_dir.glob("rank_*.parquet")) if score.references_dir.is_dir() else []
    if not files:
        return None
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")
    if not np.array_equal(measured["id"].to_numpy(), table["id"].to_numpy()):
        raise RuntimeError(f"the references in {score.references_dir} and the subset scores {score.scores_file} "
                           "cover different ids")
    signals = [name for name in table.column_names if name not in ("id", "label", "embedding")]
    return pa.table({"id": table["id"], "label": table["label"], "embedding": table["embedding"],
                     "score": measured["score"], **{name: table[name] for name in signals}})


def embed_references(config, pool, split, score, plan, measured: pa.Table) -> pa.Table:
    """Embeddings of the scored subset (id, label, embedding, the ``measured`` score), sorted
    by id, from a pass of the Embedder (for a scoring run that recorded none)."""
    ds = embed_rows(ray.data.read_parquet(str(split.subset_dir)), config, pool.info, score.model_file, plan, 1)
    ids, labels, embs, signals = [], [], [], {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(batch["id"])
        labels.append(batch["label"])
        embs.append(np.asarray(batch["embedding"], dtype=np.float32))
        for name in (n for kind in SIGNALS.values() for n in kind if n in batch):
            signals.setdefault(name, []).append(np.asarray(batch[name], dtype=np.float32))
    ids, labels, embs = np.concatenate(ids), np.concatenate(labels), np.concatenate(embs)
    order = np.argsort(ids)
    if not np.array_equal(measured["id"].to_numpy(), ids[order]):
        raise RuntimeError("subset embeddings and subset scores cover different ids")
    return pa.table({
        "id": ids[order], "label": labels[order],
        "embedding": embedding_column(embs[order]),
        "score": measured["score"],
        **{name: np.concatenate(parts)[order] for name, parts in signals.items()},
    })


def read_references(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    dim = table.schema.field("embedding").type.list_size
    signals = {name: table[name].to_numpy() for name in table.column_names
               if name not in ("id", "label", "score", "embedding")}
    return {
        "id": table["id"].to_numpy(), "label": table["label"].to_numpy(), "score": table["score"].to_numpy(),
        "embedding": table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim).astype(np.float32),
        **signals,
    }


def check_neighbour_counts(config: JobConfig, neighbour_labels: np.ndarray) -> None:
    """``extrapolation.k`` neighbours must exist (of every class, with ``same_label``)."""
    k, n = config.extrapolation.k, len(neighbour_labels)
    if k > n:
        raise ConfigError(f"extrapolation.k={k} exceeds the {n} scored samples used as neighbours; lower k, "
                          "raise split.subset_fraction or lower extrapolation.probe_fraction")
    if config.extrapolation.same_label:
        classes, counts = np.unique(neighbour_labels, return_counts=True)
        if counts.min() < k:
            raise ConfigError(f"extrapolation.same_label needs extrapolation.k={k} scored neighbours of every class; "
                              f"class {int(classes[counts.argmin()])} has {int(counts.min())}: lower k or turn "
                              "same_label off")


def choose_extrapolator(config: JobConfig, refs: dict, probe: np.ndarray, probe_file: Path):
    """The extrapolator to score the pool with, and the probe's quality report.

    Returns (the kNN config to use, or for the learned model the config of its k-NN
    feature search; the fitted learned model or None; the quality dict). Every kNN
    variant of the grid and the learned model are measured on the probe; the configured
    one is used, or with ``extrapolation.auto`` the one with the best probe Spearman.
    The probe's extrapolated scores are written to ``probe_file``.
    """
    learned = config.extrapolation.model == "learned"
    model, learned_entry = fit_learned(config, refs, probe) if learned or config.extrapolation.auto else (None, None)
    n_neighbours = int((~probe).sum())
    feature_search = ExtrapolationConfig(k=min(max(KNN_KS), n_neighbours),
                                         search=SearchConfig(metric="euclidean", method=config.extrapolation.method))
    if not probe.any():
        quality = {"probe_n": 0, "variants": [], "chosen": None, "auto": config.extrapolation.auto}
        return (feature_search if learned else extrapolation_config(config)), (model if learned else None), quality
    variants = compare_variants(config, refs, probe)
    if learned_entry is not None:
        variants.insert(0 if learned else len(variants), learned_entry)
    best = max(variants, key=lambda v: -np.inf if np.isnan(v["probe_spearman"]) else v["probe_spearman"])
    pick = best if config.extrapolation.auto else variants[0]
    write_table_atomic(pa.table({"id": refs["id"][probe], "measured": refs["score"][probe],
                                 "extrapolated": pick["_extrapolated"]}), probe_file)
    strip = lambda v: {k: x for k, x in v.items() if not k.startswith("_")}  # noqa: E731
    quality = {"probe_n": int(probe.sum()), "variants": [strip(v) for v in variants], "chosen": strip(pick),
               "auto": config.extrapolation.auto}
    c = quality["chosen"]
    logger.info("extrapolation quality on a probe of %d scored samples (%s): Spearman %.3f, Pearson %.3f, kept "
                "overlap %.3f", c["probe_n"], c["name"], c["probe_spearman"], c["probe_pearson"],
                c["probe_kept_overlap"])
    if pick["model"] == "learned":
        return feature_search, model, quality
    return _variant_config(pick["k"], pick["weighting"], pick["metric"], pick["same_label"],
                           config.extrapolation.method), None, quality


def run_extrapolate(config: JobConfig, pool: PoolRef, split: SplitResult, score: ScoreResult, root: Path,
                    plan: ResourcePlan) -> ExtrapolateResult:
    upstream, facts = pool.as_input("pool")
    stage = stage_for(config, root, "extrapolate", ("extrapolation", "scoring"),
                      upstream={**upstream, "score_subset": score.digest}, facts=facts)
    scores_dir, ref_file = stage.dir / SCORES_DIR, stage.dir / REFERENCE_FILE
    record = stage.committed()
    if record is None:
        stage.begin()
        measured = pq.read_table(score.scores_file)
        check_finite_scores(measured["id"].to_numpy(), measured["score"].to_numpy(),
                            f"subset scores {score.scores_file}")
        refs_table = recorded_references(score, measured)
        if refs_table is None:
            logger.info("the scoring run in %s recorded no references (an older rayprune's): embedding the subset",
                        score.references_dir.parent)
            refs_table = embed_references(config, pool, split, score, plan, measured)
        pq.write_table(refs_table, ref_file)
        refs = read_references(ref_file)
        probe = split_probe(len(refs["id"]), config.extrapolation.probe_fraction, config.split.seed)
        check_neighbour_counts(config, refs["label"][~probe])
        chosen, score_model, quality = choose_extrapolator(config, refs, probe, stage.dir / PROBE_FILE)
        chosen, calibration = calibrate_for(config, chosen, refs, probe)
        quality["search"] = calibration.as_dict()
        write_json_atomic(stage.dir / QUALITY_FILE, quality)
        neighbours = {k: v[~probe] for k, v in refs.items()}
        neighbours.update(measured_id=refs["id"], measured_score=refs["score"])
        refs_ref = ray.put(neighbours)
        # On the driver's node: a tally on a worker node would die with that node.
        tally = NodeTally.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
        tmp = fresh_dir(stage.dir / ".scores.partial")
        logger.info("embedding and scoring %d pool rows (%d embed + %d extrapolate actors)",
                    pool.info.num_rows, plan.embed_actors, plan.extrapolate_actors)
        (
            embed_rows(ray.data.read_parquet(**storage.ray_parquet_source(pool.files)), config, pool.info,
                       score.model_file, plan, plan.embed_actors, tally, rechunk=True)
            .map_batches(Extrapolator,
                         fn_constructor_kwargs={"references": [refs_ref], "extrapolation": chosen,
                                                "threads": plan.extrapolate_threads,
                                                "score_model": [ray.put(score_model)] if score_model else None},
                         compute=ray.data.ActorPoolStrategy(size=plan.extrapolate_actors),
                         num_cpus=plan.extrapolate_cpus_per_actor, batch_size=config.ray.inference_batch_size * 4,
                         batch_format="numpy")
            .write_parquet(str(tmp))
        )
        rows_per_node = ray.get(tally.get.remote())
        ray.kill(tally)
        written = pads.dataset(str(tmp), format="parquet").count_rows()
        if written != pool.info.num_rows:
            raise RuntimeError(f"extrapolate: wrote {written} score rows for a pool of {pool.info.num_rows}")
        swap_in(tmp, scores_dir)
        record = stage.commit({"rows": written, "rows_per_node": rows_per_node})
    quality = json.loads((stage.dir / QUALITY_FILE).read_text())
    probe_file = stage.dir / PROBE_FILE
    return ExtrapolateResult(scores_dir, ref_file, record["outputs"]["rows_per_node"], quality,
                             probe_file if probe_file.exists() else None, stage.input_digest)
