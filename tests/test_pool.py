"""The pool format: writer validation, atomic output, and reading back."""

import json
import os

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import one_line_error, tree_snapshot

from rayprune.data.demo_pool import DemoPoolSpec, generate_rows
from rayprune.data.pool import (
    PoolError,
    PoolWriter,
    decode_images,
    encode_images,
    pool_files,
    read_pool_info,
    write_demo_pool,
)


def images(n, shape=(4, 5, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_encode_decode_round_trip_is_row_major_hwc():
    x = images(7)
    column = encode_images(x)
    assert column[2].as_py() == bytes(x[2].reshape(-1))  # row-major H, W, C
    np.testing.assert_array_equal(decode_images(column, (4, 5, 3)), x)
    with pytest.raises(PoolError, match="row 0 of the batch: image has 60 bytes; expected 61"):
        decode_images(column, (61, 1, 1))


def test_writer_splits_files_and_records_metadata(tmp_path):
    out = tmp_path / "pool"
    x = images(25)
    with PoolWriter(out, image_shape=(4, 5, 3), num_classes=4, rows_per_file=10) as w:
        w.add(np.arange(15), x[:15], np.arange(15) % 4, "real")
        w.add(np.arange(15, 25), x[15:], np.arange(10) % 4, ["synthetic"] * 10)
    info = read_pool_info(out)
    assert (info.num_rows, info.image_shape, info.num_classes) == (25, (4, 5, 3), 4)
    assert info.sources == {"real": 15, "synthetic": 10} and len(info.files) == 3
    table = pads.dataset(pool_files(out), format="parquet").to_table().sort_by("id")
    np.testing.assert_array_equal(decode_images(table["image"], info.image_shape), x)
    assert json.loads((out / "pool.json").read_text())["image_shape"] == [4, 5, 3]


@pytest.mark.parametrize(
    "ids, imgs, labels, message",
    [
        (np.arange(3), images(3).astype(np.float32), np.zeros(3, int), r"src\.npz: images must be uint8; got float32"),
        (np.arange(3), images(3, (5, 4, 3)), np.zeros(3, int),
         r"images must have shape \(n, 4, 5, 3\); got \[5, 4, 3\]"),
        (np.arange(3), images(3), np.array([0, 4, 1]), r"src\.npz, row 11: label 4 is out of range \[0, 3\]"),
        (np.arange(3), images(3), np.array([0, -1, 1]), r"src\.npz, row 11: label -1 is out of range"),
        (np.array([1, 2, 1]), images(3), np.zeros(3, int), r"src\.npz, row 12: duplicate id 1"),
    ],
)
def test_writer_rejects_bad_batches_naming_origin_and_row(tmp_path, ids, imgs, labels, message):
    out = tmp_path / "pool"
    with pytest.raises(PoolError, match=message):
        with PoolWriter(out, image_shape=(4, 5, 3), num_classes=4) as w:
            w.add(ids, imgs, labels, "real", origin="src.npz", first_row=10)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing partial left


def test_duplicate_ids_across_batches_name_the_second_occurrence(tmp_path):
    out = tmp_path / "pool"
    with pytest.raises(PoolError, match=r"b\.npz, row 2: duplicate id 7 \(already in the pool\)"):
        with PoolWriter(out, image_shape=(4, 5, 3), num_classes=2, rows_per_file=2) as w:
            w.add(np.arange(5, 10), images(5), np.zeros(5, int), "real", origin="a.npz")
            w.add(np.array([20, 21, 7]), images(3), np.zeros(3, int), "real", origin="b.npz")
    assert not list(tmp_path.iterdir())


def test_empty_input_and_existing_output_are_errors(tmp_path):
    with pytest.raises(PoolError, match="the input is empty"):
        with PoolWriter(tmp_path / "empty", image_shape=(4, 5, 3), num_classes=2):
            pass
    (tmp_path / "taken").mkdir()
    with pytest.raises(PoolError, match="taken already exists"):
        PoolWriter(tmp_path / "taken", image_shape=(4, 5, 3), num_classes=2)


def test_read_pool_info_errors(tmp_path):
    with pytest.raises(PoolError, match="pool.json is missing"):
        read_pool_info(tmp_path)
    (tmp_path / "pool.json").write_text("{not json")
    with pytest.raises(PoolError, match="pool.json is unreadable"):
        read_pool_info(tmp_path)
    meta = {"num_rows": 3, "image_shape": [4, 5, 3], "num_classes": 2, "sources": {"real": 3},
            "files": ["../../etc/passwd"]}
    (tmp_path / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolError, match="plain names inside the pool"):
        read_pool_info(tmp_path)
    meta["files"] = ["part-00000.parquet"]
    (tmp_path / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolError, match="missing file"):
        pool_files(tmp_path)
    meta["num_rows"] = 0
    (tmp_path / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PoolError, match="the pool is empty"):
        read_pool_info(tmp_path)


def test_demo_pool_written_equals_generated_rows(tmp_path):
    spec = DemoPoolSpec(n_real=100, n_synthetic=1200, image_size=8, num_classes=3)
    info = write_demo_pool(spec, tmp_path / "demo", rows_per_file=500)
    assert info.sources == {"real": 100, "synthetic": 1200} and len(info.files) == 3
    table = pads.dataset(pool_files(tmp_path / "demo"), format="parquet").to_table().sort_by("id")
    rows = generate_rows(spec)
    np.testing.assert_array_equal(decode_images(table["image"], (8, 8, 3)), rows.images)
    np.testing.assert_array_equal(table["label"].to_numpy(), rows.labels)
    assert table["source"].to_pylist() == list(rows.sources)


def test_a_demo_pools_first_rows_are_the_whole_pools_first_rows(tmp_path):
    spec = DemoPoolSpec(n_real=100, n_synthetic=2900, image_size=8, num_classes=3)
    info = write_demo_pool(spec, tmp_path / "head", rows_per_file=400, first_rows=1100)
    assert info.num_rows == 1100 and info.sources == {"real": 100, "synthetic": 1000}
    head = pads.dataset(pool_files(tmp_path / "head"), format="parquet").to_table().sort_by("id")
    whole = generate_rows(spec)  # generated in one piece, not block by block as written
    np.testing.assert_array_equal(head["id"].to_numpy(), whole.ids[:1100])
    np.testing.assert_array_equal(decode_images(head["image"], (8, 8, 3)), whole.images[:1100])
    np.testing.assert_array_equal(head["label"].to_numpy(), whole.labels[:1100])
    for bad in (0, 3001):
        with pytest.raises(ValueError, match=r"first_rows must be in \[1, 3000\]"):
            write_demo_pool(spec, tmp_path / f"bad{bad}", first_rows=bad)


def test_open_pool_digest_tracks_content_facts(tmp_path):
    from rayprune.stages.prepare import open_pool

    spec = DemoPoolSpec(n_real=50, n_synthetic=150, image_size=8, num_classes=3)
    write_demo_pool(spec, tmp_path / "p", rows_per_file=100)
    first = open_pool(tmp_path / "p")
    assert first.info.num_rows == 200 and len(first.files) == 2
    assert open_pool(str(tmp_path / "p")).digest == first.digest  # stable
    write_demo_pool(DemoPoolSpec(n_real=50, n_synthetic=150, image_size=8, num_classes=3, seed=1), tmp_path / "p",
                    rows_per_file=100, overwrite=True)
    assert open_pool(tmp_path / "p").digest != first.digest  # other content, other digest
    with pytest.raises(PoolError, match="pool.json is missing"):
        open_pool(tmp_path)


# ----------------------------------------------------------------------------- pool.json fields


def write_meta(path, **changes):
    """A valid pool.json for a 3-class pool of 4x5x3 images in ``path``, with ``changes``
    (a value of ``...`` drops the field)."""
    meta = {"num_rows": 3, "image_shape": [4, 5, 3], "num_classes": 3, "sources": {"real": 3},
            "files": ["part-00000.parquet"], "format_version": 1, "class_names": []}
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not ...}
    path.mkdir(parents=True, exist_ok=True)
    (path / "pool.json").write_text(json.dumps(meta))
    return path / "pool.json"


def expect_refused(root, parts, fn, *args, **kwargs):
    """``fn`` raises one one-line PoolError naming every part, and ``root``'s tree is unchanged."""
    before = tree_snapshot(root)
    message = one_line_error(PoolError, parts, fn, *args, **kwargs)
    assert tree_snapshot(root) == before
    return message


@pytest.mark.parametrize(
    "changes, parts",
    [
        ({"num_classes": 0}, ["num_classes must be an integer >= 2", "got 0"]),
        ({"num_classes": 1}, ["num_classes must be an integer >= 2", "at least 2 classes", "got 1"]),
        ({"num_classes": -3}, ["num_classes must be an integer >= 2", "got -3"]),
        ({"num_classes": 2.5}, ["num_classes must be an integer", "got 2.5"]),
        ({"num_classes": True}, ["num_classes must be an integer", "got True"]),
        ({"num_classes": "3"}, ["num_classes must be an integer", "got '3'"]),
        ({"num_classes": ...}, ["num_classes must be an integer >= 2", "it is missing"]),
        ({"num_rows": -1}, ["num_rows must be an integer >= 1", "got -1"]),
        ({"num_rows": 3.0}, ["num_rows must be an integer >= 1", "got 3.0"]),
        ({"num_rows": ...}, ["num_rows", "it is missing"]),
        ({"image_shape": [4, 5]}, ["image_shape must be [H, W, C]", "got [4, 5]"]),
        ({"image_shape": [4, 0, 3]}, ["image_shape must be [H, W, C] with positive integer sizes", "got [4, 0, 3]"]),
        ({"image_shape": [4, 5, 7]}, ["image_shape must be [H, W, C] with C (channels) in 1..4", "got [4, 5, 7]"]),
        ({"image_shape": [4, 5, True]}, ["image_shape", "got [4, 5, True]"]),
        ({"image_shape": ...}, ["image_shape", "it is missing"]),
        ({"sources": {"real": 4, "synthetic": -1}}, ["sources must be", "integer >= 0", "'synthetic': -1"]),
        ({"sources": {"real": "3"}}, ["sources must be", "got {'real': '3'}"]),
        ({"sources": [3]}, ["sources must be", "got [3]"]),
        ({"sources": {"real": 2}}, ["rows per source", "must add up to num_rows (3)"]),
        ({"files": []}, ["files must be a non-empty list", "got []"]),
        ({"files": "part-00000.parquet"}, ["files must be a non-empty list"]),
        ({"files": [7]}, ["plain names inside the pool", "got 7"]),
        ({"files": ["/etc/passwd"]}, ["plain names inside the pool", "'/etc/passwd'"]),
        ({"files": ["a/../../b.parquet"]}, ["plain names inside the pool", "'a/../../b.parquet'"]),
        ({"files": ["..\\x.parquet"]}, ["plain names inside the pool"]),
        ({"files": ["pool.json"]}, ["plain names inside the pool", "'pool.json'"]),
        ({"files": ["a.parquet", "a.parquet"]}, ["lists the file a.parquet more than once"]),
        ({"class_names": ["cat"]}, ["class_names must be a list of 3 strings", "got ['cat']"]),
        ({"format_version": 2}, ["format_version 2 is not supported"]),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]!r}"[:40] for k in v) if isinstance(v, dict) else None,
)
def test_pool_json_fields_are_checked_up_front_and_named(tmp_path, changes, parts):
    meta = write_meta(tmp_path / "pool", **changes)
    message = expect_refused(tmp_path, [meta, *parts], read_pool_info, tmp_path / "pool")
    assert "out of range" not in message


