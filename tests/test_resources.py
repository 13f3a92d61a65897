"""Resource sizing: never starve Ray Data's tasks, use what a big cluster offers."""

import pytest

from rayprune.config import ConfigError, RaySection
from rayprune.stages.resources import ResourcePlan, plan_from_resources, wait_for_resources


def actor_cpus(plan: ResourcePlan) -> float:
    return plan.embed_actors * plan.embed_cpus_per_actor + plan.extrapolate_actors * plan.extrapolate_cpus_per_actor


@pytest.mark.parametrize("cpus, node_cpus", [(2, 2), (4, 4), (5, 2), (16, 16), (64, 16), (256, 32)])
def test_actor_pools_leave_a_whole_cpu_for_read_and_write_tasks(cpus, node_cpus):
    plan = plan_from_resources(RaySection(), cpus, 0, node_cpus)
    assert cpus - actor_cpus(plan) >= 1.0
    assert plan.embed_actors >= 1 and plan.extrapolate_actors >= 1
    assert plan.train_cpus_per_worker <= node_cpus  # a worker fits on one node


def test_two_cpu_laptop_plan():
    plan = plan_from_resources(RaySection(), 2, 0, 2)
    assert (plan.train_workers, plan.train_cpus_per_worker, plan.train_use_gpu) == (1, 2.0, False)
    assert (plan.embed_actors, plan.extrapolate_actors) == (1, 1)
    assert plan.embed_cpus_per_actor + plan.extrapolate_cpus_per_actor <= 1.0


def test_big_cluster_scales_out_and_uses_gpus():
    plan = plan_from_resources(RaySection(), 64, 8, 16)
    assert plan.train_workers == 8 and plan.train_use_gpu
    assert plan.embed_actors == 8 and plan.embed_gpus_per_actor == 1.0
    cpu_only = plan_from_resources(RaySection(use_gpu="false"), 64, 8, 16)
    assert cpu_only.embed_actors == 40 and not cpu_only.train_use_gpu  # 2/3 of 60 CPUs


@pytest.mark.parametrize("cpus, node_cpus", [(2, 2), (4, 4), (5, 2), (16, 16), (64, 16), (256, 32)])
def test_embedding_threads_fill_the_cpus_but_never_oversubscribe_them(cpus, node_cpus):
    plan = plan_from_resources(RaySection(), cpus, 0, node_cpus)
    assert plan.embed_threads * plan.embed_actors <= cpus
    assert plan.embed_threads <= node_cpus
    # no whole CPU is left without an embedding thread (the IO reserve included)
    assert cpus - plan.embed_threads * plan.embed_actors < plan.embed_actors
    assert plan.extrapolate_threads == ResourcePlan.threads(plan.extrapolate_cpus_per_actor)


def test_embedding_threads_on_a_laptop_a_gpu_cluster_and_when_set():
    laptop = plan_from_resources(RaySection(), 2, 0, 2)
    assert (laptop.embed_threads, laptop.extrapolate_threads) == (2, 1)  # not 1: the IO reserve is mostly idle
    assert plan_from_resources(RaySection(), 64, 8, 16).embed_threads == 1  # the GPU does the work
    assert plan_from_resources(RaySection(embed_actors=1), 64, 0, 16).embed_threads == 16  # one node's worth
    assert plan_from_resources(RaySection(embed_threads=3), 2, 0, 2).embed_threads == 3
    with pytest.raises(ConfigError, match=r"ray.embed_threads must be an integer in \[0, 4096\]"):
        RaySection(embed_threads=-1)


def test_explicit_settings_win_and_errors_are_clear():
    plan = plan_from_resources(RaySection(train_workers=3, embed_actors=5, extrapolate_actors=2), 32, 0, 8)
    assert (plan.train_workers, plan.embed_actors, plan.extrapolate_actors) == (3, 5, 2)
    with pytest.raises(RuntimeError, match="use_gpu=true but the cluster has no GPU"):
        plan_from_resources(RaySection(use_gpu="true"), 8, 0, 8)
    with pytest.raises(RuntimeError, match="no CPUs"):
        plan_from_resources(RaySection(), 0, 0, 0)


class FakeClock:
    """A clock that advances only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_returns_once_the_autoscaler_has_added_enough():
    clock = FakeClock()
    # The cluster grows by 4 CPUs and 1 GPU every 10 s of (fake) time.
    grow = lambda: {"CPU": 4.0 * (clock.now // 10), "GPU": 1.0 * (clock.now // 10)}  # noqa: E731
    res = wait_for_resources(grow, cpus=8, gpus=2, timeout_s=60, poll_s=5, clock=clock, sleep=clock.sleep)
    assert res == {"CPU": 8.0, "GPU": 2.0} and clock.now == 20.0


def test_wait_times_out_naming_what_is_missing():
    clock = FakeClock()
    with pytest.raises(RuntimeError, match=r"1 CPU\(s\) and 0 GPU\(s\) after waiting 30 s .*request_gpus=1"):
        wait_for_resources(lambda: {"CPU": 1.0}, cpus=1, gpus=1, timeout_s=30, poll_s=7, clock=clock,
                           sleep=clock.sleep)
    assert clock.now == 30.0  # the last sleep is cut to the deadline


def test_resource_request_options_are_checked():
    with pytest.raises(ConfigError, match=r"ray.request_gpus must be an integer in \[0, 1000000\]"):
        RaySection(request_gpus=-1)
    with pytest.raises(ConfigError, match="ray.resource_wait_s"):
        RaySection(resource_wait_s=-5)


def test_evaluators_use_every_cpu_and_at_most_one_gpu_each():
    from rayprune.stages.evaluate import evaluator_layout

    laptop = plan_from_resources(RaySection(), 2, 0, 2)
    assert evaluator_layout(laptop, 500) == (2, 1.0)  # no IO reserve: nothing else runs beside them
    assert evaluator_layout(laptop, 100) == (1, 2.0)  # a small test set stays on one actor
    assert evaluator_layout(laptop, 500, actors=4) == (4, 0.5)
    gpus = plan_from_resources(RaySection(), 64, 8, 16)
    n, cpus = evaluator_layout(gpus, 10_000)
    assert n == 8 and cpus * n <= 64  # one per GPU, never an actor left waiting for one
    with pytest.raises(ConfigError, match="evaluation.actors=9 exceeds the cluster's 8 GPU"):
        evaluator_layout(gpus, 10_000, actors=9)


def test_parquet_is_read_with_the_v1_reader_unless_the_environment_picks_one(monkeypatch):
    import ray.data

    from rayprune.stages.resources import PARQUET_READER_ENV, configure_ray_data

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    try:
        monkeypatch.delenv(PARQUET_READER_ENV, raising=False)
        ctx.use_datasource_v2 = True
        configure_ray_data()
        assert ctx.use_datasource_v2 is False
        monkeypatch.setenv(PARQUET_READER_ENV, "1")  # the user's choice (Ray read it into the default) stands
        ctx.use_datasource_v2 = True
        configure_ray_data()
        assert ctx.use_datasource_v2 is True
    finally:
        ctx.use_datasource_v2 = before
