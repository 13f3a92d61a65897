"""Ray log lines that mislead the user or drown the job's own, kept off the job's console.

Filters matching these lines only, never log levels, so every other Ray message still
shows. Ray Train's per-report lines are filtered on console handlers only: Ray's log
files in the session directory keep them. Ray Data's no-free-CPU warning is filtered at
its logger, and only when it proves false.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: Ray Data warns, as a dataset starts executing, when the driver sees no free CPU ("The
#: Dataset job will hang unless more CPUs are freed up"). Right after the Parquet sampling
#: tasks of ``read_parquet`` end, the driver's view of free CPUs still counts them as busy,
#: so every job printed that warning although nothing was starved.
RAY_DATA_NO_FREE_CPU = "Warning: The Ray cluster currently does not have any available CPUs"
#: Ray Data's logger of that warning.
RAY_DATA_LOGGER = "ray.data.dataset"
#: Ray Train's two lines per ``ray.train.report`` (the checkpoint's path; the whole report),
#: each longer than the job's own line per epoch, which says what they say.
RAY_TRAIN_PER_REPORT = ("Checkpoint successfully created at", "Reporting training result")


class DropByPrefix(logging.Filter):
    """Drop the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class DropUnlessStillStarved(logging.Filter):
    """Let Ray Data's no-free-CPU warning through only if no CPU frees up within ``wait_s``.

    A true starvation (CPUs held by another job's actors) still warns; the stale view
    that follows the sampling tasks frees up within a fraction of a second. Ray logs the
    warning once per process, so the wait is paid at most once.
    """

    def __init__(self, free_cpus: Callable[[], float], wait_s: float = 2.0, poll_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        self.free_cpus, self.wait_s, self.poll_s, self.clock, self.sleep = free_cpus, wait_s, poll_s, clock, sleep

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(RAY_DATA_NO_FREE_CPU):
            return True
        deadline = self.clock() + self.wait_s
        while True:
            if self.free_cpus() > 0:
                return False
            if self.clock() >= deadline:
                return True
            self.sleep(self.poll_s)


def _ray_free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def add_once(target: logging.Logger | logging.Handler, new: logging.Filter) -> None:
    """Add ``new`` to ``target`` unless an equal filter is there already (idempotent)."""
    if not any(type(f) is type(new) and vars(f) == vars(new) for f in target.filters):
        target.addFilter(new)


def quiet_ray_data_on_driver() -> None:
    """On the driver: keep Ray Data's stale no-free-CPU warning off the console."""
    add_once(logging.getLogger(RAY_DATA_LOGGER), DropUnlessStillStarved(_ray_free_cpus))


def console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """``logger``'s handlers that write to a stream other than a file."""
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def drop_from_consoles(loggers: tuple[logging.Logger, ...], prefixes: tuple[str, ...]) -> None:
    """Keep records starting with ``prefixes`` off the console handlers of ``loggers``."""
    for logger in loggers:
        for handler in console_handlers(logger):
            add_once(handler, DropByPrefix(prefixes))


def quiet_ray_train_in_worker() -> None:
    """Inside a Ray Train worker: keep Ray Train's per-report lines off the console.

    They reach it through the ``ray.train`` logger's console handler and (one is logged
    under its file name, outside ``ray.train``) the root logger's; Ray Train's log files
    keep both.
    """
    drop_from_consoles((logging.getLogger("ray.train"), logging.getLogger()), RAY_TRAIN_PER_REPORT)
