"""Stage ``score_subset``: distributed adversarial training on the subset with Ray Train.

Each worker holds a fixed shard of the subset (every ``world``-th id in id order),
trains with DDP (gloo on CPU, NCCL on GPU) for ``epochs`` x ``steps_per_epoch``
optimiser steps, and after every epoch records its shard's clean and adversarial
true-class statistics to ``records/epoch_EEEE-rank_RRR.parquet`` (written atomically, so
a repeated epoch overwrites rather than duplicates). The last epoch's recording pass also
keeps its shard's embeddings, from the same clean forward pass, next to its labels and
statistics in ``references/rank_RRR.parquet``: the extrapolation's references, which then
cost no pass of their own. A checkpoint is reported every epoch (after that epoch's files
are written); rerunning the job resumes from the latest one. When training ends, the
driver turns each shard's histories into scores, one shard at a time (memory bounded by a
shard).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayprune.config import JobConfig
from rayprune.errors import InputError
from rayprune.robust.loop import BatchStream, IndexedBatches, train_steps
from rayprune.robust.recording import RECORDED_FIELDS, EpochRecord, record_predictions
from rayprune.scoring.scores import score_from_histories
from rayprune.stages.common import output_path, stage_for, write_json_atomic
from rayprune.stages.prepare import PoolRef, SplitResult
from rayprune.stages.resources import ResourcePlan
from rayprune.stages.training import (
    TrainingSpec,
    report_epoch,
    resume,
    run_trainer,
    save_model_file,
    share_rank0_buffers,
    start_worker,
    write_table_atomic,
)
from rayprune.validation import check_finite_scores

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
SCORES_FILE = "subset_scores.parquet"


def steps_per_epoch(config: JobConfig, n_real: int, n_pool: int) -> int:
    """Optimiser steps per scoring epoch: as set, or one pass over the real part.

    Sizing by the real part (the whole pool if there is none), not by the subset, gives
    the scoring run the step budget of a full run; one pass over a 10% subset per epoch
    gives scores unrelated to full-run scores (docs/method.md, "The scoring run's budget").
    """
    if config.train.steps_per_epoch:
        return config.train.steps_per_epoch
    basis = n_real if n_real > 0 else n_pool
    return max(1, math.ceil(basis / config.train.batch_size))


def record_path(records_dir: Path, epoch: int, rank: int) -> Path:
    return records_dir / f"epoch_{epoch:04d}-rank_{rank:03d}.parquet"


def references_path(references_dir: Path, rank: int) -> Path:
    return references_dir / f"rank_{rank:03d}.parquet"


def embedding_column(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """``(N, D)`` float32 embeddings as the references' fixed-size list column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), embeddings.shape[1])


def references_table(ids: np.ndarray, labels: np.ndarray, record: EpochRecord) -> pa.Table:
    """One shard's references: id, label, the embedding and the recorded statistics."""
    assert record.embedding is not None
    return pa.table({"id": ids, "label": labels, "embedding": embedding_column(record.embedding),
                     **{f: getattr(record, f) for f in RECORDED_FIELDS}})


@dataclass(frozen=True)
class ScoringSpec:
    """The scoring run's workers' input: the shared training spec and where to write."""

    training: TrainingSpec
    records_dir: Path
    model_file: Path
    references_dir: Path


def scoring_loop(spec: ScoringSpec) -> None:
    """Ray Train worker function (runs on every worker): train, and record every epoch."""
    w = start_worker(spec.training)
    config, per_epoch, epochs = spec.training.config, spec.training.steps_per_epoch, spec.training.recipe.epochs
    stream = BatchStream(len(w.ids), w.batch_size, seed=w.stream_seed)
    saved = resume(w, stream)
    for epoch in range(saved["epoch"] + 1 if saved else 0, epochs):
        generator = w.generator(epoch)
        stats = train_steps(
            w.model, w.optimizer, IndexedBatches(w.images, w.labels, stream), w.attack, w.recipe,
            steps=per_epoch, first_step=epoch * per_epoch, total_steps=per_epoch * epochs, generator=generator,
            scaler=w.scaler,
        )
        last = epoch == epochs - 1
        share_rank0_buffers(w.raw, w.world)  # every shard recorded by the model rank 0 checkpoints and saves
        record = record_predictions(w.raw, w.images, w.labels, w.attack, generator=generator,
                                    batch_size=config.ray.inference_batch_size, with_embeddings=last)
        if last:  # before the epoch's record and checkpoint: a resumed run finds it written
            write_table_atomic(references_table(w.ids, w.labels.cpu().numpy(), record),
                               references_path(spec.references_dir, w.rank))
        table = pa.table({"id": w.ids, **{f: getattr(record, f) for f in RECORDED_FIELDS}})
        write_table_atomic(table, record_path(spec.records_dir, epoch, w.rank))
        metrics = {
            "epoch": epoch, "loss": stats["loss"], "lr": stats["lr"],
            "clean_acc": float((record.margin_clean > 0).mean()), "adv_acc": float((record.margin_adv > 0).mean()),
        }
        if w.rank == 0:
            logger.info(
                "scoring epoch %d/%d: loss %.3f, lr %.4f, shard clean acc %.3f, adv acc %.3f",
                epoch + 1, epochs, metrics["loss"], metrics["lr"], metrics["clean_acc"], metrics["adv_acc"],
            )
            write_json_atomic(spec.records_dir / f"metrics_{epoch:04d}.json", metrics)
        report_epoch(w, epoch, metrics)
    if w.rank == 0:
        save_model_file(w.raw.state_dict(), spec.model_file, spec.training.identity)


