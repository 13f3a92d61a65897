"""Shared test settings: Ray without token auth on loopback, and the tiny job config."""

import os

import pytest

# Tests start and stop many short-lived local clusters; the product keeps auth on.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

#: A job small enough for a 2-CPU CI machine: 600 rows of 8x8 images, 4 short epochs.
TINY_JOB = {
    "pool.demo.n_real": 150,
    "pool.demo.n_synthetic": 450,
    "pool.demo.image_size": 8,
    "pool.demo.num_classes": 3,
    "model.width": 8,
    "train.epochs": 4,
    "train.steps_per_epoch": 3,
    "train.batch_size": 32,
    "attack.steps": 1,
    "scoring.window": 2,
    "split.subset_fraction": 0.2,
    "selection.keep_fraction": 0.4,
    "extrapolation.k": 5,
    "ray.inference_batch_size": 128,
}


def tiny_job_flags() -> list[str]:
    """TINY_JOB as command-line flags."""
    return [arg for key, value in TINY_JOB.items() for arg in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and threads slow badly when cores are busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
