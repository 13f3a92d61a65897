"""The final training's streamed data path: batch sources, the stream's filter and decoding,
the memory/stream choice, and (slow) a real Ray Train run reading its shard from Ray Data."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from rayprune.config import ConfigError, load_config
from rayprune.data.pool import encode_images
from rayprune.robust.loop import BatchStream, ConcatBatches, IndexedBatches, StreamedBatches, mix_counts
from rayprune.stages.final import MEMORY_BYTES_PER_VALUE, choose_data_loading, plan_data_loading
from rayprune.stages.stream import KeepRows, PacedSchedulingLoop, stream_passes

SHAPE = (4, 4, 3)


def _rows(ids, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(ids), *SHAPE), dtype=np.uint8)
    return images, (np.asarray(ids) % 3).astype(np.int64)


def _passes_of(batches_per_pass: list[list[np.ndarray]]):
    """``passes(k)`` over fixed id batches: images and labels derived from the ids."""
    def passes(k):
        for ids in batches_per_pass[k % len(batches_per_pass)]:
            images, labels = _rows(ids)
            images[:, 0, 0, 0] = ids  # the id is readable back from the float image
            yield images, labels
    return passes


def test_a_streamed_source_runs_pass_after_pass_and_converts_like_in_memory_batches():
    seen = []
    source = StreamedBatches(_passes_of([[np.array([0, 1]), np.array([2, 3])], [np.array([4, 5])]]), "cpu")
    for _ in range(5):
        x, y = source.next()
        assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4) and y.dtype == torch.int64
        seen.append(tuple(int(round(v)) for v in (x[:, 0, 0, 0] * 255).tolist()))
        np.testing.assert_array_equal(y.numpy(), np.array(seen[-1]) % 3)
    assert seen == [(0, 1), (2, 3), (4, 5), (0, 1), (2, 3)]  # pass 0, pass 1, pass 2 (= pass 0 again)
    assert source.pass_index == 2
    # The same uint8 rows held in memory give the same float batch.
    images, _ = _rows([0, 1])
    images[:, 0, 0, 0] = [0, 1]
    mem = IndexedBatches(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.zeros(2, dtype=torch.int64),
                         BatchStream(2, 2, seed=0))
    x_mem, _ = mem.next()
    order = np.argsort((x_mem[:, 0, 0, 0] * 255).round().numpy())
    again = StreamedBatches(_passes_of([[np.array([0, 1])]]), "cpu").next()[0]
    torch.testing.assert_close(x_mem[order], again, rtol=0, atol=0)


def test_a_stream_that_starts_at_a_later_pass_and_an_empty_pass_is_an_error():
    source = StreamedBatches(_passes_of([[np.array([0])], [np.array([7])]]), "cpu", pass_index=1)
    assert round(float(source.next()[0][0, 0, 0, 0]) * 255) == 7
    empty = StreamedBatches(lambda k: iter(()), "cpu")
    with pytest.raises(RuntimeError, match="pass 0 of the training stream gave no batch"):
        empty.next()


def test_a_streamed_source_counts_the_time_it_waits_for_the_stream_and_not_the_conversion():
    now = [0.0]

    def passes(k):
        now[0] += 5.0  # starting a pass
        for ids in ([0, 1], [2, 3]):
            now[0] += 1.0  # waiting for a batch
            images, labels = _rows(ids)
            yield images, labels

    def clock():
        return now[0]

    source = StreamedBatches(passes, "cpu", clock=clock)
    source.next()
    assert source.wait_seconds == 6.0  # the pass's start and its first batch
    source.next()
    assert source.wait_seconds == 7.0
    source.wait_seconds = 0.0  # as the training loop resets it every epoch
    source.next()  # the pass ends (nothing more to wait for), the next starts and gives a batch
    assert source.wait_seconds == 6.0 and source.pass_index == 1
    # Converting to float is the trainer's time, not the stream's: a clock that only the
    # stream advances sees none of it.
    assert source.next()[0].dtype == torch.float32 and source.wait_seconds == 7.0


def test_concatenated_sources_give_fixed_counts_from_each():
    streamed = StreamedBatches(_passes_of([[np.array([10, 11, 12])]]), "cpu")
    images = torch.rand(5, 3, 4, 4)
    labels = torch.arange(5)
    memory = IndexedBatches(images, labels, BatchStream(5, 2, seed=1))
    both = ConcatBatches([streamed, memory])
    x, y = both.next()
    assert x.shape == (5, 3, 4, 4) and y.shape == (5,)
    np.testing.assert_array_equal(y[:3].numpy(), np.array([10, 11, 12]) % 3)
    for row, label in zip(x[3:], y[3:]):  # the in-memory rows are rows of ``images``, labelled as stored
        torch.testing.assert_close(row, images[int(label)])


def test_keep_rows_matches_a_numpy_filter():
    rng = np.random.default_rng(3)
    ids = rng.permutation(200).astype(np.int64)
    sources = rng.choice(["real", "synthetic", "other"], size=200)
    table = pa.table({"id": ids, "source": sources.tolist(), "label": ids % 3})
    exclude = np.array([ids[0], ids[5], 999])
    for keep_sources in (["synthetic"], ["synthetic", "other"], None):
        got = KeepRows(keep_sources, exclude)(table)
        want = ~np.isin(ids, exclude)
        if keep_sources is not None:
            want &= np.isin(sources, keep_sources)
        np.testing.assert_array_equal(got["id"].to_numpy(), ids[want])


class FakeShard:
    """What ``get_dataset_shard`` returns, as far as ``stream_passes`` uses it."""

    def __init__(self, table: pa.Table) -> None:
        self.table, self.calls = table, []

    def iter_batches(self, *, batch_size, batch_format, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
        self.calls.append((batch_size, local_shuffle_buffer_size, local_shuffle_seed))
        assert batch_format == "pyarrow" and drop_last
        for start in range(0, len(self.table) - batch_size + 1, batch_size):
            yield self.table.slice(start, batch_size)


def test_stream_passes_decode_the_stored_bytes_and_seed_each_pass():
    ids = np.arange(7, dtype=np.int64)
    images, labels = _rows(ids, seed=4)
    shard = FakeShard(pa.table({"id": ids, "image": encode_images(images), "label": labels}))
    got = list(stream_passes(shard, 3, SHAPE, shuffle_buffer=2, seed=5, pass_index=0))
    assert len(got) == 2  # 7 rows, batches of 3, the last partial one dropped
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), images[:6])
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), labels[:6])
    list(stream_passes(shard, 3, SHAPE, shuffle_buffer=2, seed=5, pass_index=1))
    list(stream_passes(shard, 3, SHAPE, shuffle_buffer=0, seed=5, pass_index=2))
    (b0, buf0, s0), (_, buf1, s1), (_, buf2, s2) = shard.calls
    assert b0 == 3 and buf0 == 3  # a buffer never smaller than a batch
    assert s0 != s1  # every pass shuffles differently
    assert buf2 is None and s2 is None  # no buffer: no local shuffle


def test_memory_or_stream_by_the_shard_size():
    per_row_mib = int(np.prod((32, 32, 3))) * MEMORY_BYTES_PER_VALUE / 2**20
    rows_at_limit = int(1024 / per_row_mib)  # rows whose in-memory copy needs 1024 MiB
    assert choose_data_loading("auto", rows_at_limit, (32, 32, 3), 1024)[0] == "memory"
    loading, why = choose_data_loading("auto", rows_at_limit + 100, (32, 32, 3), 1024)
    assert loading == "stream" and "final.memory_limit_mib=1024" in why and str(rows_at_limit + 100) in why
    assert choose_data_loading("stream", 10, (32, 32, 3), 1024)[0] == "stream"
    assert choose_data_loading("memory", 10**8, (32, 32, 3), 1024)[0] == "memory"
    # 1M CIFAR-size rows on one worker need about 14.6 GiB in memory: streamed by default.
    assert choose_data_loading("auto", 1_000_000, (32, 32, 3), 2048)[0] == "stream"


def _final(**overrides):
    return load_config(None, {f"final.{k}": v for k, v in overrides.items()}).final


def test_the_stream_takes_the_same_per_worker_counts_as_the_in_memory_mix():
    fc = _final(data_loading="stream", synthetic_fraction=0.8, **{"train.batch_size": 64})
    loading, why, stream = plan_data_loading(fc, 1000, 800, 200, 2, (8, 8, 3), mixed=True)
    assert loading == "stream" and why.startswith("set by final.data_loading")
    assert stream.rows == 800 and stream.counts == tuple(mix_counts(32, 0.8, 800, 200))
    # Unmixed (no real part, or final.synthetic_fraction=-1): whole batches from the stream.
    assert plan_data_loading(fc, 1000, 1000, 0, 2, (8, 8, 3), mixed=False)[2].counts == (32, 0)


def test_a_stream_too_small_for_a_batch_per_worker_is_refused_or_falls_back_to_memory():
    forced = _final(data_loading="stream", **{"train.batch_size": 128})
    with pytest.raises(ConfigError, match=r"final.data_loading=stream: the stream holds 90 rows, fewer than one "
                                          r"batch of 51 per worker for 2 worker\(s\)"):
        plan_data_loading(forced, 140, 90, 50, 2, (8, 8, 3), mixed=True)
    auto = _final(data_loading="auto", memory_limit_mib=0, **{"train.batch_size": 128})
    loading, why, stream = plan_data_loading(auto, 140, 90, 50, 2, (8, 8, 3), mixed=True)
    assert (loading, stream) == ("memory", None) and "fewer than one batch per worker" in why
    nothing = _final(data_loading="stream", synthetic_fraction=0.0)
    assert plan_data_loading(nothing, 200, 150, 50, 1, (8, 8, 3), mixed=True)[:1] == ("memory",)


class _FakeClock:
    """A monotonic clock that moves only when told to or when slept on."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class _Executor:
    """What the pacer asks of Ray Data's executor: whether its consumer is waiting for data."""

    def __init__(self, idle: bool) -> None:
        self.idle = idle

    def _consumer_idling(self) -> bool:
        return self.idle


def test_the_paced_scheduling_loop_sleeps_off_the_rest_of_each_short_step_while_the_consumer_is_served():
    clock = _FakeClock()
    pacer = PacedSchedulingLoop(interval=0.05, clock=clock, sleep=clock.sleep)
    starts = []
    for step_seconds in [0.0, 0.01, 0.2, 0.0, 0.049, 0.0]:  # how long each step's own work takes
        pacer.on_execution_step(_Executor(idle=False))
        starts.append(clock.now)
        clock.now += step_seconds
    # The first step is not delayed; after that a step starts at least one interval after
    # the one before it, and a step that took longer than the interval is not delayed.
    assert clock.slept == pytest.approx([0.05, 0.04, 0.05, 0.001])
    assert np.diff(starts) == pytest.approx([0.05, 0.05, 0.2, 0.05, 0.05])


def test_the_paced_scheduling_loop_never_delays_a_waiting_consumer_and_paces_an_unknown_executor():
    clock = _FakeClock()
    pacer = PacedSchedulingLoop(interval=0.05, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        pacer.on_execution_step(_Executor(idle=True))
        clock.now += 0.001
    assert clock.slept == []
    pacer.on_execution_step(object())  # an executor without the test: paced
    assert clock.slept == pytest.approx([0.049])
