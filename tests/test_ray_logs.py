"""Ray's misleading and per-report log lines stay off the console; everything else, and Ray's log files, keep them."""

import io
import logging

import pytest

from rayprune.ray_logs import (
    RAY_DATA_NO_FREE_CPU,
    RAY_TRAIN_PER_REPORT,
    DropUnlessStillStarved,
    drop_from_consoles,
)


class FakeClock:
    """A clock that advances only when slept on, so waits are counted, not waited."""

    def __init__(self):
        self.now, self.sleeps = 0.0, 0

    def sleep(self, seconds):
        self.now += seconds
        self.sleeps += 1


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("ray.data.dataset", logging.WARNING, __file__, 1, message, None, None)


STALE = RAY_DATA_NO_FREE_CPU + ". The Dataset job will hang unless more CPUs are freed up."


def test_the_no_free_cpu_warning_is_dropped_once_a_cpu_frees_up():
    clock, views = FakeClock(), iter([0.0, 0.0, 0.0, 1.0])
    keep = DropUnlessStillStarved(lambda: next(views), wait_s=2.0, poll_s=0.1, clock=lambda: clock.now,
                                  sleep=clock.sleep)
    assert keep.filter(record(STALE)) is False
    assert clock.sleeps == 3  # three stale views (0 CPUs), then one free CPU


def test_a_true_starvation_still_warns_after_the_wait():
    clock, asked = FakeClock(), []
    keep = DropUnlessStillStarved(lambda: asked.append(1) or 0.0, wait_s=2.0, poll_s=0.5, clock=lambda: clock.now,
                                  sleep=clock.sleep)
    assert keep.filter(record(STALE)) is True
    assert clock.now == pytest.approx(2.0) and len(asked) == 5  # at 0, 0.5, 1, 1.5 and 2 s


def test_other_ray_data_warnings_pass_without_asking_ray():
    def never():
        raise AssertionError("asked for free CPUs on an unrelated message")

    keep = DropUnlessStillStarved(never)
    assert keep.filter(record("Warning: something else entirely")) is True


def test_per_report_lines_leave_the_console_but_not_the_file(tmp_path):
    train, root = logging.getLogger("test-ray-logs.ray.train"), logging.getLogger("test-ray-logs.root")
    console, app_console, log_file = io.StringIO(), io.StringIO(), tmp_path / "train.log"
    file_handler = logging.FileHandler(log_file)
    train.addHandler(logging.StreamHandler(console))
    train.addHandler(file_handler)
    root.addHandler(logging.StreamHandler(app_console))
    for logger in (train, root):
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        drop_from_consoles((train, root), RAY_TRAIN_PER_REPORT)
        drop_from_consoles((train, root), RAY_TRAIN_PER_REPORT)  # a second worker set-up adds nothing
        assert [len(h.filters) for h in train.handlers + root.handlers] == [1, 0, 1]
        train.info("Checkpoint successfully created at: Checkpoint(path=/x/checkpoint_1)")
        root.info("Reporting training result 3: TrainingReport(metrics={'loss': 0.5})")
        train.info("Started training worker group of size 1")
        root.info("final epoch 3/15: loss 0.476")
        file_handler.flush()
        assert console.getvalue() == "Started training worker group of size 1\n"
        assert app_console.getvalue() == "final epoch 3/15: loss 0.476\n"
        assert log_file.read_text().splitlines() == [
            "Checkpoint successfully created at: Checkpoint(path=/x/checkpoint_1)",
            "Started training worker group of size 1"]
    finally:
        for logger in (train, root):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()
