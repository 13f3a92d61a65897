"""Random bad values for every option: each is refused before Ray or MLflow start, in
one line (``rayprune: error: ...``) with exit status 2, naming the option or the value.

Bad numbers come from each option's declared range (below, above, NaN, infinities,
non-integers for integers) and from text that is not a number; names from text outside
the option's choices; paths from what exists on disk but is not what the option needs.
"""

import contextlib
import io
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayprune import cli
from rayprune.choices import EVAL_ATTACKS
from rayprune.config import JobConfig, flat_fields, option_choices, option_ranges

OPTIONS = flat_fields(JobConfig)
RANGES = option_ranges()
CHOICES = option_choices()
BOOL_WORDS = {"true", "1", "yes", "on", "false", "0", "no", "off"}
# Options no value of which can be refused before connecting: any URI may name a tracking
# server (an unreachable one makes the job warn and go on, or stop under tracking.strict).
NOT_CHECKABLE_UP_FRONT = {"tracking.uri"}


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _is_number(text: str) -> bool:
    return _as_float(text) is not None or "/" in text


not_a_number = st.text(min_size=1, max_size=12).filter(lambda t: not _is_number(t) and t.strip() == t and t)


def _below(bound: float, integer: bool):
    if integer:
        return st.integers(min_value=-(2**70), max_value=math.ceil(bound) - 1).map(str)
    return st.floats(max_value=bound, exclude_max=True, allow_nan=False, allow_infinity=False).map(repr)


def _above(bound: float, integer: bool):
    if integer:
        return st.integers(min_value=math.floor(bound) + 1, max_value=2**70).map(str)
    return st.floats(min_value=bound, exclude_min=True, allow_nan=False, allow_infinity=False).map(repr)


