"""The final training's stream: the prunable rows as a Ray Data dataset, read by every
Ray Train worker as passes of decoded batches.

The dataset reads the pruned pool's Parquet files (file order reshuffled on every pass,
seeded), keeps the prunable rows that are not held out for validation, and is split
between the workers by Ray Train (``streaming_split``). Its execution runs in Ray Data's
split coordinator, whose scheduling loop is paced (:class:`PacedSchedulingLoop`).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from rayprune.data.pool import decode_images

logger = logging.getLogger(__name__)

STREAM_DATASET = "train_stream"

#: Shortest time between two steps of the stream's scheduling loop. Ray Data 2.60's loop
#: waits for nothing while the consumer (the training) holds it back, so it spins: on
#: 2 CPUs it took 0.6-0.7 of a core from the training worker, and a 1M-row stream trained
#: at 0.38x the in-memory speed. A step dispatches every task the budget allows and
#: collects every finished one, so 20 steps a second keep a stream of thousands of rows
#: per block well ahead of any trainer.
MIN_STEP_INTERVAL_S = 0.05

try:  # Ray Data's hook into its scheduling loop; it has no public import path.
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # another Ray: the stream runs unpaced (stream_dataset warns)
    ExecutionCallback = None


class PacedSchedulingLoop(ExecutionCallback or object):
    """Ray Data execution callback: while the consumer has blocks waiting, at most one
    scheduling-loop step per :data:`MIN_STEP_INTERVAL_S` (the rest of the interval is
    slept off after a fast step). A consumer with nothing to read is never kept waiting:
    the start of every pass, and any moment the stream falls behind, run unpaced.

    Whether the consumer is waiting is the executor's own test (``_consumer_idling``, a
    private method: Ray Data has no public one); without it every step is paced.
    """

    def __init__(self, interval: float = MIN_STEP_INTERVAL_S, clock=time.monotonic, sleep=time.sleep) -> None:
        self.interval, self._clock, self._sleep = interval, clock, sleep
        self._last: float | None = None

    def on_execution_step(self, executor) -> None:
        idling = getattr(executor, "_consumer_idling", None)
        now = self._clock()
        if not (callable(idling) and idling()) and self._last is not None and now - self._last < self.interval:
            self._sleep(self.interval - (now - self._last))
            now = self._clock()
        self._last = now


class KeepRows:
    """Ray Data batch filter (pyarrow): rows of the prunable ``sources`` (all sources if
    None), without the ``exclude`` ids (the validation set)."""

    def __init__(self, sources: list[str] | None, exclude: np.ndarray) -> None:
        self.sources, self.exclude = sources, np.asarray(exclude, np.int64)

    def __call__(self, table):
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = pc.invert(pc.is_in(table["id"], value_set=pa.array(self.exclude, pa.int64())))
        if self.sources is not None:
            keep = pc.and_(keep, pc.is_in(table["source"], value_set=pa.array(self.sources, pa.string())))
        return table.filter(keep)


def stream_dataset(files: list[str], sources: list[str] | None, exclude: np.ndarray, seed: int):
    """The streamed rows as a Ray Data dataset; file order reshuffled on every pass (seeded),
    its scheduling loop paced (:class:`PacedSchedulingLoop`)."""
    import ray.data
    from ray.data import FileShuffleConfig

    from rayprune import storage

    dataset = (ray.data.read_parquet(**storage.ray_parquet_source(files), columns=["id", "image", "label", "source"],
                                     shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True))
               .map_batches(KeepRows(sources, exclude), batch_format="pyarrow", batch_size=None))
    if ExecutionCallback is None:
        logger.warning("this Ray has no Ray Data execution callbacks: the training stream's scheduling loop is not "
                       "paced and may take most of a CPU core from training")
    else:  # the dataset's own context: other datasets of this driver are not paced
        dataset.context.custom_execution_callback_classes = [
            *dataset.context.custom_execution_callback_classes, PacedSchedulingLoop]
    return dataset


def stream_passes(shard, batch_size: int, image_shape, shuffle_buffer: int, seed: int, pass_index: int):
    """One pass over this worker's shard of the stream: decoded ``(images, labels)`` batches."""
    buffer = max(shuffle_buffer, batch_size) if shuffle_buffer else None
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True,
                                    local_shuffle_buffer_size=buffer,
                                    local_shuffle_seed=(seed * 1_000_003 + pass_index) % 2**32 if buffer else None):
        yield (decode_images(batch["image"], image_shape, ids=batch["id"], origin="the training stream"),
               batch["label"].to_numpy())
