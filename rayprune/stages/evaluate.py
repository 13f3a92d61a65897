"""Stage ``evaluate``: clean accuracy and AutoAttack (APGD-CE, APGD-T, FAB-T, Square).

The test pool is split into contiguous shards of whole evaluation batches, one per Ray
actor (one per GPU, CPU actors otherwise); each actor loads the final model once and
returns per-sample correctness under every attack. Randomness is seeded by each batch's
global index, so the result does not depend on how many actors ran it. The driver joins
the shards by id and writes ``per_sample.parquet`` (with the attack that broke each
sample), ``metrics.json`` (accuracies and the number of evaluated samples) and
``protocol.json`` (the protocol, whether it was AutoAttack's standard version or how it
was reduced, and a gradient-masking warning when Square found notably more than the
gradient attacks).
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
from rayprune.allocator import reuse_freed_memory
from rayprune.config import ConfigError, JobConfig
from rayprune.data.pool import decode_images
from rayprune.robust.evaluation import (
    EvalConfig,
    broken_by,
    gradient_masking_warning,
    robust_correct,
    summarize,
)
from rayprune.robust.training import to_float_images
from rayprune.stages.common import stage_for, write_json_atomic
from rayprune.stages.prepare import PoolRef
from rayprune.stages.resources import ResourcePlan
from rayprune.stages.training import load_model_file, write_table_atomic

logger = logging.getLogger(__name__)

EVALUATION_SEED = 0  # with the batch index, seeds every attack's randomness


def eval_config(config: JobConfig) -> EvalConfig:
    """The job's evaluation as the algorithm's config; clean accuracy is always measured first."""
    e = config.evaluation
    return EvalConfig(
        norm=config.attack.norm, eps=config.attack.eps, pgd_steps=e.pgd_steps, apgd_steps=e.apgd_steps,
        apgd_targets=e.apgd_targets, fab_steps=e.fab_steps, fab_targets=e.fab_targets,
        square_queries=e.square_queries, batch_size=e.batch_size,
        attacks=("clean", *(a for a in e.attacks if a != "clean")), protocol=e.protocol,
    )


def protocol_report(config: JobConfig, num_classes: int, metrics: dict[str, float]) -> dict:
    """What ran: the protocol and attacks, whether it was AutoAttack's standard version
    (else how it was reduced), and the gradient-masking warning if any."""
    ec = eval_config(config)
    reductions = ec.reductions(num_classes)
    return {"protocol": ec.protocol, "attacks": list(ec.attacks), "standard": not reductions,
            "reductions": reductions,
            "label": "AutoAttack (standard)" if not reductions else f"reduced ({'; '.join(reductions)})",
            "warning": gradient_masking_warning(metrics, ec.attacks, ec.protocol)}


def batch_shards(n_samples: int, batch_size: int, n_actors: int) -> list[tuple[int, int, int]]:
    """``(start, stop, first_batch)`` per actor: contiguous runs of whole evaluation batches."""
    n_batches = -(-n_samples // batch_size)
    groups = np.array_split(np.arange(n_batches), max(1, min(n_actors, n_batches)))
    return [(int(g[0]) * batch_size, min((int(g[-1]) + 1) * batch_size, n_samples), int(g[0]))
            for g in groups if len(g)]


class Evaluator:
    """Ray actor: the final model, loaded once, evaluated on shards of the test set."""

    def __init__(self, config: JobConfig, model_file: str, num_classes: int, in_channels: int, threads: int) -> None:
        reuse_freed_memory()
        torch.set_num_threads(threads)
        self.config = config
        self.model = load_model_file(self.config, model_file, num_classes, in_channels).eval()

    def run(self, ids: np.ndarray, images: np.ndarray, labels: np.ndarray, first_batch: int) -> dict[str, np.ndarray]:
        x = to_float_images(images)
        y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a writable copy
        correct = robust_correct(self.model, x, y, eval_config(self.config),
                                 generator=torch.Generator().manual_seed(EVALUATION_SEED), first_batch=first_batch)
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
    protocol: dict


def run_evaluate(config: JobConfig, test: PoolRef, model_file: Path, trained_by: dict[str, str], root: Path,
                 plan: ResourcePlan, name: str = "evaluate") -> EvalResult:
    """Evaluate ``model_file`` on ``test``; ``trained_by``: the training stage and its digest."""
    upstream, facts = test.as_input("test pool")
    # The number of actors does not change the result (seeds follow global batch indices).
    stage = stage_for(config, root, name, ("evaluation", "attack"), exclude=("evaluation.actors",),
                      upstream={**upstream, **trained_by}, facts=facts)
    per_sample, metrics_file = stage.dir / "per_sample.parquet", stage.dir / "metrics.json"
    protocol_file = stage.dir / "protocol.json"
    if stage.committed() is None:
        stage.begin()
        fs, paths = storage.files_on(test.files)
        table = pads.dataset(paths, format="parquet", filesystem=fs).to_table().sort_by("id")
        ids, labels = table["id"].to_numpy(), table["label"].to_numpy()
        images = decode_images(table["image"], test.info.image_shape, ids=ids, origin=f"test pool {test.path}")
        n_actors, cpus = evaluator_layout(plan, len(ids), config.evaluation.actors)
        shards = batch_shards(len(ids), config.evaluation.batch_size, n_actors)
        actor_cls = ray.remote(num_cpus=cpus, num_gpus=1 if plan.train_use_gpu else 0)(Evaluator)
        actors = [actor_cls.remote(config, str(model_file), test.info.num_classes,
                                   test.info.image_shape[2], plan.threads(cpus)) for _ in shards]
        logger.info("evaluating %d test samples on %d actor(s), %s protocol: %s", len(ids), len(actors),
                    config.evaluation.protocol, ", ".join(config.evaluation.attacks))
        refs = [a.run.remote(ids[lo:hi], images[lo:hi], labels[lo:hi], first)
                for a, (lo, hi, first) in zip(actors, shards)]
        parts = ray.get(refs)
        for a in actors:
            ray.kill(a)
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if not np.array_equal(np.sort(joined["id"]), ids):
            raise RuntimeError("evaluation did not cover every test id exactly once")
        correct = {k: v for k, v in joined.items() if k != "id"}
        joined["broken_by"] = broken_by(correct, eval_config(config).attacks)
        write_table_atomic(pa.table({k: (v.tolist() if k == "broken_by" else v) for k, v in joined.items()}),
                           per_sample)
        metrics = summarize(correct)
        report = protocol_report(config, test.info.num_classes, metrics)
        if report["warning"]:
            logger.warning("evaluation: %s", report["warning"])
        write_json_atomic(protocol_file, report)
        write_json_atomic(metrics_file, metrics)
        stage.commit({"metrics": metrics, "protocol": report["label"]})
    return EvalResult(json.loads(metrics_file.read_text()), per_sample, stage.input_digest,
                      json.loads(protocol_file.read_text()))