def read_epoch_metrics(records_dir: Path, epochs: int) -> list[dict]:
    """Rank 0's per-epoch training metrics (loss, lr, clean/adversarial accuracy)."""
    out = []
    for epoch in range(epochs):
        path = records_dir / f"metrics_{epoch:04d}.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
    return out


@dataclass(frozen=True)
class ScoreResult:
    model_file: Path
    scores_file: Path
    training_steps: int
    history: list[dict]
    digest: str
    #: ``rank_RRR.parquet`` per training worker (:func:`references_table`); empty or
    #: missing for a scoring run committed by an older rayprune.
    references_dir: Path


def assemble_scores(config: JobConfig, records_dir: Path, world: int, epochs: int) -> pa.Table:
    """Per shard: stack the epoch records, check them, compute scores; then concatenate."""
    parts = []
    sig = config.scoring.signal
    for rank in range(world):
        tables = []
        for epoch in range(epochs):
            path = record_path(records_dir, epoch, rank)
            if not path.exists():
                raise RuntimeError(f"record {path.name} is missing: epoch {epoch} of shard {rank} was never recorded")
            tables.append(pq.read_table(path))
        ids = tables[0]["id"].to_numpy()
        for epoch, t in enumerate(tables):
            if not np.array_equal(t["id"].to_numpy(), ids):
                raise RuntimeError(f"record of epoch {epoch}, shard {rank} holds different ids than epoch 0")
        hist = {f: np.stack([t[f].to_numpy() for t in tables])
                for f in (f"p_{sig}", f"margin_{sig}", f"l2_error_{sig}")}
        for name, values in hist.items():
            bad = np.argwhere(~np.isfinite(values))
            if len(bad):
                epoch, col = (int(v) for v in bad[0])
                raise InputError(
                    f"{record_path(records_dir, epoch, rank)}: {name} of id {int(ids[col])} is {values[epoch, col]}; "
                    "recorded histories must be finite (the scoring run diverged: lower train.lr or check the pool)"
                )
        scores = score_from_histories(
            config.scoring.score, hist[f"p_{sig}"], hist[f"margin_{sig}"], hist[f"l2_error_{sig}"],
            window=config.scoring.window, seed=config.split.seed + rank,
        )
        check_finite_scores(ids, scores, f"{config.scoring.score} scores from {records_dir} (shard {rank})")
        parts.append(pa.table({"id": ids, "score": scores}))
    table = pa.concat_tables(parts).sort_by("id")
    return table


def run_score(config: JobConfig, pool: PoolRef, split: SplitResult, root: Path, plan: ResourcePlan) -> ScoreResult:
    """Train on the subset with Ray Train, record histories, compute the subset's scores."""
    per_epoch = steps_per_epoch(config, split.n_real, split.n_pool)
    stage = stage_for(config, root, "score_subset", ("model", "attack", "train"), upstream={"split": split.digest},
                      facts={"training workers": plan.train_workers}, resumable=True)
    records_dir, model_file, references_dir = stage.dir / "records", stage.dir / MODEL_FILE, stage.dir / "references"
    scoring = config.scoring
    scores_file = output_path(stage.dir, f"{scoring.score}-{scoring.signal}-w{scoring.window}-{SCORES_FILE}")
    total_steps = per_epoch * config.train.epochs
    if stage.committed() is None:
        stage.begin()
        records_dir.mkdir(exist_ok=True)
        references_dir.mkdir(exist_ok=True)
        logger.info(
            "scoring run: %d subset samples on %d worker(s), %d epochs x %d steps of global batch %d",
            len(split.subset_ids), plan.train_workers, config.train.epochs, per_epoch, config.train.batch_size,
        )
        spec = ScoringSpec(
            TrainingSpec(config, config.train, str(split.subset_dir), np.sort(split.subset_ids),
                         tuple(pool.info.image_shape), pool.info.num_classes, per_epoch,
                         plan.threads(plan.train_cpus_per_worker)),
            records_dir, model_file, references_dir,
        )
        run_trainer(scoring_loop, spec, stage, plan, "scoring run", config.ray.storage_path)
        if not model_file.exists():
            raise RuntimeError("scoring run ended without saving the model")
        stage.commit({"training_steps": total_steps})
    if not scores_file.exists():
        table = assemble_scores(config, records_dir, plan.train_workers, config.train.epochs)
        if not np.array_equal(table["id"].to_numpy(), np.sort(split.subset_ids)):
            raise RuntimeError("subset scores do not cover exactly the subset ids")
        write_table_atomic(table, scores_file)
    return ScoreResult(model_file, scores_file, total_steps, read_epoch_metrics(records_dir, config.train.epochs),
                       stage.input_digest, references_dir)
