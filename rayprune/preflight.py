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
import math
from pathlib import Path

import pyarrow.fs as pafs

from rayprune import rundir, storage
from rayprune.config import ConfigError, JobConfig
from rayprune.data.pool import PoolError
from rayprune.data.pool_check import check_pool
from rayprune.errors import InputError
from rayprune.scoring.learned import FOLDS as LEARNED_FOLDS
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
    if e.model == "learned" and neighbours < 2 * LEARNED_FOLDS:
        raise ConfigError(f"extrapolation.model learned needs at least {2 * LEARNED_FOLDS} scored samples "
                          f"to fit on; the subset of {n_subset} minus a probe of {n_subset - neighbours} leaves "
                          f"{neighbours}: raise split.subset_fraction, or use extrapolation.model knn")
    if config.final.enabled:
        n_kept = n_pool - n_prunable + keep_budget(n_prunable, config.selection.keep_fraction)
        n_val = min(config.final.val_size, n_pool - n_prunable if n_pool > n_prunable else n_kept)
        if n_kept - n_val < 1:
            raise ConfigError(f"final.val_size={config.final.val_size} leaves no training samples in the pruned pool "
                              f"of {n_kept}; lower final.val_size")


def local_path(location: str) -> Path | None:
    """``location`` as a resolved local path (plain paths and file:// URIs), else None."""
    if not location:
        return None
    if storage.is_uri(location):
        fs, path = storage.resolve(location)
        return Path(path).resolve() if isinstance(fs, pafs.LocalFileSystem) else None
    return Path(location).resolve()


def check_output_dir(config: JobConfig) -> None:
    """The output directory is new, empty or an earlier run; it does not overlap a pool; and
    under ``stale_results=refuse`` it holds no kept results that this run would replace."""
    from rayprune.pipeline import stale_stages

    out = Path(config.output_dir).resolve()
    for option, location in (("pool.path", config.pool.path), ("evaluation.test_pool", config.evaluation.test_pool)):
        pool = local_path(location)
        if pool is not None and (out == pool or out.is_relative_to(pool) or pool.is_relative_to(out)):
            raise ConfigError(f"output_dir {out} and {option} {pool} overlap; the outputs must live apart from the "
                              "pools: choose an --output-dir outside (and not above) the pool")
    try:
        rundir.check_claimable(out)
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    stale = stale_stages(config)
    if stale and config.stale_results == "refuse":
        raise ConfigError(f"{rundir.describe_stale(out, stale)}; this run would redo them: rerun with --stale_results "
                          f"archive (moves them to {out / rundir.ARCHIVE_DIR}/) or --stale_results delete, or choose "
                          "another --output-dir")


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
        storage.check_publish_target(config.publish_uri)
        fs, path = storage.resolve(config.publish_uri)
        out = Path(config.output_dir).resolve()
        if isinstance(fs, pafs.LocalFileSystem) and Path(path).resolve().is_relative_to(out):
            raise ConfigError(f"publish_uri {config.publish_uri} lies inside output_dir {out}; publish elsewhere "
                              "(a URI such as s3://bucket/run, or another directory)")


def check_classes_and_threat_model(config: JobConfig, shape: tuple[int, int, int], classes: int, where: str) -> None:
    """Options that depend on the number of classes and the image size."""
    if classes < 2:
        raise PoolError(f"{where} has {classes} class; adversarial training of a classifier needs at least 2")
    if config.final.enabled and "apgd_t" in config.evaluation.attacks and classes < 3:
        raise ConfigError(f"evaluation.attacks includes apgd_t, whose targeted DLR loss needs at least 3 classes; "
                          f"{where} has {classes}: leave apgd_t out of evaluation.attacks")
    if config.attack.norm == "l2":
        diameter = math.sqrt(math.prod(shape))  # the L2 distance between an all-0 and an all-1 image
        if config.attack.eps > diameter or config.attack.step_size > diameter:
            raise ConfigError(f"attack.eps ({config.attack.eps:g}) and attack.step_size ({config.attack.step_size:g}) "
                              f"must be <= {diameter:.4g} for the l2 norm on {where}'s {'x'.join(map(str, shape))} "
                              "images (the largest L2 distance between two images in [0, 1])")


def check_ray_address(config: JobConfig, timeout_s: float = 5.0) -> None:
    """``ray.address`` (or RAY_ADDRESS) is ``auto``, ``local`` or a HOST:PORT that accepts a
    TCP connection: ``ray.init`` on an address where nothing listens retries for minutes."""
    import os
    import socket
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # the caller has connected already (tests, notebooks)
        return
    option = "ray.address" if config.ray.address else "RAY_ADDRESS"
    address = config.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address in ("", "auto", "local"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {address!r} must be auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"{option} {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); is the "
                          "cluster up (`ray status`)? Leave ray.address empty to start a local Ray") from None


def preflight(config: JobConfig) -> None:
    """Check the job's inputs against its config; raise ConfigError/PoolError naming the problem.

    The output directory is checked last: whether it holds stale results depends on the
    pools' content, which must be known to be readable first.
    """
    check_storage(config)
    if config.pool.path:
        info = check_pool(config.pool.path)
        sources, shape, classes = info.sources, info.image_shape, info.num_classes
        where = f"the pool {config.pool.path}"
    else:
        demo = config.pool.demo
        sources = {k: v for k, v in (("real", demo.n_real), ("synthetic", demo.n_synthetic)) if v > 0}
        shape, classes, where = (demo.image_size, demo.image_size, 3), demo.num_classes, "the demo pool"
    check_sizes(config, sources, where)
    check_classes_and_threat_model(config, shape, classes, where)
    if config.final.enabled and config.evaluation.test_pool:
        test = check_pool(config.evaluation.test_pool)
        if test.image_shape != shape or test.num_classes > classes:
            raise PoolError(
                f"evaluation.test_pool {config.evaluation.test_pool} has images {list(test.image_shape)} and "
                f"{test.num_classes} classes; the model is trained on {where}: images {list(shape)}, {classes} classes"
            )
    check_output_dir(config)
    check_ray_address(config)