def test_pool_json_that_is_not_an_object(tmp_path):
    (tmp_path / "pool.json").write_text("[1, 2]")
    expect_refused(tmp_path, [tmp_path / "pool.json", "must hold a JSON object", "got list"], read_pool_info, tmp_path)


def test_a_zero_class_pool_is_named_by_the_preflight_not_as_a_label_range(tmp_path):
    """The reported symptom: num_classes 0 came out as "label 0 out of range [0, -1]"."""
    from rayprune.data.pool_check import check_pool

    out = tmp_path / "pool"
    with PoolWriter(out, image_shape=(4, 5, 3), num_classes=3) as w:
        w.add(np.arange(3), images(3), np.array([0, 1, 2]), "real")
    meta = json.loads((out / "pool.json").read_text())
    (out / "pool.json").write_text(json.dumps({**meta, "num_classes": 0}))
    message = expect_refused(tmp_path, [out / "pool.json", "num_classes must be an integer >= 2", "got 0"],
                             check_pool, out)
    assert "out of range" not in message


@pytest.mark.parametrize("num_classes", [1, 0, True])
def test_writer_refuses_fewer_than_two_classes(tmp_path, num_classes):
    expect_refused(tmp_path, ["num_classes must be an integer >= 2", "at least 2 classes"], PoolWriter,
                   tmp_path / "pool", image_shape=(4, 5, 3), num_classes=num_classes)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- files that are not regular files


