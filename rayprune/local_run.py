"""The whole method in one process, on the generated demo pool.

This is the pre-Ray form of the job: the same algorithms the distributed stages will
call, run in order on a pool held in memory. It is what ``python jobs/prune.py`` runs
until the Ray pipeline lands (see the README's status section).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from rayprune.config import JobConfig, to_dict
from rayprune.data.demo_pool import DemoPoolSpec, generate_rows
from rayprune.robust.attacks import AttackConfig
from rayprune.robust.loop import ATRecipe, BatchStream, train_steps
from rayprune.robust.models import build_model
from rayprune.robust.recording import RECORDED_FIELDS, compute_embeddings, record_predictions
from rayprune.robust.training import make_optimizer, to_float_images
from rayprune.scoring.extrapolate import ExtrapolationConfig, extrapolate_scores
from rayprune.scoring.neighbours import SearchOptions
from rayprune.scoring.scores import SCORE_DIRECTIONS, score_from_histories
from rayprune.scoring.select import draw_subset, select_by_score, select_random

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What the job prints at the end and writes to manifest.json."""

    pool_size: int = 0
    scored: int = 0
    extrapolated: int = 0
    kept: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    training_steps: int = 0
    output_dir: str = ""


@contextmanager
def _timed(summary: RunSummary, stage: str):
    start = time.perf_counter()
    logger.info("stage %s ...", stage)
    yield
    summary.stage_seconds[stage] = round(time.perf_counter() - start, 3)
    logger.info("stage %s done in %.1f s", stage, summary.stage_seconds[stage])


def attack_from_config(config: JobConfig) -> AttackConfig:
    a = config.attack
    return AttackConfig(norm=a.norm, eps=a.eps, step_size=a.step_size, steps=a.steps, loss="ce", random_start=True)


def steps_per_epoch(config: JobConfig, n_real: int, n_subset: int) -> int:
    """Optimiser steps per scoring epoch: as set, or one pass over the real data.

    Sizing by the real part (not the subset) gives the scoring run the step budget of a
    full run; one pass over a 10% subset per epoch yields scores unrelated to full-run
    scores (method.md, "The scoring run's budget").
    """
    if config.train.steps_per_epoch:
        return config.train.steps_per_epoch
    basis = n_real if n_real > 0 else n_subset
    return max(1, math.ceil(basis / config.train.batch_size))


def scoring_run(config: JobConfig, images: torch.Tensor, labels: torch.Tensor, n_real: int):
    """Adversarially train on the subset; record per-sample statistics after every epoch.

    Returns the trained (raw) model and the histories as ``(epochs, n_subset)`` arrays.
    """
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.name, num_classes=int(labels.max()) + 1, **_model_kwargs(config))
    optimizer = make_optimizer(model, config.train.lr, config.train.momentum, config.train.weight_decay, config.train.nesterov)
    per_epoch = steps_per_epoch(config, n_real, len(images))
    total = per_epoch * config.train.epochs
    recipe = ATRecipe(
        loss=config.train.loss,
        trades_beta=config.train.trades_beta,
        label_smoothing=config.train.label_smoothing,
        lr=config.train.lr,
        schedule=config.train.schedule,
        warmup_steps=config.train.warmup_epochs * per_epoch,
        augment=config.train.augment,
    )
    attack = attack_from_config(config)
    stream = BatchStream(len(images), config.train.batch_size, seed=config.train.seed)
    generator = torch.Generator().manual_seed(config.train.seed)
    history = {f: [] for f in RECORDED_FIELDS}
    logger.info(
        "scoring run: %d samples, %d epochs x %d steps of batch %d (%s, %s eps=%.4f, %d steps)",
        len(images), config.train.epochs, per_epoch, config.train.batch_size, recipe.loss,
        attack.norm, attack.eps, attack.steps,
    )
    bar = tqdm(range(config.train.epochs), desc="scoring run", unit="epoch", disable=not sys.stderr.isatty())
    for epoch in bar:
        stats = train_steps(
            model, optimizer, images, labels, stream, attack, recipe,
            steps=per_epoch, first_step=epoch * per_epoch, total_steps=total, generator=generator,
        )
        record = record_predictions(model, images, labels, attack, generator=generator)
        for f in RECORDED_FIELDS:
            history[f].append(getattr(record, f))
        clean_acc = float((record.margin_clean > 0).mean())
        adv_acc = float((record.margin_adv > 0).mean())
        bar.set_postfix(loss=f"{stats['loss']:.3f}", clean=f"{clean_acc:.2f}", adv=f"{adv_acc:.2f}")
        logger.info(
            "epoch %d/%d: loss %.3f, lr %.4f, subset clean acc %.3f, adv acc %.3f",
            epoch + 1, config.train.epochs, stats["loss"], stats["lr"], clean_acc, adv_acc,
        )
    return model, {f: np.stack(v) for f, v in history.items()}, total