def _bad_numbers(key: str, integer: bool):
    r = RANGES[key]
    specials = {v for v, _ in r.special}
    parts = [st.sampled_from(["nan", "inf", "-inf", "1/0"]), not_a_number]
    for low in (r.ge, r.gt):
        if low is not None:
            parts.append(_below(low, integer) if low == r.ge else _below(low, integer) | st.just(str(low)))
    for high in (r.le, r.lt):
        if high is not None:
            parts.append(_above(high, integer) if high == r.le else _above(high, integer) | st.just(str(high)))
    if integer:
        parts.append(st.sampled_from(["2.5", "1e30", "true"]))
    return st.one_of(parts).filter(lambda v: _as_float(v) not in specials)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Things on disk that are wrong for a path option."""
    root = tmp_path_factory.mktemp("places")
    (root / "someones_dir").mkdir()
    (root / "someones_dir" / "data.csv").write_text("1,2\n")
    (root / "a_file.txt").write_text("not a pool")
    (root / "empty_dir").mkdir()
    os.mkfifo(root / "a_fifo")
    return root


def bad_values(key: str, places: Path):
    typ, _ = OPTIONS[key]
    if key in RANGES:
        return _bad_numbers(key, typ is int)
    if key in CHOICES:
        return st.text(min_size=0, max_size=12).filter(lambda t: t not in CHOICES[key])
    if typ is bool:
        return st.text(max_size=8).filter(lambda t: t.lower() not in BOOL_WORDS)
    if key == "evaluation.attacks":
        return st.lists(st.text(min_size=1, max_size=8).filter(lambda t: "," not in t and t.strip() == t),
                        min_size=1, max_size=3).filter(lambda xs: not set(xs) <= set(EVAL_ATTACKS)).map(",".join)
    if key == "pool.prunable_sources":  # the demo pool has real and synthetic rows only
        return st.sampled_from(["", "generated", "synthetic,diffusion", ","])
    paths = {
        "output_dir": ["", "  ", str(places / "someones_dir"), str(places / "a_file.txt")],
        "pool.path": ["  ", str(places / "missing"), str(places / "empty_dir"), str(places / "a_fifo"),
                      str(places / "a_file.txt"), "nosuchscheme://bucket/pool"],
        "evaluation.test_pool": [str(places / "missing"), str(places / "empty_dir"), str(places / "a_fifo")],
        "publish_uri": [str(places / "someones_dir"), "nosuchscheme://bucket/run"],
        "ray.storage_path": ["nosuchscheme://bucket/ckpt"],
        "ray.address": ["127.0.0.1:1", "no-such-host.invalid:6379", "justtext", "host:99999"],
        "tracking.experiment": ["", "   "],
        "tracking.registered_model": ["", "\t"],
    }
    return st.sampled_from(paths[key])


def run_job(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    return exit_.value.code, err.getvalue()


def test_every_option_has_bad_values_to_try(places):
    for key in OPTIONS:
        if key not in NOT_CHECKABLE_UP_FRONT:
            assert bad_values(key, places) is not None, key
    numeric = {k for k, (typ, _) in OPTIONS.items() if typ in (int, float)}
    assert numeric <= set(RANGES), f"numeric options without a declared range: {sorted(numeric - set(RANGES))}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bad_values_are_refused_in_one_line_before_any_work(data, places, tmp_path, no_ray_no_mlflow):
    key = data.draw(st.sampled_from(sorted(set(OPTIONS) - NOT_CHECKABLE_UP_FRONT)), label="option")
    value = data.draw(bad_values(key, places), label="value")
    argv = [f"--{key}={value}", "--log-level", "ERROR"]
    if key != "output_dir":
        argv.append(f"--output-dir={tmp_path / 'out'}")
    before = sorted(p.name for p in places.iterdir())
    code, err = run_job(argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("rayprune: error: "), err
    assert key in err or (value.strip() and value.strip() in err), err
    assert sorted(p.name for p in places.iterdir()) == before
    assert not (places / "someones_dir" / "_RAYPRUNE_RUN.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--split.seed", "-1"], "split.seed must be an integer in [0, 4294967295]; got -1"),
    (["--train.lr", "inf"], "train.lr must be a finite number > 0; got inf"),
    (["--train.momentum", "nan"], "train.momentum must be a number in [0, 1); got nan"),
    (["--train.weight_decay", "-1"], "train.weight_decay must be a finite number >= 0; got -1.0"),
    (["--train.label_smoothing", "5"], "train.label_smoothing must be a number in [0, 1); got 5.0"),
    (["--attack.eps", "inf"], "attack.eps must be a finite number >= 0; got inf"),
    (["--train.epochs", "1e30"], "train.epochs must be an integer in [1, 100000]"),
    (["--final.train.lr", "-0.1"], "final.train.lr must be a finite number > 0"),
    (["--attack.eps", "1/0"], "attack.eps must be a number; got '1/0'"),
    (["--pool.demo.num_classes", "3", "--pool.demo.image_size", "8", "--evaluation.attacks", "clean,apgd_t",
      "--pool.demo.num_classes", "2"], "apgd_t, whose targeted DLR loss needs at least 3 classes"),
    (["--attack.norm", "l2", "--attack.eps", "100"], "must be <= 27.71 for the l2 norm"),
])
def test_the_reported_bad_values_name_option_value_and_range(argv, message, tmp_path, no_ray_no_mlflow):
    code, err = run_job([*argv, f"--output-dir={tmp_path / 'out'}"])
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_config_files_that_never_end_or_are_not_files(tmp_path, no_ray_no_mlflow):
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    for path, message in [(tmp_path / "fifo.yaml", "is not a regular file"), ("/dev/zero", "is not a regular file"),
                          (tmp_path, "is not a regular file"), (tmp_path / "big.yaml", "larger than 1024 KiB"),
                          (tmp_path / "binary.yaml", "is not UTF-8 text"), ("", "needs a file path")]:
        code, err = run_job(["--config", str(path), f"--output-dir={tmp_path / 'out'}"])
        assert code == 2 and err.count("\n") == 1 and message in err, (path, err)


def test_the_largest_seed_is_accepted_by_everything_that_consumes_seeds():
    """[0, 2**32-1] is what the code downstream accepts, with the arithmetic it applies."""
    import numpy as np
    import torch

    from rayprune.bounds import SEED_MAX
    from rayprune.data.demo_pool import DemoPoolSpec, generate_rows
    from rayprune.robust.loop import BatchStream
    from rayprune.scoring import draw_subset
    from rayprune.scoring.quality import split_probe

    seed, rank, epoch = SEED_MAX, 63, 100_000
    torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + epoch)  # the training attacks' generators
    torch.manual_seed(seed)
    BatchStream(10, 4, seed=seed * 1000 + rank).next()  # the batch order
    draw_subset(100, 0.2, seed, eligible=np.ones(100, bool))
    split_probe(100, 0.1, seed)
    np.random.default_rng([seed + 1, 0])  # selection's random baseline, split seeds + rank
    generate_rows(DemoPoolSpec(n_real=4, n_synthetic=4, image_size=8, num_classes=2, seed=seed))
