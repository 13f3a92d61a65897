"""Streamed vs in-memory final training: throughput, loss curves and peak memory by pool size.

For each pool size the job's own final-training stage (``run_final``) trains the same
model on the same demo pool (a fixed real part, the rest synthetic) at the same explicit
step budget twice: with ``final.data_loading=memory`` (each worker loads its shard
before training) and ``stream`` (the synthetic part streams from Ray Data). Measured:

* steady-state throughput: training samples per second of the epochs after the first
  (``train_seconds`` in the history: the optimiser steps only, not validation or
  checkpoints), streamed against in-memory at the largest size (target >= 0.9x). On a
  shared 2-core machine one pair's ratio moves by as much as the effect (0.80x to 0.98x
  at 400k rows), so the largest size runs ``repeats`` alternating pairs and the
  comparison takes each path's median, with every pair's ratio in its note;
* the loss curves of both paths (same budget, same seed; the batches differ, so the
  curves agree within noise, not exactly);
* per epoch, the optimiser steps' seconds and (streamed) how many of them were spent
  waiting for the stream: where a slow first epoch goes;
* peak resident memory of the Ray worker processes (training workers and Ray Data's
  readers; the largest single process is the training worker) and of the driver, while
  the stage runs: flat with the pool for the streamed path, growing for in-memory. RSS
  also counts the object store's shared pages a process has read blocks from, so the
  largest worker's private (anonymous) memory is reported beside it;
* where the CPU goes in a steady epoch (the second; read from /proc): the training
  worker's cores and its busiest threads (the torch threads), Ray Data's processes (what
  the stream costs) and everything else (the driver and Ray's own processes).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from pathlib import Path

from benchmarks.common import cores_between, cpu_snapshot, demo_pool, local_ray, pool_mib, timed_with_memory
from benchmarks.report import BenchResult, Comparison
from rayprune.config import load_config

logger = logging.getLogger(__name__)

PRESETS = {
    "ci": {"sizes": [1_000], "n_real": 200, "image_size": 8, "width": 8, "epochs": 3, "steps": 4,
           "batch_size": 64, "repeats": 1},
    "small": {"sizes": [10_000, 100_000], "n_real": 2_000, "image_size": 32, "width": 16, "epochs": 3,
              "steps": 30, "batch_size": 128, "repeats": 2},
    "full": {"sizes": [10_000, 100_000, 1_000_000], "n_real": 2_000, "image_size": 32, "width": 16, "epochs": 3,
             "steps": 60, "batch_size": 128, "repeats": 3},
}
LOADINGS = ("memory", "stream")
#: Ray Data's own processes in a streamed run. A read task's worker is titled by its task
#: while it runs and ``ray::IDLE`` after, when its CPU counts as "other" (a small
#: undercount: 0.01 of a core at 1M rows); Ray Data's stats actor serves every dataset of
#: the session and is left out too.
STREAM_PROCESSES = ("SplitCoordinator", "ReadParquet", "MapBatches")


class SecondEpochCPU:
    """Cores this driver's processes use during a training run's second epoch (steady
    state): from the first checkpoint Ray Train writes under ``train_dir`` to the second.
    A context manager around the run; :meth:`fields` is empty if the run wrote fewer than
    two checkpoints."""

    def __init__(self, train_dir: Path, poll: float = 0.02) -> None:
        self.train_dir, self.poll = train_dir, poll
        self.window: tuple[float, dict[str, float], list[float]] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _checkpoints(self) -> int:
        if not self.train_dir.is_dir():
            return 0
        return sum(1 for p in self.train_dir.glob("checkpoint_*") if p.is_dir())

    def _wait_for(self, count: int) -> bool:
        while self._checkpoints() < count:
            if self._stop.wait(self.poll):
                return False
        return True

    def _run(self) -> None:
        if not self._wait_for(1):
            return
        before, started = cpu_snapshot(), time.monotonic()
        if not self._wait_for(2):
            return
        seconds = time.monotonic() - started
        self.window = (seconds, *cores_between(before, cpu_snapshot(), seconds))

    def __enter__(self) -> SecondEpochCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def fields(self) -> dict:
        if self.window is None:
            return {}
        seconds, by_title, threads = self.window
        worker = sum(v for t, v in by_title.items() if "RayTrainWorker" in t)
        stream = sum(v for t, v in by_title.items() if any(name in t for name in STREAM_PROCESSES))
        return {"epoch2_seconds": seconds, "epoch2_worker_cores": worker, "epoch2_worker_thread_cores": threads[:4],
                "epoch2_stream_cores": stream, "epoch2_other_cores": sum(by_title.values()) - worker - stream,
                "epoch2_cores_by_process": {t[:60]: round(v, 3) for t, v in by_title.items() if v >= 0.005}}


def measure(pool_dir: Path, loading: str, p: dict, workdir: Path, repeat: int = 0) -> dict:
    """Run the final-training stage once on ``pool_dir`` with ``loading``; time and sample it."""
    from rayprune.stages.final import run_final
    from rayprune.stages.prepare import open_pool
    from rayprune.stages.resources import plan_resources

    root = workdir / f"out-{pool_dir.name}-{loading}-{repeat}"
    config = load_config(None, {
        "output_dir": str(root), "pool.path": str(pool_dir), "model.width": p["width"],
        "final.data_loading": loading, "final.train.epochs": p["epochs"], "final.train.steps_per_epoch": p["steps"],
        "final.train.batch_size": p["batch_size"], "final.val_size": 64, "final.val_attack_steps": 1,
        "attack.steps": 1, "final.shuffle_buffer": 4 * p["batch_size"], "tracking.enabled": "false"})
    root.mkdir(parents=True)
    pool = open_pool(pool_dir)
    plan = plan_resources(config.ray)
    with SecondEpochCPU(root / "final_train" / "train") as cpu:
        result, seconds, memory = timed_with_memory(
            lambda: run_final(config, pool, pool_dir, {"benchmark": loading}, root, plan))
    steady = result.history[1:] or result.history
    per_epoch_samples = p["steps"] * p["batch_size"]
    return {"rows": pool.info.num_rows, "loading": result.data_loading, "repeat": repeat, "seconds": seconds,
            "samples_per_s": statistics.mean(per_epoch_samples / h["train_seconds"] for h in steady),
            "losses": [h["loss"] for h in result.history], **memory, "pool_mib": pool_mib(pool_dir),
            # Per epoch: the optimiser steps' seconds and, streamed, how many of them waited for batches.
            "train_seconds": [h["train_seconds"] for h in result.history],
            "stream_wait_seconds": [h.get("stream_wait_seconds") for h in result.history], **cpu.fields()}


def run(preset: str, workdir: Path) -> BenchResult:
    p = PRESETS[preset]
    result = BenchResult("streaming", preset, dict(p))
    with local_ray():
        for n in p["sizes"]:
            pool_dir, _ = demo_pool(workdir, n, p["image_size"], n_real=p["n_real"], rows_per_file=10_000)
            for repeat in range(p["repeats"] if n == p["sizes"][-1] else 1):
                for loading in LOADINGS:  # alternating, so slow spells of a shared machine hit both
                    row = measure(pool_dir, loading, p, workdir, repeat)
                    result.rows.append(row)
                    logger.info("streaming: %d rows, %s (repeat %d): %.0f samples/s, worker peak %.0f MiB, "
                                "driver peak %.0f MiB, losses %s, epoch 2 cores: worker %.2f, stream %.2f, "
                                "other %.2f", n, loading, repeat, row["samples_per_s"],
                                row["worker_peak_single_mib"], row["driver_peak_mib"],
                                json.dumps([round(v, 3) for v in row["losses"]]),
                                *(row.get(f"epoch2_{k}_cores", float("nan")) for k in ("worker", "stream", "other")))
    rows = {(r["rows"], r["loading"]): r for r in result.rows if r["repeat"] == 0}
    small, big = p["sizes"][0], p["sizes"][-1]
    mem, stream = rows[(big, "memory")], rows[(big, "stream")]
    result.comparisons += [
        throughput_comparison([r for r in result.rows if r["rows"] == big]),
        Comparison(f"largest worker's peak memory at {big:,} rows", "in memory", "streamed", "MiB",
                   mem["worker_peak_single_mib"], stream["worker_peak_single_mib"], higher_is_better=False),
    ]
    if small != big:  # growth with the pool (the ci preset has one size: it checks the two paths run)
        result.comparisons += [
            Comparison("streamed: largest worker's peak memory by pool size", f"{small:,} rows",
                       f"{big:,} rows", "MiB", rows[(small, "stream")]["worker_peak_single_mib"],
                       stream["worker_peak_single_mib"], higher_is_better=False, target=0.8,
                       note=f"pool on disk grows {big / small:.0f}x; flat = about 1.0"),
            Comparison("in memory: largest worker's peak memory by pool size", f"{small:,} rows",
                       f"{big:,} rows", "MiB", rows[(small, "memory")]["worker_peak_single_mib"],
                       mem["worker_peak_single_mib"], higher_is_better=False,
                       note="grows with the pool: the path the streamed one replaces for large pools"),
            Comparison("streamed: largest worker's private memory by pool size", f"{small:,} rows",
                       f"{big:,} rows", "MiB", rows[(small, "stream")]["worker_peak_single_private_mib"],
                       stream["worker_peak_single_private_mib"], higher_is_better=False, target=0.8,
                       note="anonymous memory only: without the object store's shared pages a reader maps"),
        ]
    gaps = [abs(a - b) for a, b in zip(mem["losses"], stream["losses"])]
    result.notes.append(f"loss per epoch at {big:,} rows, in memory {[round(v, 3) for v in mem['losses']]}, "
                        f"streamed {[round(v, 3) for v in stream['losses']]} (largest gap {max(gaps):.3f}; the "
                        "batches differ, so equal within noise, not exactly)")
    result.notes.append(cpu_note([r for r in result.rows if r["rows"] == big]))
    result.notes.append("memory is resident set size sampled every 0.25 s from /proc (a lower bound on peaks), "
                        "which counts the pages of Ray's shared-memory object store a process reads blocks from; "
                        "private memory is the anonymous part (RssAnon) alone; "
                        f"a fixed real part of {p['n_real']} rows stays in memory on both paths")
    return result


def cpu_note(rows: list[dict]) -> str:
    """Where one size's CPU went in the second epoch, each path's median over its repeats."""
    parts = []
    for loading in LOADINGS:
        measured = [r for r in rows if r["loading"] == loading and "epoch2_worker_cores" in r]
        if not measured:
            parts.append(f"{loading}: not measured (fewer than two checkpoints)")
            continue
        med = {k: statistics.median(r[f"epoch2_{k}_cores"] for r in measured) for k in ("worker", "stream", "other")}
        parts.append(f"{loading}: training worker {med['worker']:.2f}, Ray Data {med['stream']:.2f}, "
                     f"driver and Ray's own processes {med['other']:.2f}")
    return (f"cores used in the second epoch at {rows[0]['rows']:,} rows (median over repeats; what the stream costs "
            "is its Ray Data share): " + "; ".join(parts))


def throughput_comparison(rows: list[dict]) -> Comparison:
    """Streamed against in-memory samples/s over one size's repeats: each path's median,
    and every alternating pair's ratio in the note."""
    by = {loading: {r["repeat"]: r["samples_per_s"] for r in rows if r["loading"] == loading} for loading in LOADINGS}
    pairs = sorted(set(by["memory"]) & set(by["stream"]))
    ratios = ", ".join(f"{by['stream'][i] / by['memory'][i]:.2f}x" for i in pairs)
    return Comparison(f"training throughput at {rows[0]['rows']:,} rows", "in memory", "streamed", "samples/s",
                      statistics.median(by["memory"].values()), statistics.median(by["stream"].values()), target=0.9,
                      note=f"steady state: the epochs after the first, optimiser steps only; median of {len(pairs)} "
                           f"alternating pair(s), pair ratios {ratios}")
