"""Benchmark 2: the embedding stage on Ray Data vs a plain single-process PyTorch loop.

Both embed the same demo pool with the same model on the same cores: the plain loop
reads the Parquet shards with pyarrow and runs ``model.embed`` with every core as a
torch thread; the Ray side is the job's own pipeline (``embed_rows``: streaming read,
re-chunk, Embedder actor pool sized by the job's resource plan). Embeddings of a sample
of ids are compared, so a fast wrong pipeline cannot pass.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import demo_pool, local_ray, model_file
from benchmarks.report import BenchResult, Comparison
from rayprune.config import JobConfig, RaySection
from rayprune.data.pool import decode_images, pool_files, read_pool_info
from rayprune.robust.training import to_float_images
from rayprune.stages.training import load_model_file

logger = logging.getLogger(__name__)

PRESETS = {
    "ci": {"rows": 2_000, "image_size": 16, "repeats": 1},
    "small": {"rows": 60_000, "image_size": 16, "repeats": 2},
    "full": {"rows": 200_000, "image_size": 32, "repeats": 1},
}
CHECK_EVERY = 97  # ids divisible by this are compared between the two paths


def plain_loop(config: JobConfig, pool_dir: Path, model_path: Path) -> tuple[float, dict[int, np.ndarray]]:
    """Embed every row in this process; return (seconds, sampled embeddings by id)."""
    info = read_pool_info(pool_dir)
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model_file(config, model_path, info.num_classes, info.image_shape[2]).eval()
    batch, sample = config.ray.inference_batch_size, {}
    start = time.perf_counter()
    with torch.inference_mode():
        for path in pool_files(pool_dir, info):
            for rb in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=["id", "image"]):
                emb = model.embed(to_float_images(decode_images(rb.column("image"), info.image_shape))).numpy()
                ids = rb.column("id").to_numpy()
                for i in np.flatnonzero(ids % CHECK_EVERY == 0):
                    sample[int(ids[i])] = emb[i]
    return time.perf_counter() - start, sample


def ray_pipeline(config: JobConfig, pool_dir: Path, model_path: Path) -> tuple[float, dict[int, np.ndarray], dict]:
    """Embed every row with the job's Ray Data pipeline; same return plus the plan used."""
    import ray

    from rayprune.stages.extrapolate import embed_rows
    from rayprune.stages.resources import plan_resources

    info = read_pool_info(pool_dir)
    plan = plan_resources(config.ray)
    start = time.perf_counter()
    ds = embed_rows(ray.data.read_parquet(pool_files(pool_dir, info)), config, info, model_path, plan,
                    plan.embed_actors, rechunk=True)
    sample, rows, first = {}, 0, None
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        ids = b["id"]
        if first is None:  # start-up: planning, actor start, model load, first read
            first = (time.perf_counter() - start, len(ids))
        rows += len(ids)
        for i in np.flatnonzero(ids % CHECK_EVERY == 0):
            sample[int(ids[i])] = np.asarray(b["embedding"][i])
    seconds = time.perf_counter() - start
    if rows != info.num_rows:
        raise RuntimeError(f"Ray pipeline embedded {rows} rows of {info.num_rows}")
    return seconds, sample, {"embed_actors": plan.embed_actors, "cpus_per_actor": plan.embed_cpus_per_actor,
                             "threads_per_actor": plan.embed_threads,
                             "startup_seconds": first[0],
                             "steady_rows_per_s": (rows - first[1]) / max(seconds - first[0], 1e-9)}


def _max_difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise RuntimeError(f"the two paths embedded different ids ({len(a)} vs {len(b)} sampled)")
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def run(preset: str, workdir: Path) -> BenchResult:
    p = PRESETS[preset]
    config = JobConfig(ray=RaySection())
    pool_dir, info = demo_pool(workdir, p["rows"], p["image_size"])
    model_path = model_file(config, info, workdir / "model.pt")
    result = BenchResult("embedding", preset,
                         {**p, "model": config.model.name, "batch": config.ray.inference_batch_size})
    plain_times, ray_times = [], []
    with local_ray():
        for rep in range(p["repeats"]):  # alternate, so drift in machine load hits both
            t_plain, plain_sample = plain_loop(config, pool_dir, model_path)
            t_ray, ray_sample, plan = ray_pipeline(config, pool_dir, model_path)
            diff = _max_difference(plain_sample, ray_sample)
            if diff > 1e-3:
                raise RuntimeError(f"Ray and plain embeddings differ by up to {diff:.2e}")
            plain_times.append(t_plain)
            ray_times.append(t_ray)
            result.rows.append({"repeat": rep, "plain_seconds": t_plain, "ray_seconds": t_ray,
                                "max_embedding_difference": diff, **plan})
            logger.info("embedding repeat %d: plain %.1f s, Ray Data %.1f s", rep, t_plain, t_ray)
    rows = info.num_rows
    result.comparisons.append(Comparison(
        "embed pool", "plain PyTorch loop", "Ray Data actor pipeline", "rows/s",
        rows / min(plain_times), rows / min(ray_times), target=0.85,
        note="best of repeats; Ray time includes actor start-up"))
    steady = max(r["steady_rows_per_s"] for r in result.rows)
    result.comparisons.append(Comparison(
        "embed pool after start-up", "plain PyTorch loop", "Ray Data actor pipeline", "rows/s",
        rows / min(plain_times), steady,
        note=f"Ray rows after its first batch; start-up took {min(r['startup_seconds'] for r in result.rows):.1f} s"))
    result.notes.append(f"{rows} rows of {p['image_size']}px images, {config.model.name}; plain loop uses "
                        f"{os.cpu_count()} torch threads, Ray uses the job's resource plan {result.rows[-1]}")
    return result
