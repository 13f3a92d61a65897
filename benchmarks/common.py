"""Fixtures the Ray benchmarks share: a demo pool on disk, a model file, a local Ray, memory probes."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from pathlib import Path

import torch

from rayprune.config import JobConfig
from rayprune.data.demo_pool import DemoPoolSpec
from rayprune.data.pool import PoolInfo, write_demo_pool
from rayprune.stages.training import model_from_config


def demo_pool(workdir: Path, n_rows: int, image_size: int = 16, real_fraction: float = 0.2,
              rows_per_file: int = 50_000, n_real: int | None = None) -> tuple[Path, PoolInfo]:
    """Write a demo pool of ``n_rows`` rows (``real_fraction`` of them real, or ``n_real``) under ``workdir``."""
    n_real = n_real if n_real is not None else max(1, int(round(n_rows * real_fraction)))
    spec = DemoPoolSpec(n_real=n_real, n_synthetic=n_rows - n_real, image_size=image_size)
    path = Path(workdir) / f"pool-{n_rows}"
    info = write_demo_pool(spec, path, rows_per_file=rows_per_file, overwrite=True)
    return path, info


def model_file(config: JobConfig, info: PoolInfo, path: Path, seed: int = 0) -> Path:
    """Save a freshly initialised model of the job's kind (inference cost does not depend on weights)."""
    torch.manual_seed(seed)
    model = model_from_config(config, info.num_classes, info.image_shape[2])
    torch.save(model.state_dict(), path)
    return path


def score_subset(config: JobConfig):
    """The job's own stages up to its scoring run (no extrapolation or selection), for
    benchmarks that need a scored subset but not the rest: ``(split, score)``."""
    from rayprune.stages.prepare import run_pool, run_split
    from rayprune.stages.resources import plan_resources
    from rayprune.stages.score import run_score

    root = Path(config.output_dir)
    pool = run_pool(config, root)
    split = run_split(config, pool, root)
    return split, run_score(config, pool, split, root, plan_resources(config.ray))


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None):
    """A local Ray instance for one benchmark, shut down afterwards.

    If this process is already connected to Ray (the tests run every ci benchmark on one
    instance, saving a start per benchmark), that instance is used and left running; its
    warm worker processes make start-up times and memory totals incomparable to a run on
    its own, which is fine for the ci preset's well-formedness checks.
    """
    import ray

    from rayprune.stages.resources import configure_ray_data

    configure_ray_data()  # the job's Ray Data settings, so the benchmark measures what the job runs
    if ray.is_initialized():
        yield
        return
    # address="local": a new instance, never a cluster that `ray start` left on the machine.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), dashboard_host="127.0.0.1",
             include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def driver_peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_mib(pid: int | str) -> tuple[float, float]:
    """``(resident, private)`` memory of process ``pid`` in MiB, from one read of
    /proc/PID/status (zeros if it is gone). Resident (VmRSS) also counts the shared-memory
    pages of Ray's object store and mapped files; private (RssAnon) is heap and tensors."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    key, kib = line.split()[:2]
                    found[key] = int(kib) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return found.get("VmRSS:", 0.0), found.get("RssAnon:", 0.0)


def _stat_fields(stat_file: str) -> list[str]:
    """The fields of a /proc ``stat`` file after the command name (which may hold spaces):
    ``[state, parent pid, ...]``, so field n of proc(5) is at index n - 3."""
    with open(stat_file) as f:
        return f.read().rsplit(")", 1)[1].split()


def _title(pid: str) -> str:
    """A process's title: the first word of its command line (Ray's workers set it to
    ``ray::<class or task>``)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read(256).split(b"\0")[0].decode(errors="replace")


def _parent_pids() -> dict[str, str]:
    """pid -> parent pid of every process (Linux: read from /proc)."""
    parents = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                parents[pid] = _stat_fields(f"/proc/{pid}/stat")[1]
            except (OSError, IndexError):
                continue
    return parents


