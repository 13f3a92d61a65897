"""What the two Ray Train stages (scoring run, final training) share.

Building the model, attack, optimiser and recipe from the config; each worker's fixed
shard of ids and loading its rows; the worker's set-up, resume from the latest
checkpoint and per-epoch checkpoint (:class:`TrainingSpec`, :func:`start_worker`,
:func:`resume`, :func:`report_epoch`), so each stage keeps only its epoch body; safe
model-file loading; and running a TorchTrainer whose checkpoints live in the stage
directory, so a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from rayprune import storage
from rayprune.allocator import reuse_freed_memory
from rayprune.config import JobConfig, TrainSection
from rayprune.data.pool import decode_images
from rayprune.errors import InputError, one_line
from rayprune.ray_logs import quiet_ray_train_in_worker
from rayprune.robust.attacks import AttackConfig
from rayprune.robust.loop import ATConfig
from rayprune.robust.models import build_model
from rayprune.robust.precision import grad_scaler
from rayprune.robust.training import make_optimizer
from rayprune.stages.common import Stage, digest, write_json_atomic
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


def model_identity(model_name: str, width: int, num_classes: int, in_channels: int) -> dict:
    """What a weights file must match: the architecture and its input and output sizes."""
    return {"model": model_name, "width": width if model_name == "small_cnn" else None,
            "num_classes": int(num_classes), "in_channels": int(in_channels)}


def _describe(identity: dict) -> str:
    width = f" (width {identity['width']})" if identity.get("width") is not None else ""
    return (f"{identity.get('model')!r}{width} with {identity.get('num_classes')} classes and "
            f"{identity.get('in_channels')} input channels")


def save_model_file(state_dict: dict, path: str | Path, identity: dict) -> None:
    """Save weights (a plain state dict, loadable with ``weights_only=True``) atomically,
    with ``<name>.json`` beside them recording which model they belong to."""
    path = Path(path)
    write_json_atomic(path.with_suffix(".json"), identity)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(state_dict, tmp)
    os.replace(tmp, path)


def load_model_file(config: JobConfig, path: str | Path, num_classes: int, in_channels: int, device="cpu"):
    """Build the configured model and load weights saved by a stage (no unpickling).

    A file saved for another model (or number of classes) is an InputError naming the
    file and both models; so is a file that is not a weights-only state dict.
    """
    want = model_identity(config.model.name, config.model.width, num_classes, in_channels)
    sidecar = Path(path).with_suffix(".json")
    if sidecar.is_file():
        try:
            saved = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if isinstance(saved, dict) and saved != want:
            raise InputError(f"checkpoint {path} holds a {_describe(saved)} (see {sidecar.name}); this job builds a "
                             f"{_describe(want)}: set model.name/model.width to match or use a new output_dir")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError:  # do not echo torch's advice to retry with weights_only=False
        raise InputError(f"checkpoint {path} is not a weights-only state dict: it holds other pickled objects, which "
                         "are refused because loading them could run code") from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"checkpoint {path} is not a readable weights-only state dict (corrupt or truncated?): "
                         f"{one_line(exc).split('. ')[0]}") from None
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds a {type(state).__name__}; expected a state dict of weights")
    model = model_from_config(config, num_classes, in_channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0])[:200] if lines else type(exc).__name__
        raise InputError(
            f"checkpoint {path} does not fit the {_describe(want)}: it was saved for another model or number of "
            f"classes ({first})"
        ) from None
    return model.to(device)


def check_resumed_model(checkpoint_path, saved_name: str | None, saved_world: int | None, config: JobConfig,
                        world: int) -> None:
    """A Ray Train checkpoint must come from the same model and number of workers."""
    if ((saved_name is not None and saved_name != config.model.name)
            or (saved_world is not None and saved_world != world)):
        raise InputError(
            f"checkpoint {checkpoint_path} was written by {saved_world} worker(s) for model {saved_name!r}; this run "
            f"has {world} for model {config.model.name!r}: use a new output_dir"
        )


def optimizer_from_config(model, train: TrainSection):
    return make_optimizer(model, train.lr, train.momentum, train.weight_decay, train.nesterov)


def recipe_from_config(train: TrainSection, steps_per_epoch: int) -> ATConfig:
    return ATConfig(
        loss=train.loss, trades_beta=train.trades_beta, label_smoothing=train.label_smoothing, lr=train.lr,
        schedule=train.schedule, warmup_steps=train.warmup_epochs * steps_per_epoch, augment=train.augment,
        precision=train.precision,
    )


def shard_ids(all_ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This worker's ids: every ``world``-th of the sorted ids, starting at ``rank``."""
    return np.sort(all_ids)[rank::world]


