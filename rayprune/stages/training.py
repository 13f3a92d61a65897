"""What the two Ray Train stages (scoring run, final training) share.

Building the model, attack, optimiser and recipe from the config; each worker's fixed
shard of ids and loading its rows; safe model-file loading; and running a TorchTrainer
whose checkpoints live in the stage directory, so a rerun resumes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from rayprune.config import JobConfig, TrainConfig
from rayprune.data.pool import decode_images
from rayprune.robust.attacks import AttackConfig
from rayprune.robust.loop import ATRecipe
from rayprune.robust.models import build_model
from rayprune.robust.training import make_optimizer
from rayprune.stages.resources import ResourcePlan

logger = logging.getLogger(__name__)


def attack_from_config(config: JobConfig, steps: int | None = None, loss: str = "ce") -> AttackConfig:
    """The job's threat model as an AttackConfig (``steps``/``loss`` may be overridden)."""
    a = config.attack
    return AttackConfig(norm=a.norm, eps=a.eps, step_size=a.step_size, steps=a.steps if steps is None else steps,
                        loss=loss, random_start=True)


def model_from_config(config: JobConfig, num_classes: int, in_channels: int):
    kwargs = {"width": config.model.width} if config.model.name == "small_cnn" else {}
    return build_model(config.model.name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def load_model_file(config: JobConfig, path: str | Path, num_classes: int, in_channels: int, device="cpu"):
    """Build the configured model and load weights saved by a stage (no unpickling)."""
    model = model_from_config(config, num_classes, in_channels)
    state = torch.load(path, map_location=device, weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(
            f"checkpoint {path} does not fit model {config.model.name!r} with {num_classes} classes: {first}"
        ) from None
    return model.to(device)


def optimizer_from_config(model, train: TrainConfig):
    return make_optimizer(model, train.lr, train.momentum, train.weight_decay, train.nesterov)


def recipe_from_config(train: TrainConfig, steps_per_epoch: int) -> ATRecipe:
    return ATRecipe(
        loss=train.loss, trades_beta=train.trades_beta, label_smoothing=train.label_smoothing, lr=train.lr,
        schedule=train.schedule, warmup_steps=train.warmup_epochs * steps_per_epoch, augment=train.augment,
    )


def shard_ids(all_ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This worker's ids: every ``world``-th of the sorted ids, starting at ``rank``."""
    return np.sort(all_ids)[rank::world]


def load_rows(source, ids: np.ndarray, image_shape):
    """``(ids, images, labels, sources)`` of ``ids`` from Parquet files, in the order of ``ids``.

    ``source`` is a directory of Parquet files or a list of files.
    """
    dataset = pads.dataset(source, format="parquet")
    table = dataset.to_table(filter=pads.field("id").isin(pa.array(ids, pa.int64())))
    got = table["id"].to_numpy()
    order = np.argsort(got)
    if not np.array_equal(got[order], np.sort(ids)):
        raise RuntimeError(f"the files at {source} lack {len(ids) - len(got)} of this shard's ids")
    table = table.take(pa.array(order))
    table = table.take(pa.array(np.searchsorted(table["id"].to_numpy(), ids)))
    # Copies: Arrow hands out read-only buffers, which torch refuses to wrap.
    return (table["id"].to_numpy().copy(), decode_images(table["image"], image_shape).copy(),
            table["label"].to_numpy().copy(), np.asarray(table["source"].to_pylist(), dtype=object))


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def run_trainer(loop, loop_config: dict, stage_dir: Path, plan: ResourcePlan, what: str) -> None:
    """Run ``loop`` on the planned workers; checkpoints go to ``<stage_dir>/train``.

    Rerunning with the same stage directory resumes from the latest checkpoint (Ray
    Train V2 restores by run name and storage path); worker failures are retried.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": plan.train_cpus_per_worker}
    if plan.train_use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=plan.train_workers, use_gpu=plan.train_use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="train", storage_path=str(stage_dir),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=3)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{what} failed: {result.error}")