def _descendants(root: str) -> list[str]:
    """``root`` (first) and every process below it."""
    children: dict[str, list[str]] = {}
    for pid, parent in _parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop()
        if pid not in seen:  # a pid reused while /proc was read could close a loop
            seen.add(pid)
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def ray_worker_pids(root: str | None = None, title_contains: str = "") -> list[str]:
    """Ray worker processes (``ray::...``) descended from ``root`` (default: this process)
    whose process title contains ``title_contains`` (an actor's class name, say).

    A local Ray instance's raylet is this driver's child and its workers the raylet's, so
    another Ray instance on the machine (another benchmark, a parallel test) is not counted.
    Reading /proc takes milliseconds and needs no Ray service (the state API can take
    seconds on a busy machine).
    """
    pids = []
    for pid in _descendants(root or str(os.getpid()))[1:]:
        try:
            title = _title(pid)
        except OSError:
            continue  # ended while being read
        if title.startswith("ray::") and title_contains in title:
            pids.append(pid)
    return pids


def _cpu_seconds(stat_file: str) -> float:
    """User + system CPU seconds from a /proc ``stat`` file (of a process or a thread)."""
    fields = _stat_fields(stat_file)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(threads_of: str = "RayTrainWorker") -> dict[str, tuple[str, float, dict[str, float]]]:
    """CPU seconds used so far by this process and every process below it (a local Ray's
    raylet, GCS and workers among them): ``{pid: (title, seconds, threads)}``, where
    ``threads`` (thread id -> seconds) is filled for processes whose title contains
    ``threads_of`` only. Linux-only (reads /proc); empty elsewhere."""
    if not os.path.isdir("/proc"):
        return {}
    snapshot = {}
    for pid in _descendants(str(os.getpid())):
        try:
            title = _title(pid)
            threads = {}
            if threads_of and threads_of in title:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError, IndexError):
                        threads[tid] = _cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
            snapshot[pid] = (title, _cpu_seconds(f"/proc/{pid}/stat"), threads)
        except (OSError, IndexError):
            continue  # the process ended while being read
    return snapshot


def cores_between(before: dict, after: dict, seconds: float) -> tuple[dict[str, float], list[float]]:
    """Cores used between two :func:`cpu_snapshot` calls ``seconds`` apart: summed by
    process title, and per thread of the processes whose threads were read (busiest
    first). Processes that started in between count from zero."""
    by_title: dict[str, float] = {}
    threads: list[float] = []
    for pid, (title, used, thread_used) in after.items():
        _, used_before, threads_before = before.get(pid, (title, 0.0, {}))
        by_title[title] = by_title.get(title, 0.0) + (used - used_before) / seconds
        threads += [(v - threads_before.get(tid, 0.0)) / seconds for tid, v in thread_used.items()]
    return by_title, sorted(threads, reverse=True)


class WorkerMemorySampler:
    """Samples the resident memory of this driver's local Ray workers (``ray::...``).

    Or of the processes ``pids``, e.g. the driver's own. Reports the peak of their sum
    and of the largest single process, and the largest single process's private
    (anonymous) memory: a worker reading blocks zero-copy from the object store counts
    those shared pages in its RSS, not in its private memory. Linux-only (reads /proc); returns zeros
    elsewhere. Sampling every ``interval`` seconds can miss short spikes, so the numbers
    are lower bounds.
    """

    def __init__(self, interval: float = 0.25, pids: list[int] | None = None) -> None:
        self.interval = interval
        self.pids = [str(p) for p in pids] if pids else None
        self.peak_total = self.peak_single = self.peak_single_private = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sizes = [memory_mib(p) for p in (self.pids or ray_worker_pids())]
            if sizes:
                self.peak_total = max(self.peak_total, sum(rss for rss, _ in sizes))
                self.peak_single = max(self.peak_single, max(rss for rss, _ in sizes))
                self.peak_single_private = max(self.peak_single_private, max(private for _, private in sizes))
            time.sleep(self.interval)

    def __enter__(self) -> WorkerMemorySampler:
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def timed_with_memory(fn):
    """``(fn(), seconds, memory)``: ``fn`` timed while the Ray workers' and this driver's
    resident memory are sampled; ``memory`` holds the peaks in MiB, named as the benchmarks
    report them (sampled, so lower bounds)."""
    with WorkerMemorySampler() as workers, WorkerMemorySampler(pids=[os.getpid()]) as driver:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, {"driver_peak_mib": driver.peak_total, "workers_peak_total_mib": workers.peak_total,
                          "worker_peak_single_mib": workers.peak_single,
                          "worker_peak_single_private_mib": workers.peak_single_private}


def pool_mib(pool_dir: Path) -> float:
    """Size of a pool's Parquet files on disk."""
    return sum(f.stat().st_size for f in Path(pool_dir).glob("*.parquet")) / 2**20