def _scatter_rows(source, ids: np.ndarray, image_shape, on_images, batch_rows: int):
    """Read the rows of ``ids`` from Parquet, ``batch_rows`` at a time, and hand each
    batch's decoded uint8 images to ``on_images(dest, images)``, ``dest`` being their
    positions in ``ids``; returns ``(labels, sources)`` in the order of ``ids``.

    Each row group's id column is read first, and only the groups that hold wanted rows
    are read further, one batch at a time: a worker that wants 2,000 real rows of a
    1M-row pool reads a few row groups, not the whole pool. (A filtered scan of every
    file read every image column with Arrow's read-ahead: 1.2 s and 527 MiB of private
    memory for 2,000 rows of a 400k-row pool.) No step concatenates or reorders the whole
    shard: Arrow's binary columns hold at most 2 GiB per array, which a 1M-row shard of
    32 px images (3 GiB) exceeds, and the peak stays at the caller's arrays plus one batch.
    """
    if isinstance(source, (list, tuple)):
        fs, paths = storage.files_on(list(source))
        dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    else:
        fs, path = storage.resolve(str(source))
        dataset = pads.dataset(path, format="parquet", filesystem=fs)
    sorter = np.argsort(ids, kind="stable")
    sorted_ids = ids[sorter]
    seen = np.zeros(len(ids), bool)
    labels = np.empty(len(ids), np.int64)
    sources = np.empty(len(ids), dtype=object)
    for fragment in dataset.get_fragments():
        for group in fragment.split_by_row_group():
            wanted = np.isin(group.to_table(columns=["id"]).column("id").to_numpy(), sorted_ids)
            if not wanted.any():
                continue
            offset = 0
            for batch in group.to_batches(columns=["id", "image", "label", "source"], batch_size=batch_rows,
                                          batch_readahead=4, fragment_readahead=1):
                rows = np.flatnonzero(wanted[offset:offset + batch.num_rows])
                offset += batch.num_rows
                if not len(rows):
                    continue
                if len(rows) < batch.num_rows:  # a whole shard wants every row: no copy
                    batch = batch.take(pa.array(rows))
                got = batch["id"].to_numpy()
                dest = sorter[np.searchsorted(sorted_ids, got)]
                if seen[dest].any() or len(np.unique(dest)) < len(dest):
                    raise RuntimeError(f"the files at {source} hold some of this shard's ids more than once")
                seen[dest] = True
                on_images(dest, decode_images(batch["image"], image_shape, ids=batch["id"],
                                              origin=f"rows at {source}"))
                labels[dest] = batch["label"].to_numpy()
                sources[dest] = batch["source"].to_pylist()
    if not seen.all():
        raise RuntimeError(f"the files at {source} lack {int((~seen).sum())} of this shard's ids")
    return labels, sources


def load_rows(source, ids: np.ndarray, image_shape, batch_rows: int = 4096):
    """``(ids, images, labels, sources)`` of ``ids`` from Parquet files, in the order of ``ids``;
    images uint8 (n, H, W, C).

    ``source`` is a directory of Parquet files or a list of files (local paths or URIs).
    """
    ids = np.asarray(ids, np.int64)
    images = np.empty((len(ids), *image_shape), np.uint8)

    def put(dest, part):
        images[dest] = part

    labels, sources = _scatter_rows(source, ids, image_shape, put, batch_rows)
    return ids.copy(), images, labels, sources


