"""Stage ``evaluate``: clean, PGD and AutoAttack-grade (APGD-CE, APGD-T) accuracy.

The test pool is split into contiguous shards, one per Ray actor; each actor loads the
final model once and returns per-sample correctness under every attack. The driver
joins them by id, writes ``per_sample.parquet`` and ``metrics.json`` (accuracies and
the number of evaluated samples), and checks that every test id was evaluated once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import torch

from rayprune import storage
from rayprune.config import ConfigError, JobConfig
from rayprune.data.pool import decode_images
from rayprune.robust.evaluation import EvalConfig, robust_correct, summarize
from rayprune.robust.training import to_float_images
from rayprune.stages.common import stage_for, write_json_atomic
from rayprune.stages.prepare import PoolRef
from rayprune.stages.resources import ResourcePlan
from rayprune.stages.training import load_model_file, write_table_atomic

logger = logging.getLogger(__name__)


def eval_config(config: JobConfig) -> EvalConfig:
    e = config.evaluation
    return EvalConfig(
        norm=config.attack.norm, eps=config.attack.eps, pgd_steps=e.pgd_steps, apgd_steps=e.apgd_steps,
        apgd_targets=e.apgd_targets, batch_size=e.batch_size, attacks=tuple(e.attacks),
    )


class Evaluator:
    """Ray actor: the final model, loaded once, evaluated on shards of the test set."""

    def __init__(self, config: JobConfig, model_file: str, num_classes: int, in_channels: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.config = config
        self.model = load_model_file(self.config, model_file, num_classes, in_channels).eval()

    def run(self, ids: np.ndarray, images: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        x = to_float_images(images)
        y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a writable copy
        correct = robust_correct(self.model, x, y, eval_config(self.config),
                                 generator=torch.Generator().manual_seed(seed))
        return {"id": np.asarray(ids), **{k: np.asarray(v, dtype=bool) for k, v in correct.items()}}


def evaluator_layout(plan: ResourcePlan, n_samples: int, actors: int = 0) -> tuple[int, float]:
    """(evaluator actors, CPUs per actor) for ``n_samples`` test samples; ``actors`` 0 = auto.

    No Ray Data tasks run beside the evaluators (the driver reads the test pool), so like
    training they may use every CPU: about one actor per 256 samples, at most one per CPU.
    With GPUs at most one actor per GPU: every actor lives until all shards are done, so
    an actor left waiting for a GPU would wait forever.
    """
    slots = int(plan.total_gpus) if plan.train_use_gpu else max(1, int(plan.total_cpus))
    if actors > slots and plan.train_use_gpu:
        raise ConfigError(f"evaluation.actors={actors} exceeds the cluster's {slots} GPU(s); "
                          "use at most one evaluator per GPU, or 0 to size from the cluster")
    n_actors = actors or max(1, min(n_samples // 256 + 1, slots))
    return n_actors, max(0.25, min(plan.train_cpus_per_worker, plan.total_cpus / n_actors))


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    per_sample_file: Path
    digest: str


def run_evaluate(config: JobConfig, test: PoolRef, model_file: Path, trained_by: dict[str, str], root: Path,
                 plan: ResourcePlan, name: str = "evaluate") -> EvalResult:
    """Evaluate ``model_file`` on ``test``; ``trained_by``: the training stage and its digest."""
    upstream, facts = test.as_input("test pool")
    stage = stage_for(config, root, name, ("evaluation", "attack"), upstream={**upstream, **trained_by}, facts=facts)
    per_sample, metrics_file = stage.dir / "per_sample.parquet", stage.dir / "metrics.json"
    if stage.committed() is None:
        stage.begin()
        fs, paths = storage.files_on(test.files)
        table = pads.dataset(paths, format="parquet", filesystem=fs).to_table().sort_by("id")
        ids, labels = table["id"].to_numpy(), table["label"].to_numpy()
        images = decode_images(table["image"], test.info.image_shape, ids=ids, origin=f"test pool {test.path}")
        n_actors, cpus = evaluator_layout(plan, len(ids), config.evaluation.actors)
        actor_cls = ray.remote(num_cpus=cpus, num_gpus=1 if plan.train_use_gpu else 0)(Evaluator)
        actors = [actor_cls.remote(config, str(model_file), test.info.num_classes,
                                   test.info.image_shape[2], plan.threads(cpus)) for _ in range(n_actors)]
        logger.info("evaluating %d test samples on %d actor(s): %s",
                    len(ids), n_actors, ", ".join(config.evaluation.attacks))
        shards = np.array_split(np.arange(len(ids)), n_actors)
        refs = [a.run.remote(ids[s], images[s], labels[s], i) for i, (a, s) in enumerate(zip(actors, shards))]
        parts = ray.get(refs)
        for a in actors:
            ray.kill(a)
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if not np.array_equal(np.sort(joined["id"]), ids):
            raise RuntimeError("evaluation did not cover every test id exactly once")
        write_table_atomic(pa.table(joined), per_sample)
        metrics = summarize({k: v for k, v in joined.items() if k != "id"})
        write_json_atomic(metrics_file, metrics)
        stage.commit({"metrics": metrics})
    return EvalResult(json.loads(metrics_file.read_text()), per_sample, stage.input_digest)