def small_pool(path):
    with PoolWriter(path, image_shape=(4, 5, 3), num_classes=3, rows_per_file=2) as w:
        w.add(np.arange(4), images(4), np.array([0, 1, 2, 0]), "real")
    return path


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "directory", "link-to-fifo"])
def test_a_pool_file_that_is_not_a_regular_file_is_named_not_opened(tmp_path, kind):
    from rayprune.data.pool_check import check_pool, find_unreadable_data

    pool = small_pool(tmp_path / "pool")
    part = pool / "part-00001.parquet"
    part.unlink()
    if kind == "fifo":
        os.mkfifo(part)
    elif kind == "directory":
        part.mkdir()
    else:
        os.mkfifo(tmp_path / "fifo")
        part.symlink_to(tmp_path / "fifo")
    what = "a directory" if kind == "directory" else "a FIFO"
    parts = [f"{part} is not a regular file ({what})", "must be regular Parquet files"]
    for fn in (pool_files, check_pool, find_unreadable_data):
        message = expect_refused(tmp_path, parts, fn, pool)
        assert "missing" not in message


def test_a_missing_pool_file_is_named_missing(tmp_path):
    pool = small_pool(tmp_path / "pool")
    (pool / "part-00001.parquet").unlink()
    expect_refused(tmp_path, [f"{pool / 'part-00001.parquet'} is missing", "1 missing file(s)"], pool_files, pool)
    (pool / "part-00001.parquet").symlink_to(tmp_path / "nowhere")  # a dangling link is missing too
    expect_refused(tmp_path, [f"{pool / 'part-00001.parquet'} is missing"], pool_files, pool)


