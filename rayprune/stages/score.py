"""Stage ``score_subset``: distributed adversarial training on the subset with Ray Train.

Each worker holds a fixed shard of the subset (every ``world``-th id in id order),
trains with DDP (gloo on CPU, NCCL on GPU) for ``epochs`` x ``steps_per_epoch``
optimiser steps, and after every epoch records its shard's clean and adversarial
true-class statistics to ``records/epoch_EEEE-rank_RRR.parquet`` (written atomically, so
a repeated epoch overwrites rather than duplicates). A checkpoint is reported every epoch;
rerunning the job resumes from the latest one. When training ends, the driver turns
each shard's histories into scores, one shard at a time (memory bounded by a shard).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from rayprune.config import JobConfig, from_dict, to_dict
from rayprune.data.pool import decode_images
from rayprune.robust.attacks import AttackConfig
from rayprune.robust.ema import unwrap_model
from rayprune.robust.loop import ATRecipe, BatchStream, train_steps
from rayprune.robust.models import build_model
from rayprune.robust.recording import RECORDED_FIELDS, record_predictions
from rayprune.robust.training import make_optimizer, to_float_images
from rayprune.scoring.scores import score_from_histories
from rayprune.stages.common import Stage, digest
from rayprune.stages.prepare import PoolRef, SplitResult
from rayprune.stages.resources import ResourcePlan

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
SCORES_FILE = "subset_scores.parquet"


def steps_per_epoch(config: JobConfig, n_real: int, n_pool: int) -> int:
    """Optimiser steps per scoring epoch: as set, or one pass over the real part.

    Sizing by the real part (the whole pool if there is none), not by the subset, gives
    the scoring run the step budget of a full run; one pass over a 10% subset per epoch
    gives scores unrelated to full-run scores (method.md, "The scoring run's budget").
    """
    if config.train.steps_per_epoch:
        return config.train.steps_per_epoch
    basis = n_real if n_real > 0 else n_pool
    return max(1, math.ceil(basis / config.train.batch_size))


def attack_from_config(config: JobConfig) -> AttackConfig:
    a = config.attack
    return AttackConfig(norm=a.norm, eps=a.eps, step_size=a.step_size, steps=a.steps, loss="ce", random_start=True)


def model_from_config(config: JobConfig, num_classes: int, in_channels: int):
    kwargs = {"width": config.model.width} if config.model.name == "small_cnn" else {}
    return build_model(config.model.name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def shard_ids(all_ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This worker's ids: every ``world``-th of the sorted subset ids, from ``rank``."""
    return np.sort(all_ids)[rank::world]


def load_rows(subset_dir: str, ids: np.ndarray, image_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images/labels of ``ids`` from the subset files, returned in the order of ``ids``."""
    dataset = pads.dataset(subset_dir, format="parquet")
    table = dataset.to_table(filter=pads.field("id").isin(pa.array(ids, pa.int64())))
    got = table["id"].to_numpy()
    order = np.argsort(got)
    if not np.array_equal(got[order], np.sort(ids)):
        raise RuntimeError(f"subset files at {subset_dir} lack {len(ids) - len(got)} of this shard's ids")
    table = table.take(pa.array(order))
    pos = np.searchsorted(table["id"].to_numpy(), ids)
    table = table.take(pa.array(pos))
    # Copies: Arrow hands out read-only buffers, which torch refuses to wrap.
    return np.array(table["id"]), decode_images(table["image"], image_shape).copy(), np.array(table["label"])


def record_path(records_dir: Path, epoch: int, rank: int) -> Path:
    return records_dir / f"epoch_{epoch:04d}-rank_{rank:03d}.parquet"


def _write_atomic_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def scoring_loop(loop_config: dict) -> None:
    """Ray Train worker function (runs on every worker)."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = from_dict(JobConfig, loop_config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()
    image_shape = tuple(loop_config["image_shape"])
    records_dir = Path(loop_config["records_dir"])

    all_ids = pq.read_table(loop_config["subset_ids_file"])["id"].to_numpy()
    ids, images_u8, labels_np = load_rows(loop_config["subset_dir"], shard_ids(all_ids, rank, world), image_shape)
    images = to_float_images(images_u8).to(device)
    labels = torch.from_numpy(labels_np).to(device)

    torch.manual_seed(config.train.seed)  # same initial weights on every rank
    model = model_from_config(config, loop_config["num_classes"], image_shape[2])
    model = ray.train.torch.prepare_model(model)
    raw = unwrap_model(model)
    optimizer = make_optimizer(raw, config.train.lr, config.train.momentum, config.train.weight_decay, config.train.nesterov)
    per_epoch, epochs = loop_config["steps_per_epoch"], config.train.epochs
    recipe = ATRecipe(
        loss=config.train.loss, trades_beta=config.train.trades_beta, label_smoothing=config.train.label_smoothing,
        lr=config.train.lr, schedule=config.train.schedule, warmup_steps=config.train.warmup_epochs * per_epoch,
        augment=config.train.augment,
    )
    attack = attack_from_config(config)
    per_worker_batch = max(1, config.train.batch_size // world)
    stream = BatchStream(len(ids), per_worker_batch, seed=config.train.seed * 1000 + rank)

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=True)
        if state["world"] != world or state["model_name"] != config.model.name:
            raise RuntimeError(
                f"checkpoint was written by {state['world']} worker(s) for model {state['model_name']!r}; "
                f"this run has {world} for {config.model.name!r}: use a new output_dir"
            )
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        for _ in range(start_epoch * per_epoch):  # replay the batch stream to where it was
            stream.next()

    for epoch in range(start_epoch, epochs):
        generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + rank * 10_007 + epoch)
        stats = train_steps(
            model, optimizer, images, labels, stream, attack, recipe,
            steps=per_epoch, first_step=epoch * per_epoch, total_steps=per_epoch * epochs, generator=generator,
        )
        record = record_predictions(raw, images, labels, attack, generator=generator,
                                    batch_size=loop_config["inference_batch_size"])
        table = pa.table({"id": ids, **{f: getattr(record, f) for f in RECORDED_FIELDS}})
        _write_atomic_table(table, record_path(records_dir, epoch, rank))
        metrics = {
            "epoch": epoch, "loss": stats["loss"], "lr": stats["lr"],
            "clean_acc": float((record.margin_clean > 0).mean()), "adv_acc": float((record.margin_adv > 0).mean()),
        }
        if rank == 0:
            logger.info(
                "scoring epoch %d/%d: loss %.3f, lr %.4f, shard clean acc %.3f, adv acc %.3f",
                epoch + 1, epochs, metrics["loss"], metrics["lr"], metrics["clean_acc"], metrics["adv_acc"],
            )
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "world": world, "model_name": config.model.name}, os.path.join(d, "state.pt"))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
    if rank == 0:
        tmp = Path(loop_config["model_file"] + ".partial")
        torch.save(raw.state_dict(), tmp)
        os.replace(tmp, loop_config["model_file"])


