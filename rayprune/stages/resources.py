"""Connect to Ray and size training workers and actor pools from the cluster.

Sizing rule: something must always be left for Ray Data's read and write tasks, or an
actor pool that takes every CPU starves them and the job hangs (seen on 2-CPU machines).
So a quarter of the CPUs (at least one, since each of those tasks asks for a whole CPU;
at most four) stays free, and on small machines actors get fractional CPUs instead of
one each.

Those CPU counts are scheduling reservations, not the cores a process may use. The read
and write tasks the reserve is kept for use a few percent of a core (measured on 2
cores), so the embedding actors' torch threads together fill every CPU of the cluster
(``embed_threads``) rather than only the CPUs they reserve: on a 2-CPU laptop the single
embedding actor runs 2 threads, not 1. Extrapolation actors, which mostly wait for
embeddings, keep one thread per reserved CPU.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace

import ray

from rayprune.config import RaySection
from rayprune.ray_logs import quiet_ray_data_on_driver

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourcePlan:
    """How many workers/actors each stage uses and what each one asks Ray for."""

    total_cpus: float
    total_gpus: float
    train_workers: int
    train_use_gpu: bool
    train_cpus_per_worker: float
    embed_actors: int
    embed_cpus_per_actor: float
    embed_gpus_per_actor: float
    extrapolate_actors: int
    extrapolate_cpus_per_actor: float
    io_cpus: float
    embed_threads: int
    extrapolate_threads: int

    @staticmethod
    def threads(cpus: float) -> int:
        """Torch threads for a worker holding ``cpus`` (Ray sets OMP threads to 1 for fractions)."""
        return max(1, math.ceil(cpus))


#: Set to 1 to read Parquet through Ray Data's DataSource V2 reader (the Ray 2.60 default).
PARQUET_READER_ENV = "RAY_DATA_USE_DATASOURCE_V2"


def configure_ray_data() -> None:
    """Ray Data settings of the datasets this driver builds.

    Parquet is read with Ray Data's V1 reader unless RAY_DATA_USE_DATASOURCE_V2 is set.
    The V2 reader starts 32 footer-reading actors on every execution: measured on 2 CPUs
    over a 100k-row pool of 10 files, 2.3-3 s before the first batch against 0.1-0.5 s for
    V1, at the same rows per second. Every stage's read and every pass of the streamed
    final training starts an execution, so the job would pay it dozens of times.
    """
    import ray.data

    if PARQUET_READER_ENV not in os.environ:
        ray.data.DataContext.get_current().use_datasource_v2 = False


def connect(config: RaySection) -> None:
    """Join the cluster (``ray.address`` or RAY_ADDRESS) or start a new local Ray, with
    this driver's Ray Data settings (:func:`configure_ray_data`)."""
    configure_ray_data()
    quiet_ray_data_on_driver()
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        logger.info("starting a local Ray instance (--ray.address auto joins a cluster started with `ray start`)")
        # address="local" always starts a new instance: without it ray.init() would join
        # whatever cluster Ray's current-cluster file names, and hang retrying one that has
        # died. The dashboard (which also serves the state API Ray Train polls) binds to
        # loopback only.
        ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True)


def wait_for_resources(get_resources, cpus: float, gpus: float, timeout_s: float, poll_s: float = 5.0,
                       clock=time.monotonic, sleep=time.sleep) -> dict:
    """Poll ``get_resources()`` until it reports ``cpus`` CPUs and ``gpus`` GPUs; return the last report.

    Raises ``RuntimeError`` naming what is missing when ``timeout_s`` passes first.
    """
    deadline = clock() + timeout_s
    while True:
        res = get_resources()
        have_cpus, have_gpus = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
        if have_cpus >= cpus and have_gpus >= gpus:
            return res
        if clock() >= deadline:
            raise RuntimeError(
                f"the cluster has {have_cpus:g} CPU(s) and {have_gpus:g} GPU(s) after waiting {timeout_s:g} s for "
                f"ray.request_cpus={cpus:g} and ray.request_gpus={gpus:g}: check the autoscaler (ray status, "
                "the cluster's max_workers and instance quotas), or lower the requests or raise ray.resource_wait_s"
            )
        logger.info("waiting for the autoscaler: %g/%g CPUs, %g/%g GPUs", have_cpus, cpus, have_gpus, gpus)
        sleep(min(poll_s, max(0.0, deadline - clock())))


def autoscaler_bundles(config: RaySection) -> list[dict[str, float]]:
    """One bundle per GPU (with a CPU to feed it) plus one per remaining CPU.

    Small bundles let the autoscaler pick whichever node types can hold them.
    """
    gpu_bundles = [{"GPU": 1, "CPU": 1}] * config.request_gpus
    return gpu_bundles + [{"CPU": 1}] * max(0, config.request_cpus - config.request_gpus)