@pytest.mark.timeout(30)
def test_a_pool_json_that_is_a_fifo_is_named_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pool.json")
    expect_refused(tmp_path, [f"{tmp_path / 'pool.json'} is not a regular file (a FIFO)"], read_pool_info, tmp_path)
    (tmp_path / "pool.json").unlink()
    (tmp_path / "pool.json").mkdir()
    expect_refused(tmp_path, [f"{tmp_path / 'pool.json'} is not a regular file (a directory)"], read_pool_info,
                   tmp_path)


# ----------------------------------------------------------------------------- the writer's temporary directory


def write_small(out, **kwargs):
    with PoolWriter(out, image_shape=(4, 5, 3), num_classes=3, rows_per_file=2, **kwargs) as w:
        w.add(np.arange(3), images(3), np.array([0, 1, 2]), "real")
    return read_pool_info(out)


def test_a_finished_pool_holds_only_pool_json_and_its_files(tmp_path):
    info = write_small(tmp_path / "a" / "pool")
    assert sorted(os.listdir(tmp_path / "a")) == ["pool"]  # no partial directory, no marker
    assert sorted(os.listdir(tmp_path / "a" / "pool")) == sorted(["pool.json", *info.files])


@pytest.mark.parametrize("what", ["user-dir", "file", "link-to-dir", "marker-is-a-link"])
def test_a_partial_directory_rayprune_did_not_make_is_never_removed(tmp_path, what):
    partial, theirs = tmp_path / ".pool.partial", tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    if what == "user-dir":
        partial.mkdir()
        (partial / "part-00000.parquet").write_text("not ours")
        (partial / ".hidden").write_text("x")
    elif what == "file":
        partial.write_text("a file")
    elif what == "link-to-dir":
        partial.symlink_to(theirs)
    else:
        partial.mkdir()
        (partial / ".rayprune-partial").symlink_to(theirs / "thesis.tex")
    for attempt in (lambda: write_small(tmp_path / "pool"), lambda: PoolWriter(tmp_path / "pool", image_shape=(4, 5, 3),
                                                                               num_classes=3)):
        expect_refused(tmp_path, [partial, "was not made by rayprune", "refusing to remove it"], attempt)
    assert not (tmp_path / "pool").exists()


def test_a_marked_partial_directory_holding_other_files_is_not_removed(tmp_path):
    partial = tmp_path / ".pool.partial"
    partial.mkdir()
    (partial / ".rayprune-partial").write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere"}))
    (partial / "part-00000.parquet").write_text("x")
    (partial / "notes.txt").write_text("mine")
    import socket

    for marker in ({"pid": 999_999_999, "host": socket.gethostname()}, {}):  # a dead writer; a cut-short marker
        (partial / ".rayprune-partial").write_text(json.dumps(marker))
        expect_refused(tmp_path, [partial, "holds 'notes.txt'", "rayprune did not write"], write_small,
                       tmp_path / "pool")