def _model_kwargs(config: JobConfig) -> dict:
    return {"width": config.model.width} if config.model.name == "small_cnn" else {}


def scores_from(config: JobConfig, history: dict[str, np.ndarray]) -> np.ndarray:
    sig = config.scoring.signal
    return score_from_histories(
        config.scoring.score,
        history[f"p_{sig}"],
        history[f"margin_{sig}"],
        history[f"l2_error_{sig}"],
        window=config.scoring.window,
        seed=config.split.seed,
    )


@contextmanager
def _atomic_dir(path: Path):
    """Write into a temporary sibling, then swap it in: no half-written output dir."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def run_local(config: JobConfig) -> RunSummary:
    """Run split -> scoring run -> scores -> embeddings -> extrapolation -> selection."""
    summary = RunSummary()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with _timed(summary, "pool"):
        d = config.pool.demo
        spec = DemoPoolSpec(
            n_real=d.n_real, n_synthetic=d.n_synthetic, image_size=d.image_size, num_classes=d.num_classes,
            seed=d.seed, label_noise=d.label_noise, duplicate_fraction=d.duplicate_fraction,
        )
        rows = generate_rows(spec)
        images = to_float_images(rows.images)
        labels = torch.from_numpy(rows.labels)
        prunable = np.isin(rows.sources, list(config.pool.prunable_sources))
        summary.pool_size = len(rows.ids)
    with _timed(summary, "split"):
        subset = draw_subset(len(rows.ids), config.split.subset_fraction, config.split.seed, eligible=prunable)
    with _timed(summary, "score_subset"):
        model, history, summary.training_steps = scoring_run(config, images[subset], labels[subset], spec.n_real)
        subset_scores = scores_from(config, history)
    with _timed(summary, "embed"):
        embeddings = compute_embeddings(model, images)
    with _timed(summary, "extrapolate"):
        e = config.extrapolation
        result = extrapolate_scores(
            embeddings[subset], subset_scores, embeddings,
            ExtrapolationConfig(k=e.k, weighting=e.weighting, same_label=e.same_label,
                                search=SearchOptions(metric=e.metric, method=e.method)),
            reference_ids=rows.ids[subset], query_ids=rows.ids,
            reference_labels=rows.labels[subset], query_labels=rows.labels,
        )
    with _timed(summary, "select"):
        s = config.selection
        common = dict(keep_fraction=s.keep_fraction, labels=rows.labels, class_balanced=s.class_balanced,
                      prunable=prunable, seed=s.seed)
        if s.strategy == "random":
            kept = select_random(len(rows.ids), **common)
        else:
            kept = select_by_score(result.scores, higher_is_better=SCORE_DIRECTIONS[config.scoring.score], **common)
    summary.scored = int(result.measured.sum())
    summary.extrapolated = int((~result.measured).sum())
    summary.kept = len(kept)
    out = Path(config.output_dir)
    summary.output_dir = str(out.resolve())
    with _timed(summary, "write"), _atomic_dir(out) as tmp:
        kept_mask = np.zeros(len(rows.ids), dtype=bool)
        kept_mask[kept] = True
        table = pa.table({
            "id": rows.ids,
            "label": rows.labels,
            "source": pa.array(rows.sources.tolist(), pa.string()),
            "score": result.scores,
            "measured": result.measured,
            "neighbour_distance": result.neighbour_distance,
            "kept": kept_mask,
        })
        pq.write_table(table, tmp / "scores.parquet")
        np.savez(tmp / "subset_history.npz", ids=rows.ids[subset], **history)
        manifest = {"summary": summary.__dict__, "config": to_dict(config), "mode": "local (single process)"}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return summary
