"""Stage ``extrapolate``: embed the pool with the subset model and score every row.

One streaming Ray Data pipeline, never collected on the driver::

    read_parquet(pool) -> Embedder actors -> Extrapolator actors -> write_parquet(scores)

Embedder actors load the subset model once; Extrapolator actors receive the scored
subset's embeddings, ids, labels and scores once through the object store. The scored
subset's own embeddings are computed first by the same Embedder (the subset is small)
and saved, so every extrapolated score can be recomputed by brute force afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch

from rayprune.config import JobConfig, to_dict
from rayprune.data.pool import decode_images
from rayprune.robust.training import to_float_images
from rayprune.scoring.extrapolate import ExtrapolationConfig, extrapolate_scores
from rayprune.scoring.neighbours import SearchOptions
from rayprune.stages.common import Stage, digest, fresh_dir, swap_in
from rayprune.stages.prepare import PoolRef, SplitResult
from rayprune.stages.resources import ResourcePlan
from rayprune.stages.score import ScoreResult
from rayprune.stages.training import load_model_file

logger = logging.getLogger(__name__)

REFERENCE_FILE = "subset_embeddings.parquet"
SCORES_DIR = "scores"


def extrapolation_config(config: JobConfig) -> ExtrapolationConfig:
    e = config.extrapolation
    return ExtrapolationConfig(
        k=e.k, weighting=e.weighting, same_label=e.same_label, search=SearchOptions(metric=e.metric, method=e.method)
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
    """Ray Data actor: pool rows -> penultimate-layer embeddings (model loaded once)."""

    def __init__(self, job: dict, model_file: str, num_classes: int, image_shape: list, threads: int,
                 use_gpu: bool, tally=None) -> None:
        from rayprune.config import JobConfig, from_dict

        torch.set_num_threads(threads)
        config = from_dict(JobConfig, job)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model_file(config, model_file, num_classes, image_shape[2], self.device).eval()
        self.shape = tuple(image_shape)
        self.tally = tally[0] if tally else None
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        images = to_float_images(decode_images(batch["image"], self.shape)).to(self.device)
        with torch.inference_mode():
            emb = self.model.embed(images).float().cpu().numpy()
        if self.tally is not None:
            ray.get(self.tally.add.remote(self.node, len(emb)))
        return {"id": batch["id"], "label": batch["label"], "source": batch["source"], "embedding": emb}


class Extrapolator:
    """Ray Data actor: embeddings -> score, measured flag and neighbour distance per row."""

    def __init__(self, references: list, extrapolation: ExtrapolationConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        self.refs = ray.get(references[0])
        self.config = extrapolation

    def __call__(self, batch: dict) -> dict:
        result = extrapolate_scores(
            self.refs["embedding"], self.refs["score"], np.asarray(batch["embedding"], dtype=np.float32), self.config,
            reference_ids=self.refs["id"], query_ids=batch["id"],
            reference_labels=self.refs["label"], query_labels=batch["label"],
        )
        return {
            "id": batch["id"], "label": batch["label"], "source": batch["source"],
            "score": result.scores, "measured": result.measured,
            "neighbour_distance": result.neighbour_distance.astype(np.float64),
        }


@dataclass(frozen=True)
class ExtrapolateResult:
    scores_dir: Path
    reference_file: Path
    rows_per_node: dict[str, int]
    digest: str


def _embedder_kwargs(config: JobConfig, pool: PoolRef, score: ScoreResult, plan: ResourcePlan, tally) -> dict:
    return {
        "job": to_dict(config), "model_file": str(score.model_file), "num_classes": pool.info.num_classes,
        "image_shape": list(pool.info.image_shape), "threads": plan.threads(plan.embed_cpus_per_actor),
        "use_gpu": plan.embed_gpus_per_actor > 0, "tally": [tally] if tally is not None else None,
    }


def _embed_map_args(plan: ResourcePlan, size: int) -> dict:
    # SPREAD places the actors on different nodes, so reads stay local and all nodes work.
    args = {"compute": ray.data.ActorPoolStrategy(size=size), "num_cpus": plan.embed_cpus_per_actor,
            "batch_format": "numpy", "scheduling_strategy": "SPREAD"}
    if plan.embed_gpus_per_actor:
        args["num_gpus"] = plan.embed_gpus_per_actor
    return args


def embed_references(config, pool, split, score, plan) -> pa.Table:
    """Embeddings of the scored subset (id, label, embedding, score), sorted by id."""
    ds = ray.data.read_parquet(str(split.subset_dir)).map_batches(
        Embedder, fn_constructor_kwargs=_embedder_kwargs(config, pool, score, plan, None),
        batch_size=config.ray.inference_batch_size, **_embed_map_args(plan, 1),
    )
    ids, labels, embs = [], [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(batch["id"])
        labels.append(batch["label"])
        embs.append(np.asarray(batch["embedding"], dtype=np.float32))
    ids, labels, embs = np.concatenate(ids), np.concatenate(labels), np.concatenate(embs)
    order = np.argsort(ids)
    scores = pq.read_table(score.scores_file)
    if not np.array_equal(scores["id"].to_numpy(), ids[order]):
        raise RuntimeError("subset embeddings and subset scores cover different ids")
    dim = embs.shape[1]
    return pa.table({
        "id": ids[order], "label": labels[order],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embs[order].reshape(-1)), dim),
        "score": scores["score"],
    })


def read_references(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    dim = table.schema.field("embedding").type.list_size
    return {
        "id": table["id"].to_numpy(), "label": table["label"].to_numpy(), "score": table["score"].to_numpy(),
        "embedding": table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim).astype(np.float32),
    }


def run_extrapolate(config: JobConfig, pool: PoolRef, split: SplitResult, score: ScoreResult, root: Path,
                    plan: ResourcePlan) -> ExtrapolateResult:
    stage = Stage("extrapolate", root, digest(pool.digest, score.digest, to_dict(config.extrapolation)))
    scores_dir, ref_file = stage.dir / SCORES_DIR, stage.dir / REFERENCE_FILE
    record = stage.committed()
    if record is None:
        stage.begin()
        refs_table = embed_references(config, pool, split, score, plan)
        pq.write_table(refs_table, ref_file)
        refs = read_references(ref_file)
        if config.extrapolation.k > len(refs["id"]):
            raise ValueError(
                f"extrapolation.k={config.extrapolation.k} exceeds the {len(refs['id'])} scored samples; "
                f"lower k or raise split.subset_fraction"
            )
        refs_ref = ray.put(refs)
        tally = NodeTally.remote()
        tmp = fresh_dir(stage.dir / ".scores.partial")
        logger.info("embedding and scoring %d pool rows (%d embed + %d extrapolate actors)",
                    pool.info.num_rows, plan.embed_actors, plan.extrapolate_actors)
        (
            ray.data.read_parquet(pool.files)
            # Streaming re-chunk into batch-sized blocks: Ray merges small files into few
            # blocks and a block goes to one actor, so without this a pool could be
            # embedded by a single actor on a single node.
            .repartition(target_num_rows_per_block=config.ray.inference_batch_size)
            .map_batches(Embedder, fn_constructor_kwargs=_embedder_kwargs(config, pool, score, plan, tally),
                         batch_size=config.ray.inference_batch_size, **_embed_map_args(plan, plan.embed_actors))
            .map_batches(Extrapolator,
                         fn_constructor_kwargs={"references": [refs_ref], "extrapolation": extrapolation_config(config),
                                                "threads": plan.threads(plan.extrapolate_cpus_per_actor)},
                         compute=ray.data.ActorPoolStrategy(size=plan.extrapolate_actors),
                         num_cpus=plan.extrapolate_cpus_per_actor, batch_size=config.ray.inference_batch_size * 4,
                         batch_format="numpy", scheduling_strategy="SPREAD")
            .write_parquet(str(tmp))
        )
        rows_per_node = ray.get(tally.get.remote())
        ray.kill(tally)
        written = pads.dataset(str(tmp), format="parquet").count_rows()
        if written != pool.info.num_rows:
            raise RuntimeError(f"extrapolate: wrote {written} score rows for a pool of {pool.info.num_rows}")
        swap_in(tmp, scores_dir)
        record = stage.commit({"rows": written, "rows_per_node": rows_per_node})
    return ExtrapolateResult(scores_dir, ref_file, record["outputs"]["rows_per_node"], stage.input_digest)
