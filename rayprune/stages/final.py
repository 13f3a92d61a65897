"""Stage ``final_train``: the robust model, adversarially trained on the pruned pool.

Every batch mixes prunable (synthetic) and other (real) samples at
``final.synthetic_fraction``. How the rows reach the Ray Train workers is
``final.data_loading``: each worker loads its shard into memory before training, or the
prunable part streams from Ray Data (decoded as it arrives, file order reshuffled every
pass, a local shuffle buffer per worker) while the real part, small, stays in memory;
``auto`` streams when a worker's in-memory shard would pass ``final.memory_limit_mib``. An EMA of the
weights is kept; after every epoch the EMA model's robust accuracy on a held-out
validation set (PGD with the CW loss) picks the best checkpoint and drives early
stopping. The step budget is explicit (``final.train.epochs`` x ``steps_per_epoch``) and
the sample-gradient steps are recorded, so pruning's saving is visible in the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from rayprune.config import ConfigError, JobConfig
from rayprune.data.pool import pool_files, read_pool_info
from rayprune.robust.ema import ModelEMA
from rayprune.robust.loop import (
    BatchStream,
    ConcatBatches,
    IndexedBatches,
    MixedBatchStream,
    StreamedBatches,
    mix_counts,
    train_steps,
)
from rayprune.robust.recording import record_predictions
from rayprune.robust.training import to_float_images
from rayprune.stages.common import stage_for
from rayprune.stages.prepare import PoolRef, read_ids_and_sources
from rayprune.stages.resources import ResourcePlan, streaming_plan
from rayprune.stages.stream import STREAM_DATASET, stream_dataset, stream_passes
from rayprune.stages.training import (
    TrainingSpec,
    attack_from_config,
    load_rows,
    report_epoch,
    resume,
    run_trainer,
    save_model_file,
    share_rank0_buffers,
    start_worker,
)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class FinalResult:
    model_file: Path
    history: list[dict]
    best_epoch: int
    val_robust_acc: float
    training_steps: int
    sample_gradient_steps: int
    n_train: int
    n_val: int
    digest: str
    data_loading: str  # "memory" or "stream": how the rows reached the workers
    data_loading_reason: str


#: Bytes a worker holds per image pixel channel at its peak: the float32 tensor
#: ``load_float_rows`` decodes into batch by batch, plus Parquet's read buffers (measured
#: about 4.4 at 1M rows of 32 px images).
MEMORY_BYTES_PER_VALUE = 5


def choose_data_loading(mode: str, rows_per_worker: int, image_shape, limit_mib: int) -> tuple[str, str]:
    """``("memory" | "stream", why)``: ``auto`` streams when a worker's in-memory shard of
    ``rows_per_worker`` images would exceed ``limit_mib`` (:data:`MEMORY_BYTES_PER_VALUE`)."""
    need_mib = rows_per_worker * int(np.prod(image_shape)) * MEMORY_BYTES_PER_VALUE / 2**20
    size = f"{rows_per_worker} rows per worker would need about {need_mib:.{0 if need_mib >= 10 else 1}f} MiB in memory"
    if mode != "auto":
        return mode, f"set by final.data_loading; {size}"
    if need_mib > limit_mib:
        return "stream", f"auto: {size}, over final.memory_limit_mib={limit_mib}"
    return "memory", f"auto: {size}, within final.memory_limit_mib={limit_mib}"


@dataclass(frozen=True)
class StreamSpec:
    """The streamed part of the final training: ``rows`` in the stream (all workers),
    ``counts`` per worker and step (streamed, in-memory), and the local shuffle buffer."""

    rows: int
    counts: tuple[int, int]
    shuffle_buffer: int


def plan_data_loading(fc, n_train: int, n_stream: int, n_real: int, workers: int, image_shape,
                      mixed: bool) -> tuple[str, str, StreamSpec | None]:
    """``(loading, why, stream)`` for a final training of ``n_train`` rows on ``workers``:
    ``n_stream`` of them would stream (the prunable ones when batches are ``mixed``, else all),
    ``n_real`` are real. A forced ``stream`` that cannot fill one batch per worker is a
    ConfigError; ``auto`` then falls back to memory."""
    loading, why = choose_data_loading(fc.data_loading, math.ceil(n_train / workers), image_shape,
                                       fc.memory_limit_mib)
    if loading != "stream":
        return loading, why, None
    per_worker = max(1, fc.train.batch_size // workers)
    counts = mix_counts(per_worker, fc.synthetic_fraction, n_stream, n_real) if mixed else [per_worker, 0]
    if counts[0] == 0:  # final.synthetic_fraction=0: no batch takes a prunable row
        return "memory", "no batch takes a prunable row (final.synthetic_fraction=0), nothing to stream", None
    if n_stream // workers < counts[0]:
        if fc.data_loading == "stream":
            raise ConfigError(f"final.data_loading=stream: the stream holds {n_stream} rows, fewer than one batch of "
                              f"{counts[0]} per worker for {workers} worker(s); use final.data_loading=memory")
        return "memory", f"auto: the stream would hold fewer than one batch per worker ({n_stream} rows)", None
    return "stream", why, StreamSpec(n_stream, (int(counts[0]), int(counts[1])), fc.shuffle_buffer)


def split_train_val(ids: np.ndarray, sources: np.ndarray, prunable_sources, val_size: int):
    """Validation = the ``val_size`` lowest non-prunable (real) ids; the rest trains.

    Without any real samples the lowest ids of the pool are used.
    """
    real = ~np.isin(sources, list(prunable_sources))
    candidates = ids[real] if real.any() else ids
    val = np.sort(candidates)[:val_size]
    train = np.setdiff1d(ids, val)
    if len(train) == 0:
        raise ConfigError(f"final.val_size={val_size} leaves no training samples in a pool of {len(ids)}")
    return train, val


def final_steps_per_epoch(config: JobConfig, n_real: int, n_train: int) -> int:
    """As set, or one pass over the real (non-prunable) samples: a budget fixed by the
    real data, as in the paper, not a side effect of how much synthetic data survived.
    Without a real part, one pass over the training pool."""
    basis = n_real if n_real > 0 else n_train
    return config.final.train.steps_per_epoch or max(1, math.ceil(basis / config.final.train.batch_size))


def _val_robust_accuracy(model, images, labels, attack, batch_size, seed) -> float:
    if len(images) == 0:
        return float("nan")
    record = record_predictions(model, images, labels, attack, batch_size=batch_size,
                                generator=torch.Generator().manual_seed(seed))
    return float((record.margin_adv > 0).mean())


@dataclass(frozen=True)
class FinalSpec:
    """The final training's workers' input: the shared training spec, the validation ids
    (every rank evaluates all of them) and where to write the best model and history."""

    training: TrainingSpec
    val_ids: np.ndarray
    best_file: Path
    history_file: Path
    stream: StreamSpec | None = None  # None: every row in memory


def _batch_source(w, spec: FinalSpec, fc):
    """This worker's batch source, and the index stream a resume replays (None if none)."""
    if spec.stream is None:
        if fc.synthetic_fraction < 0:
            stream = BatchStream(len(w.labels), w.batch_size, seed=w.stream_seed)
        else:
            prunable = np.isin(w.sources, spec.training.config.pool.prunable_sources)
            groups = [np.flatnonzero(prunable), np.flatnonzero(~prunable)]
            counts = mix_counts(w.batch_size, fc.synthetic_fraction, len(groups[0]), len(groups[1]))
            stream = MixedBatchStream(groups, counts, seed=w.stream_seed)
        return IndexedBatches(w.images, w.labels, stream), stream, None
    import ray.train

    streamed, in_memory = spec.stream.counts
    shard = ray.train.get_dataset_shard(STREAM_DATASET)
    passes = partial(stream_passes, shard, streamed, spec.training.image_shape, spec.stream.shuffle_buffer,
                     w.stream_seed)
    streamed_batches = StreamedBatches(passes, w.device)
    sources: list = [streamed_batches]
    real = None
    if in_memory:
        real = BatchStream(len(w.labels), in_memory, seed=w.stream_seed)
        sources.append(IndexedBatches(w.images, w.labels, real))
    return ConcatBatches(sources), real, streamed_batches