def load_float_rows(source, ids: np.ndarray, image_shape, batch_rows: int = 4096):
    """:func:`load_rows` with the images as one float32 (n, C, H, W) tensor in [0, 1]
    (``to_float_images``), decoded batch by batch straight into it: what a training
    worker holds.

    The peak is the tensor plus one batch, about 4 bytes per pixel value. Reading the
    whole shard, decoding it and then converting held about 11 (Arrow rows, bytes objects,
    joined bytes, a uint8 copy and two float32 copies while permuting): 4.3 GiB for a
    100k-row shard of 32 px images.
    """
    from rayprune.robust.training import to_float_images

    ids = np.asarray(ids, np.int64)
    h, w, c = image_shape
    images = torch.empty((len(ids), c, h, w), dtype=torch.float32)

    def put(dest, part):
        images[torch.from_numpy(dest)] = to_float_images(part)

    labels, sources = _scatter_rows(source, ids, image_shape, put, batch_rows)
    return ids.copy(), images, labels, sources


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def train_run_location(stage_dir: Path, input_digest: str, storage_path: str = ""):
    """Ray Train's ``(name, storage_path, storage_filesystem)`` for a stage.

    By default checkpoints go to ``<stage_dir>/train``. With ``ray.storage_path`` (a URI or
    a shared path) the run is named after the output directory, the stage and its input
    digest, so rerunning the same job resumes it and changed inputs start a new run.
    """
    if not storage_path:
        return "train", str(stage_dir), None
    name = f"rayprune-{stage_dir.name}-{digest(str(Path(stage_dir).resolve()), input_digest)}"
    if storage.is_uri(storage_path):
        fs, path = storage.resolve(storage_path)
        return name, path, fs
    return name, os.path.abspath(storage_path), None


@dataclass(frozen=True)
class TrainingSpec:
    """What every Ray Train worker of a stage gets: one typed, picklable value.

    ``recipe`` is the training section it follows (``config.train`` for the scoring run,
    ``config.final.train`` for the final training); ``rows`` the Parquet source of its rows
    (a directory or a list of files); ``train_ids`` every id it trains on (each worker
    takes its shard); ``steps_per_epoch`` the explicit budget.
    """

    config: JobConfig
    recipe: TrainSection
    rows: str | tuple[str, ...]
    train_ids: np.ndarray
    image_shape: tuple[int, int, int]
    num_classes: int
    steps_per_epoch: int
    threads: int

    @property
    def source(self):
        return list(self.rows) if isinstance(self.rows, tuple) else self.rows

    @property
    def identity(self) -> dict:
        m = self.config.model
        return model_identity(m.name, m.width, self.num_classes, self.image_shape[2])