@dataclass(frozen=True)
class ScoreResult:
    model_file: Path
    scores_file: Path
    training_steps: int
    sample_gradient_steps: int
    recording_passes: int
    digest: str


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
        hist = {f: np.stack([t[f].to_numpy() for t in tables]) for f in (f"p_{sig}", f"margin_{sig}", f"l2_error_{sig}")}
        scores = score_from_histories(
            config.scoring.score, hist[f"p_{sig}"], hist[f"margin_{sig}"], hist[f"l2_error_{sig}"],
            window=config.scoring.window, seed=config.split.seed + rank,
        )
        parts.append(pa.table({"id": ids, "score": scores}))
    table = pa.concat_tables(parts).sort_by("id")
    return table


def run_score(config: JobConfig, pool: PoolRef, split: SplitResult, root: Path, plan: ResourcePlan) -> ScoreResult:
    """Train on the subset with Ray Train, record histories, compute the subset's scores."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_epoch = steps_per_epoch(config, split.n_real, split.n_pool)
    relevant = {k: to_dict(config)[k] for k in ("model", "attack", "train")}
    stage = Stage("score_subset", root, digest(split.digest, relevant, plan.train_workers))
    records_dir, model_file = stage.dir / "records", stage.dir / MODEL_FILE
    scores_file = stage.dir / f"{config.scoring.score}-{config.scoring.signal}-w{config.scoring.window}-{SCORES_FILE}"
    total_steps = per_epoch * config.train.epochs
    recording_passes = config.train.epochs * len(split.subset_ids)
    outputs = {"training_steps": total_steps,
               "sample_gradient_steps": total_steps * config.train.batch_size * (config.attack.steps + 1),
               "recorded_samples": recording_passes}
    if stage.committed() is None:
        stage.begin()
        records_dir.mkdir(exist_ok=True)
        logger.info(
            "scoring run: %d subset samples on %d worker(s), %d epochs x %d steps of global batch %d",
            len(split.subset_ids), plan.train_workers, config.train.epochs, per_epoch, config.train.batch_size,
        )
        loop_config = {
            "job": to_dict(config),
            "threads": plan.threads(plan.train_cpus_per_worker),
            "image_shape": list(pool.info.image_shape),
            "num_classes": pool.info.num_classes,
            "subset_dir": str(split.subset_dir),
            "subset_ids_file": str(split.subset_dir.parent / "subset_ids.parquet"),
            "records_dir": str(records_dir),
            "model_file": str(model_file),
            "steps_per_epoch": per_epoch,
            "inference_batch_size": config.ray.inference_batch_size,
        }
        resources = {"CPU": plan.train_cpus_per_worker}
        if plan.train_use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            scoring_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=plan.train_workers, use_gpu=plan.train_use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name="train",
                storage_path=str(stage.dir),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=3),
            ),
        )
        result = trainer.fit()
        if result.error:
            raise RuntimeError(f"scoring run failed: {result.error}")
        if not model_file.exists():
            raise RuntimeError("scoring run ended without saving the model")
        stage.commit(outputs)
    if not scores_file.exists():
        table = assemble_scores(config, records_dir, plan.train_workers, config.train.epochs)
        if not np.array_equal(table["id"].to_numpy(), np.sort(split.subset_ids)):
            raise RuntimeError("subset scores do not cover exactly the subset ids")
        _write_atomic_table(table, scores_file)
    return ScoreResult(model_file, scores_file, total_steps, outputs["sample_gradient_steps"],
                       recording_passes, digest(stage.input_digest, to_dict(config.scoring)))