def final_loop(spec: FinalSpec) -> None:
    """Ray Train worker function for the final robust training."""
    w = start_worker(spec.training)
    config = spec.training.config
    fc = config.final
    _, vx, vy, _ = (load_rows(spec.training.source, spec.val_ids, spec.training.image_shape) if len(spec.val_ids)
                    else (None, np.empty((0, *spec.training.image_shape), np.uint8), np.empty(0, np.int64), None))
    val_images, val_labels = to_float_images(vx).to(w.device), torch.from_numpy(vy).to(w.device)
    ema = ModelEMA(w.raw, decay=fc.ema_decay)
    per_epoch, epochs = spec.training.steps_per_epoch, fc.train.epochs
    val_attack = attack_from_config(config, steps=fc.val_attack_steps, loss="cw")
    batches, replayed, streamed = _batch_source(w, spec, fc)

    state = {"epoch": -1, "best_acc": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": [], "stream_pass": -1}
    saved = resume(w, replayed)
    if saved:
        ema.load_state_dict(saved["ema"])
        state = json.loads(saved["state"])
        if streamed is not None:  # a stream cannot be replayed: go on with a fresh pass
            streamed.pass_index = state.get("stream_pass", -1) + 1

    for epoch in range(state["epoch"] + 1, epochs):
        if fc.early_stop_patience and state["bad_epochs"] >= fc.early_stop_patience:
            break
        started = time.perf_counter()
        if streamed is not None:
            streamed.wait_seconds = 0.0
        stats = train_steps(w.model, w.optimizer, batches, w.attack, w.recipe, steps=per_epoch,
                            first_step=epoch * per_epoch, total_steps=per_epoch * epochs, ema=ema,
                            generator=w.generator(epoch), scaler=w.scaler)
        train_seconds = time.perf_counter() - started
        # Same EMA weights (its batch-norm statistics too: rank 0's) and seed on every rank, so
        # every rank computes the same value and takes the same early-stopping decision.
        share_rank0_buffers(ema.module, w.world)
        val_acc = _val_robust_accuracy(ema.module, val_images, val_labels, val_attack,
                                       config.ray.inference_batch_size, seed=epoch)
        improved = not math.isnan(val_acc) and val_acc > state["best_acc"]
        if improved or len(spec.val_ids) == 0:
            state.update(best_acc=val_acc, best_epoch=epoch, bad_epochs=0)
            if w.rank == 0:
                save_model_file(ema.module.state_dict(), spec.best_file, spec.training.identity)
        else:
            state["bad_epochs"] += 1
        metrics = {"epoch": epoch, "loss": stats["loss"], "lr": stats["lr"], "train_adv_acc": stats["adv_acc"],
                   "val_robust_acc": val_acc, "train_seconds": train_seconds}
        if streamed is not None:  # of train_seconds, the time spent waiting for streamed batches
            metrics["stream_wait_seconds"] = streamed.wait_seconds
        state["epoch"] = epoch
        state["history"].append(metrics)
        if streamed is not None:
            state["stream_pass"] = streamed.pass_index
        if w.rank == 0:
            logger.info("final epoch %d/%d: loss %.3f, lr %.4f, train adv acc %.3f, val robust acc (EMA, CW) %.3f",
                        epoch + 1, epochs, stats["loss"], stats["lr"], stats["adv_acc"], val_acc)
        report_epoch(w, epoch, metrics, {"ema": ema.state_dict(), "state": json.dumps(state)})
    if w.rank == 0:
        spec.history_file.write_text(json.dumps(state, indent=2))


def run_final(config: JobConfig, pool: PoolRef, pruned_pool: Path, made_by: dict[str, str], root: Path,
              plan: ResourcePlan, name: str = "final_train") -> FinalResult:
    """Train the robust model on ``pruned_pool`` (the selection, or the random baseline);
    ``made_by``: the stage that wrote the pruned pool and its digest."""
    info = read_pool_info(pruned_pool)
    files = pool_files(pruned_pool, info)
    ids, sources = read_ids_and_sources(files)
    train_ids, val_ids = split_train_val(ids, sources, config.pool.prunable_sources, config.final.val_size)
    prunable = np.isin(sources, list(config.pool.prunable_sources))
    n_real = int((~prunable).sum()) - len(val_ids)
    per_epoch = final_steps_per_epoch(config, max(0, n_real), len(train_ids))
    fc = config.final
    workers = plan.train_workers
    mixed = fc.synthetic_fraction >= 0 and n_real >= workers  # every worker needs real rows to mix in
    stream_ids = train_ids[np.isin(train_ids, ids[prunable])] if mixed else train_ids
    loading, why, stream = plan_data_loading(fc, len(train_ids), len(stream_ids), n_real, workers, info.image_shape,
                                             mixed)
    stage = stage_for(config, root, name, ("final", "model", "attack"),
                      exclude=("final.enabled", "final.compare_random"), upstream=made_by,
                      facts={"training workers": plan.train_workers, "data loading": loading}, resumable=True)
    model_file, history_file = stage.dir / MODEL_FILE, stage.dir / HISTORY_FILE
    steps = per_epoch * config.final.train.epochs
    if stage.committed() is None:
        stage.begin()
        logger.info("final training on %d samples (%d held out for validation), %d epochs x %d steps of batch %d; "
                    "rows %s; %s", len(train_ids), len(val_ids), config.final.train.epochs, per_epoch,
                    config.final.train.batch_size, "streamed from Ray Data" if stream else "in memory", why)
        in_memory_ids = np.setdiff1d(train_ids, stream_ids) if stream else train_ids
        run_plan = streaming_plan(plan) if stream else plan
        spec = FinalSpec(
            TrainingSpec(config, config.final.train, tuple(files), in_memory_ids, tuple(info.image_shape),
                         info.num_classes, per_epoch, plan.threads(plan.train_cpus_per_worker)),
            val_ids, model_file, history_file, stream,
        )
        datasets = None
        if stream:
            datasets = {STREAM_DATASET: stream_dataset(files, list(config.pool.prunable_sources) if mixed else None,
                                                       val_ids, fc.train.seed)}
        run_trainer(final_loop, spec, stage, run_plan, "final training", config.ray.storage_path, datasets)
        if not model_file.exists() or not history_file.exists():
            raise RuntimeError("final training ended without saving its model and history")
        stage.commit({"training_steps": steps, "data_loading": loading})
    state = json.loads(history_file.read_text())
    done_steps = len(state["history"]) * per_epoch
    return FinalResult(
        model_file=model_file, history=state["history"], best_epoch=state["best_epoch"],
        val_robust_acc=state["best_acc"], training_steps=done_steps,
        sample_gradient_steps=done_steps * config.final.train.batch_size * (config.attack.steps + 1),
        n_train=len(train_ids), n_val=len(val_ids), digest=stage.input_digest,
        data_loading=loading, data_loading_reason=why,
    )