def test_a_partial_directory_of_a_running_writer_is_not_removed(tmp_path):
    import socket

    partial = tmp_path / ".pool.partial"
    partial.mkdir()
    (partial / ".rayprune-partial").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    (partial / "part-00000.parquet").write_text("being written")
    expect_refused(tmp_path, [partial, f"being written by rayprune (pid {os.getppid()}"], write_small,
                   tmp_path / "pool")
    (partial / ".rayprune-partial").write_text(json.dumps({"pid": 1, "host": "another-node"}))
    expect_refused(tmp_path, [partial, "being written by rayprune (pid 1 on another-node)"], write_small,
                   tmp_path / "pool")


def test_a_partial_directory_left_by_a_dead_writer_is_cleaned_up(tmp_path):
    import socket
    import subprocess

    done = subprocess.Popen(["true"])
    done.wait()  # its pid no longer runs
    partial = tmp_path / ".pool.partial"
    partial.mkdir()
    (partial / ".rayprune-partial").write_text(json.dumps({"pid": done.pid, "host": socket.gethostname()}))
    (partial / "part-00000.parquet").write_text("left by a killed run")
    info = write_small(tmp_path / "pool")
    assert sorted(os.listdir(tmp_path)) == ["pool"] and info.num_rows == 3


def test_a_failed_write_removes_only_what_it_wrote(tmp_path, caplog):
    out = tmp_path / "new" / "deeper" / "pool"
    with pytest.raises(PoolError, match="duplicate id 1"):
        with PoolWriter(out, image_shape=(4, 5, 3), num_classes=3, rows_per_file=1) as w:
            w.add(np.arange(3), images(3), np.array([0, 1, 2]), "real")
            w.add(np.array([1]), images(1), np.array([0]), "real")
    assert list(tmp_path.iterdir()) == []  # the parent directories it made are gone too
    with pytest.raises(RuntimeError):
        with PoolWriter(out, image_shape=(4, 5, 3), num_classes=3, rows_per_file=1) as w:
            w.add(np.arange(3), images(3), np.array([0, 1, 2]), "real")
            (out.parent / ".pool.partial" / "mine.txt").write_text("someone else's")  # dropped in meanwhile
            raise RuntimeError("interrupted")
    assert tree_snapshot(tmp_path) == {"new": "<dir>", "new/deeper": "<dir>", "new/deeper/.pool.partial": "<dir>",
                                       "new/deeper/.pool.partial/mine.txt": b"someone else's"}
    assert "rayprune did not write" in caplog.text


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_replaces_only_a_pool_and_rechecks_it_before_the_swap(tmp_path):
    out = tmp_path / "pool"
    write_small(out)
    before = tree_snapshot(tmp_path)
    (out / "results.csv").write_text("mine")
    expect_refused(tmp_path, [out, "holds 'results.csv'", "does not list"], PoolWriter, out, image_shape=(4, 5, 3),
                   num_classes=3, overwrite=True)
    (out / "results.csv").unlink()
    # a file that appears in the old pool while the new one is written stops the swap
    with pytest.raises(PoolError, match="holds 'late.txt'"):
        with PoolWriter(out, image_shape=(4, 5, 3), num_classes=3, overwrite=True) as w:
            w.add(np.arange(2), images(2), np.array([0, 1]), "synthetic")
            (out / "late.txt").write_text("mine")
    (out / "late.txt").unlink()
    assert tree_snapshot(tmp_path) == before  # the old pool as it was, no temporary directory left
    info = write_small(out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["pool"] and sorted(os.listdir(out)) == sorted(["pool.json", *info.files])


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_the_output_must_name_a_directory(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_small(tmp_path / "pool")
    expect_refused(tmp_path, ["does not name a new directory"], PoolWriter, name, image_shape=(4, 5, 3),
                   num_classes=3, overwrite=True)


def test_the_output_cannot_be_created_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    expect_refused(tmp_path, [tmp_path / "notes.txt", "is not a directory (a regular file)", "cannot be created"],
                   write_small, tmp_path / "notes.txt" / "sub" / "pool")
