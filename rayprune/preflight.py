"""Checks that run on the driver before the job starts Ray, MLflow or writes anything.

Bad input found here costs seconds instead of a scoring run: the pools are checked
(:func:`rayprune.data.pool_check.check_pool`), the test pool must fit the training pool,
and the options that depend on the pool's size (the scored subset, the neighbours left
for ``extrapolation.k`` after the probe, the final training's validation hold-out) are
checked with the same arithmetic the stages use. ``publish_uri`` and ``ray.storage_path``
must open (known scheme, credentials, an existing bucket).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.fs as pafs

from rayprune import storage
from rayprune.config import ConfigError, JobConfig
from rayprune.data.pool import PoolError
from rayprune.data.pool_check import check_pool
from rayprune.scoring.quality import probe_size
from rayprune.scoring.select import keep_budget, subset_size

logger = logging.getLogger(__name__)


def check_sizes(config: JobConfig, sources: dict[str, int], where: str) -> None:
    """Options against the pool's rows per source (``where`` names the pool)."""
    prunable = list(config.pool.prunable_sources)
    unknown = sorted(set(prunable) - set(sources))
    if unknown:
        raise ConfigError(f"pool.prunable_sources names {', '.join(unknown)}, which {where} does not have; "
                          f"its sources are {', '.join(sorted(sources))}")
    n_pool = sum(sources.values())
    n_prunable = sum(sources[s] for s in prunable)
    if n_prunable < 1:
        raise ConfigError(f"{where} has no rows in pool.prunable_sources ({', '.join(prunable)}): nothing to prune")
    n_subset = subset_size(n_prunable, config.split.subset_fraction)
    if n_subset > n_prunable:  # guarded by split.subset_fraction <= 1; kept as the invariant the stages rely on
        raise ConfigError(f"the scored subset ({n_subset}) would be larger than the prunable pool ({n_prunable})")
    e = config.extrapolation
    neighbours = n_subset - probe_size(n_subset, e.probe_fraction)
    if e.k > neighbours:
        raise ConfigError(
            f"extrapolation.k={e.k} exceeds the {neighbours} scored samples used as neighbours (a subset of {n_subset} "
            f"minus a probe of {n_subset - neighbours}); lower k, raise split.subset_fraction or lower "
            "extrapolation.probe_fraction"
        )
    if config.final.enabled:
        n_kept = n_pool - n_prunable + keep_budget(n_prunable, config.selection.keep_fraction)
        n_val = min(config.final.val_size, n_pool - n_prunable if n_pool > n_prunable else n_kept)
        if n_kept - n_val < 1:
            raise ConfigError(f"final.val_size={config.final.val_size} leaves no training samples in the pruned pool "
                              f"of {n_kept}; lower final.val_size")


def check_output_dir(config: JobConfig) -> None:
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")


def check_storage(config: JobConfig) -> None:
    """``publish_uri`` and ``ray.storage_path`` open (scheme, credentials, bucket) and stay out of the outputs."""
    for option, location in (("publish_uri", config.publish_uri), ("ray.storage_path", config.ray.storage_path)):
        if not location:
            continue
        try:
            storage.check_bucket(location)
        except storage.StorageError as exc:
            raise storage.StorageError(f"{option}: {exc}") from None
    if config.publish_uri:
        fs, path = storage.resolve(config.publish_uri)
        out = Path(config.output_dir).resolve()
        if isinstance(fs, pafs.LocalFileSystem) and Path(path).resolve().is_relative_to(out):
            raise ConfigError(f"publish_uri {config.publish_uri} lies inside output_dir {out}; publish elsewhere "
                              "(a URI such as s3://bucket/run, or another directory)")


def preflight(config: JobConfig) -> None:
    """Check the job's inputs against its config; raise ConfigError/PoolError naming the problem."""
    check_output_dir(config)
    check_storage(config)
    if config.pool.path:
        info = check_pool(config.pool.path)
        sources, shape, classes, where = info.sources, info.image_shape, info.num_classes, f"the pool {config.pool.path}"
    else:
        demo = config.pool.demo
        sources = {k: v for k, v in (("real", demo.n_real), ("synthetic", demo.n_synthetic)) if v > 0}
        shape, classes, where = (demo.image_size, demo.image_size, 3), demo.num_classes, "the demo pool"
    check_sizes(config, sources, where)
    if config.final.enabled and config.evaluation.test_pool:
        test = check_pool(config.evaluation.test_pool)
        if test.image_shape != shape or test.num_classes > classes:
            raise PoolError(
                f"evaluation.test_pool {config.evaluation.test_pool} has images {list(test.image_shape)} and "
                f"{test.num_classes} classes; the model is trained on {where}: images {list(shape)}, {classes} classes"
            )