def request_cluster(config: RaySection) -> None:
    """Ask the autoscaler for ``ray.request_cpus``/``request_gpus`` and wait until they join.

    Without an autoscaler (a laptop, a fixed cluster) the request has no effect and the
    wait only succeeds if the resources are already there.
    """
    if not (config.request_cpus or config.request_gpus):
        return
    from ray.autoscaler.sdk import request_resources

    logger.info("asking the autoscaler for %d CPU(s) and %d GPU(s)", config.request_cpus, config.request_gpus)
    request_resources(bundles=autoscaler_bundles(config))
    wait_for_resources(ray.cluster_resources, config.request_cpus, config.request_gpus, config.resource_wait_s)


def release_cluster(config: RaySection) -> None:
    """Withdraw the request made by ``request_cluster``, so idle workers can scale down."""
    if (config.request_cpus or config.request_gpus) and ray.is_initialized():
        from ray.autoscaler.sdk import request_resources

        request_resources(num_cpus=0, bundles=[])


def _max_node_cpus() -> float:
    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def plan_resources(config: RaySection) -> ResourcePlan:
    """Size everything from ``ray.cluster_resources()`` and the explicit settings."""
    res = ray.cluster_resources()
    plan = plan_from_resources(config, float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0)), _max_node_cpus())
    logger.info("resource plan: %s", plan)
    return plan


def plan_from_resources(config: RaySection, cpus: float, gpus: float, max_node_cpus: float) -> ResourcePlan:
    """The sizing rule as a pure function of the cluster's totals (see module docstring)."""
    if cpus <= 0:
        raise RuntimeError("the Ray cluster reports no CPUs; cannot schedule the job")
    # Ray Data's list/read/write tasks each ask for one whole CPU: keep at least one free.
    io = min(max(1.0, 0.25 * cpus), 4.0)
    budget = max(0.5, cpus - io)
    use_gpu = {"auto": gpus >= 1, "true": True, "false": False}[config.use_gpu]
    if use_gpu and gpus < 1:
        raise RuntimeError("ray.use_gpu=true but the cluster has no GPU")

    if config.train_workers:
        workers = config.train_workers
    else:
        workers = int(gpus) if use_gpu else 1
    # Training runs alone (no Ray Data tasks beside it), so its workers share every CPU,
    # up to one node's worth each.
    per_worker = min(max_node_cpus or cpus, cpus / workers)
    per_worker = max(0.25, per_worker if per_worker < 1 else float(int(per_worker)))

    embed_budget, extrap_budget = budget * 2 / 3, budget / 3
    embed_actors = config.embed_actors or (int(gpus) if use_gpu else max(1, int(embed_budget)))
    extrap_actors = config.extrapolate_actors or max(1, int(extrap_budget))
    embed_cpus = max(0.25, min(1.0, embed_budget / embed_actors)) if not use_gpu else 1.0
    extrap_cpus = max(0.25, min(1.0, extrap_budget / extrap_actors))
    if config.embed_threads:
        embed_threads = config.embed_threads
    elif use_gpu:
        embed_threads = ResourcePlan.threads(embed_cpus)  # the GPU does the work
    else:  # fill the cluster's CPUs, no more than one node's worth per actor
        embed_threads = max(1, int(min(cpus / embed_actors, max_node_cpus or cpus)))
    plan = ResourcePlan(
        total_cpus=cpus,
        total_gpus=gpus,
        train_workers=workers,
        train_use_gpu=use_gpu,
        train_cpus_per_worker=per_worker,
        embed_actors=embed_actors,
        embed_cpus_per_actor=embed_cpus,
        embed_gpus_per_actor=1.0 if use_gpu else 0.0,
        extrapolate_actors=extrap_actors,
        extrapolate_cpus_per_actor=extrap_cpus,
        io_cpus=io,
        embed_threads=embed_threads,
        extrapolate_threads=ResourcePlan.threads(extrap_cpus),
    )
    return plan


def streaming_plan(plan: ResourcePlan) -> ResourcePlan:
    """``plan`` for a training that streams its rows: the workers leave ``io_cpus`` free for
    Ray Data's read tasks (a training that holds every CPU would starve its own stream).

    Only the reservation shrinks: the stream's read, filter and decode use a few percent of
    a core (raw pixel bytes, no codec), so the workers keep the torch threads of ``plan``,
    as the embedding actors do (module docstring)."""
    per_worker = max(0.25, (plan.total_cpus - plan.io_cpus) / plan.train_workers)
    per_worker = per_worker if per_worker < 1 else float(int(per_worker))
    return replace(plan, train_cpus_per_worker=min(plan.train_cpus_per_worker, per_worker))
