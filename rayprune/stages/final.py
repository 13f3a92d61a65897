"""Stage ``final_train``: the robust model, adversarially trained on the pruned pool.

Ray Train workers each hold a shard of the training ids; every batch mixes prunable
(synthetic) and other (real) samples at ``final.synthetic_fraction``. An EMA of the
weights is kept; after every epoch the EMA model's robust accuracy on a held-out
validation set (PGD with the CW loss) picks the best checkpoint and drives early
stopping. The step budget is explicit (``final.train.epochs`` x ``steps_per_epoch``) and
the sample-gradient steps are recorded, so pruning's saving is visible in the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rayprune import storage
from rayprune.config import ConfigError, JobConfig, from_dict, to_dict
from rayprune.data.pool import pool_files, read_pool_info
from rayprune.robust.ema import ModelEMA, unwrap_model
from rayprune.robust.loop import BatchStream, MixedBatchStream, mix_counts, train_steps
from rayprune.robust.recording import record_predictions
from rayprune.robust.training import to_float_images
from rayprune.stages.common import stage_for
from rayprune.stages.prepare import PoolRef, read_ids_and_sources
from rayprune.stages.resources import ResourcePlan
from rayprune.stages.training import (
    attack_from_config,
    check_resumed_model,
    load_rows,
    model_from_config,
    model_identity,
    optimizer_from_config,
    recipe_from_config,
    run_trainer,
    save_model_file,
    shard_ids,
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


def final_loop(loop_config: dict) -> None:
    """Ray Train worker function for the final robust training."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = from_dict(JobConfig, loop_config["job"])
    fc = config.final
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()
    shape = tuple(loop_config["image_shape"])
    files = loop_config["files"]

    train_ids = np.asarray(loop_config["train_ids"], dtype=np.int64)
    _, x_u8, y_np, sources = load_rows(files, shard_ids(train_ids, rank, world), shape)
    images, labels = to_float_images(x_u8).to(device), torch.from_numpy(y_np).to(device)
    val_ids = np.asarray(loop_config["val_ids"], dtype=np.int64)
    _, vx, vy, _ = load_rows(files, val_ids, shape) if len(val_ids) else (None, np.empty((0, *shape), np.uint8), np.empty(0, np.int64), None)
    val_images, val_labels = to_float_images(vx).to(device), torch.from_numpy(vy).to(device)

    torch.manual_seed(fc.train.seed)
    model = ray.train.torch.prepare_model(model_from_config(config, loop_config["num_classes"], shape[2]))
    raw = unwrap_model(model)
    optimizer = optimizer_from_config(raw, fc.train)
    ema = ModelEMA(raw, decay=fc.ema_decay)
    per_epoch, epochs = loop_config["steps_per_epoch"], fc.train.epochs
    recipe = recipe_from_config(fc.train, per_epoch)
    attack = attack_from_config(config)
    val_attack = attack_from_config(config, steps=fc.val_attack_steps, loss="cw")
    batch = max(1, fc.train.batch_size // world)
    if fc.synthetic_fraction < 0:
        stream = BatchStream(len(y_np), batch, seed=fc.train.seed * 1000 + rank)
    else:
        prunable = np.isin(sources, config.pool.prunable_sources)
        groups = [np.flatnonzero(prunable), np.flatnonzero(~prunable)]
        counts = mix_counts(batch, fc.synthetic_fraction, len(groups[0]), len(groups[1]))
        stream = MixedBatchStream(groups, counts, seed=fc.train.seed * 1000 + rank)

    state = {"epoch": -1, "best_acc": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=True)
        check_resumed_model(checkpoint.path, saved.get("model_name"), saved.get("world"), config, world)
        raw.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        ema.load_state_dict(saved["ema"])
        state = json.loads(saved["state"])
        for _ in range((state["epoch"] + 1) * per_epoch):
            stream.next()

    best_file = Path(loop_config["best_file"])
    for epoch in range(state["epoch"] + 1, epochs):
        if fc.early_stop_patience and state["bad_epochs"] >= fc.early_stop_patience:
            break
        generator = torch.Generator().manual_seed(fc.train.seed * 1_000_003 + rank * 10_007 + epoch)
        stats = train_steps(model, optimizer, images, labels, stream, attack, recipe, steps=per_epoch,
                            first_step=epoch * per_epoch, total_steps=per_epoch * epochs, ema=ema, generator=generator)
        # Same EMA weights and seed on every rank, so every rank computes the same value.
        val_acc = _val_robust_accuracy(ema.module, val_images, val_labels, val_attack,
                                       loop_config["inference_batch_size"], seed=epoch)
        improved = not math.isnan(val_acc) and val_acc > state["best_acc"]
        if improved or len(val_ids) == 0:
            state.update(best_acc=val_acc, best_epoch=epoch, bad_epochs=0)
            if rank == 0:
                identity = model_identity(config.model.name, config.model.width, loop_config["num_classes"], shape[2])
                save_model_file(ema.module.state_dict(), best_file, identity)
        else:
            state["bad_epochs"] += 1
        metrics = {"epoch": epoch, "loss": stats["loss"], "lr": stats["lr"], "train_adv_acc": stats["adv_acc"],
                   "val_robust_acc": val_acc}
        state["epoch"] = epoch
        state["history"].append(metrics)
        if rank == 0:
            logger.info("final epoch %d/%d: loss %.3f, lr %.4f, train adv acc %.3f, val robust acc (EMA, CW) %.3f",
                        epoch + 1, epochs, stats["loss"], stats["lr"], stats["adv_acc"], val_acc)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                            "state": json.dumps(state), "model_name": config.model.name, "world": world},
                           os.path.join(d, "state.pt"))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
    if rank == 0:
        Path(loop_config["history_file"]).write_text(json.dumps(state, indent=2))