@dataclass
class Worker:
    """One training worker's state after :func:`start_worker`: its shard on the device and
    the DDP-prepared model (``raw`` unwrapped), optimiser, recipe and training attack."""

    spec: TrainingSpec
    rank: int
    world: int
    device: Any
    ids: np.ndarray
    images: torch.Tensor
    labels: torch.Tensor
    sources: np.ndarray
    model: Any
    raw: Any
    optimizer: Any
    recipe: ATConfig
    attack: AttackConfig
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None

    def generator(self, epoch: int) -> torch.Generator:
        """The epoch's seeded generator (distinct per rank and epoch): attacks and augmentation."""
        return torch.Generator().manual_seed(self.spec.recipe.seed * 1_000_003 + self.rank * 10_007 + epoch)

    @property
    def batch_size(self) -> int:
        return max(1, self.spec.recipe.batch_size // self.world)

    @property
    def stream_seed(self) -> int:
        return self.spec.recipe.seed * 1000 + self.rank


def share_rank0_buffers(module: torch.nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers of ``module`` (batch-norm running statistics).

    DDP broadcasts them from rank 0 at the start of each training forward pass, but each
    rank then updates its own copy with its own batch, so after a step they differ a
    little between ranks. Inference in eval mode uses them: without this, each rank's
    recording pass (or validation of the EMA model, which copies them) would use a
    slightly different model than the one rank 0 checkpoints and saves, and a resumed run
    (every rank restored from rank 0's checkpoint) would differ from one never
    interrupted. Call it on every rank at the same point; a no-op on one worker."""
    if world > 1:
        import torch.distributed as dist

        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def start_worker(spec: TrainingSpec) -> Worker:
    """Inside a Ray Train worker: threads, device, this rank's shard, and the model (same
    initial weights on every rank) prepared for DDP with its optimiser."""
    import ray.train
    import ray.train.torch

    from rayprune.robust.ema import unwrap_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_ray_train_in_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    reuse_freed_memory()  # before the rows load: a step's activations then stay mapped between steps
    torch.set_num_threads(spec.threads)
    device = ray.train.torch.get_device()
    ids, images, labels, sources = load_float_rows(spec.source, shard_ids(spec.train_ids, rank, world),
                                                   spec.image_shape)
    torch.manual_seed(spec.recipe.seed)
    model = model_from_config(spec.config, spec.num_classes, spec.image_shape[2])
    if device.type == "cuda":  # no-ops on CPU: tensor-core friendly layout, tuned convolutions
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    raw = unwrap_model(model)
    return Worker(spec, rank, world, device, ids, images.to(device),
                  torch.from_numpy(labels).to(device), sources, model, raw,
                  optimizer_from_config(raw, spec.recipe), recipe_from_config(spec.recipe, spec.steps_per_epoch),
                  attack_from_config(spec.config), grad_scaler(spec.recipe.precision, device))


def resume(worker: Worker, stream) -> dict | None:
    """Load the latest checkpoint, if any, into the worker's model and optimiser, and replay
    ``stream`` (an index stream, or None) to where it was; returns the checkpoint's other
    entries (None: a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), map_location=worker.device, weights_only=True)
    check_resumed_model(checkpoint.path, saved.get("model_name"), saved.get("world"), worker.spec.config,
                        worker.world)
    worker.raw.load_state_dict(saved.pop("model"))
    worker.optimizer.load_state_dict(saved.pop("optimizer"))
    scaler_state = saved.pop("scaler", None)
    if worker.scaler is not None and scaler_state:
        worker.scaler.load_state_dict(scaler_state)
    if stream is not None:
        for _ in range((saved["epoch"] + 1) * worker.spec.steps_per_epoch):  # the batches already drawn
            stream.next()
    return saved


def report_epoch(worker: Worker, epoch: int, metrics: dict, extra: dict | None = None) -> None:
    """Report the epoch's metrics with a checkpoint (rank 0 writes it): model, optimiser,
    epoch, and ``extra`` state the stage needs to resume (tensors, dicts or strings)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if worker.rank == 0:
            torch.save({"model": worker.raw.state_dict(), "optimizer": worker.optimizer.state_dict(), "epoch": epoch,
                        "world": worker.world, "model_name": worker.spec.config.model.name,
                        **({"scaler": worker.scaler.state_dict()} if worker.scaler is not None else {}),
                        **(extra or {})},
                       os.path.join(d, "state.pt"))
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)


def run_trainer(loop, loop_config, stage: Stage, plan: ResourcePlan, what: str, storage_path: str = "",
                datasets: dict | None = None) -> None:
    """Run ``loop`` on the planned workers; checkpoints go where :func:`train_run_location` says.
    ``datasets``: Ray Data datasets each worker reads its shard of (``get_dataset_shard``).

    Rerunning with the same stage and inputs resumes from the latest checkpoint (Ray
    Train V2 restores by run name and storage path); worker failures are retried.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name, path, fs = train_run_location(stage.dir, stage.input_digest, storage_path)
    logger.info("%s: Ray Train run %s under %s", what, name, storage_path or path)
    resources = {"CPU": plan.train_cpus_per_worker}
    if plan.train_use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=plan.train_workers, use_gpu=plan.train_use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=3)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{what} failed: {result.error}") from result.error