def run_final(config: JobConfig, pool: PoolRef, pruned_pool: Path, made_by: dict[str, str], root: Path,
              plan: ResourcePlan, name: str = "final_train") -> FinalResult:
    """Train the robust model on ``pruned_pool`` (the selection, or the random baseline);
    ``made_by``: the stage that wrote the pruned pool and its digest."""
    info = read_pool_info(pruned_pool)
    files = pool_files(pruned_pool, info)
    ids, sources = read_ids_and_sources(files)
    train_ids, val_ids = split_train_val(ids, sources, config.pool.prunable_sources, config.final.val_size)
    n_real = int((~np.isin(sources, list(config.pool.prunable_sources))).sum()) - len(val_ids)
    per_epoch = final_steps_per_epoch(config, max(0, n_real), len(train_ids))
    stage = stage_for(config, root, name, ("final", "model", "attack"),
                      exclude=("final.enabled", "final.compare_random"), upstream=made_by,
                      facts={"training workers": plan.train_workers}, resumable=True)
    model_file, history_file = stage.dir / MODEL_FILE, stage.dir / HISTORY_FILE
    steps = per_epoch * config.final.train.epochs
    if stage.committed() is None:
        stage.begin()
        logger.info("final training on %d samples (%d held out for validation), %d epochs x %d steps of batch %d",
                    len(train_ids), len(val_ids), config.final.train.epochs, per_epoch, config.final.train.batch_size)
        loop_config = {
            "job": to_dict(config), "threads": plan.threads(plan.train_cpus_per_worker),
            "image_shape": list(info.image_shape), "num_classes": info.num_classes, "files": files,
            "train_ids": train_ids.tolist(), "val_ids": val_ids.tolist(), "steps_per_epoch": per_epoch,
            "best_file": str(model_file), "history_file": str(history_file),
            "inference_batch_size": config.ray.inference_batch_size,
        }
        run_trainer(final_loop, loop_config, stage, plan, "final training", config.ray.storage_path)
        if not model_file.exists() or not history_file.exists():
            raise RuntimeError("final training ended without saving its model and history")
        stage.commit({"training_steps": steps})
    state = json.loads(history_file.read_text())
    done_steps = len(state["history"]) * per_epoch
    return FinalResult(
        model_file=model_file, history=state["history"], best_epoch=state["best_epoch"],
        val_robust_acc=state["best_acc"], training_steps=done_steps,
        sample_gradient_steps=done_steps * config.final.train.batch_size * (config.attack.steps + 1),
        n_train=len(train_ids), n_val=len(val_ids), digest=stage.input_digest,
    )


def write_random_pool(config: JobConfig, pool: PoolRef, kept: int, root: Path) -> tuple[Path, str]:
    """The random-pruning baseline: a class-balanced random pool of the selection's size."""
    from rayprune.scoring.select import select_random
    from rayprune.stages.select import write_pruned_pool

    upstream, facts = pool.as_input("pool")
    stage = stage_for(config, root, "random_baseline", ("selection", "pool.prunable_sources"), upstream=upstream,
                      facts={**facts, "kept": kept})
    out = stage.dir / "pruned_pool"
    if stage.committed() is None:
        stage.begin()
        fs, paths = storage.files_on(pool.files)
        table = pa.concat_tables(pq.read_table(f, columns=["id", "label", "source"], filesystem=fs)
                                 for f in paths).sort_by("id")
        sources = np.asarray(table["source"].to_pylist(), dtype=object)
        prunable = np.isin(sources, list(config.pool.prunable_sources))
        keep = select_random(len(sources), keep_count=int(kept - (~prunable).sum()), labels=table["label"].to_numpy(),
                             class_balanced=config.selection.class_balanced, prunable=prunable,
                             seed=config.selection.seed + 1)
        per_source = {str(k): int(v) for k, v in zip(*np.unique(sources[keep].astype(str), return_counts=True))}
        write_pruned_pool(pool, table["id"].to_numpy()[keep], per_source, out)
        stage.commit({"kept": int(len(keep))})
    return out, stage.input_digest
