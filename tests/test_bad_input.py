"""Bad input: every case is a one-line error naming the file, row, id or option.

Pools are crafted with pyarrow and checked by the preflight functions directly; the
command line is run for real (``jobs/prune.py`` in a subprocess) on a bad pool, where the
preflight must stop it before Ray, MLflow or the output directory are touched. The
converters' own bad-input cases (npz, CIFAR-10, folders) are in test_converters.py.
"""

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import EvilPickle, one_line_error

from rayprune.config import ConfigError, load_config
from rayprune.data.pool import (
    SCHEMA,
    PoolError,
    PoolInfo,
    PoolWriter,
    decode_images,
    encode_images,
    write_pool_info,
)
from rayprune.data.pool_check import check_pool
from rayprune.errors import InputError
from rayprune.preflight import check_sizes, preflight
from rayprune.validation import check_finite_scores

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4, 4, 3)


def rows(ids, labels=None, images=None, sources=None) -> pa.Table:
    """A pool table with valid columns unless given otherwise."""
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    images = encode_images(np.zeros((n, *SHAPE), np.uint8)) if images is None else images
    labels = pa.array(np.arange(n) % 3 if labels is None else labels, pa.int64())
    sources = pa.array(sources or ["synthetic"] * n, pa.string())
    return pa.table({"id": pa.array(ids, pa.int64()), "image": images, "label": labels, "source": sources},
                    schema=SCHEMA)


def raw_pool(path: Path, tables: list[pa.Table], num_classes: int = 3, num_rows: int | None = None,
             **write_options) -> list[Path]:
    """Write ``tables`` as part files plus a pool.json (which does not check them)."""
    path.mkdir(parents=True, exist_ok=True)
    names = [f"part-{i:05d}.parquet" for i in range(len(tables))]
    for name, table in zip(names, tables):
        pq.write_table(table, path / name, **write_options)
    n = sum(t.num_rows for t in tables) if num_rows is None else num_rows
    write_pool_info(path, PoolInfo(num_rows=n, image_shape=SHAPE, num_classes=num_classes, sources={"synthetic": n},
                                   files=names))
    return [path / name for name in names]


def good_pool(path: Path, n: int = 40, real: int = 10, rows_per_file: int = 20) -> Path:
    with PoolWriter(path, image_shape=SHAPE, num_classes=3, rows_per_file=rows_per_file) as writer:
        writer.add(np.arange(n), np.zeros((n, *SHAPE), np.uint8), np.arange(n) % 3,
                   ["real"] * real + ["synthetic"] * (n - real))
    return path


def expect(parts, fn, *args, error=InputError):
    """``fn(*args)`` raises ``error`` with a one-line message containing every part."""
    return one_line_error(error, parts, fn, *args)


# ----------------------------------------------------------------------------- Parquet files


def test_a_good_pool_passes(tmp_path):
    info = check_pool(good_pool(tmp_path / "p"))
    assert info.num_rows == 40 and info.sources == {"real": 10, "synthetic": 30}


def test_truncated_and_corrupt_parquet_files_are_named(tmp_path):
    pool = good_pool(tmp_path / "p")
    part = pool / "part-00001.parquet"
    raw = part.read_bytes()
    part.write_bytes(raw[: len(raw) // 2])
    expect([part, "not a readable Parquet file", "corrupt or truncated"], check_pool, pool, error=PoolError)
    part.write_bytes(b"PAR1 this is not parquet")
    expect([part, "not a readable Parquet file"], check_pool, pool, error=PoolError)
    part.unlink()
    expect(["missing file", part], check_pool, pool, error=PoolError)


def test_corrupt_id_data_is_named(tmp_path):
    pool = tmp_path / "p"
    (part,) = raw_pool(pool, [rows(np.arange(500))], compression="NONE")
    raw = bytearray(part.read_bytes())
    raw[8:40] = b"\xff" * 32  # inside the first column chunk (ids); the footer is intact
    part.write_bytes(bytes(raw))
    with pytest.raises(PoolError, match=re.escape(str(part))):
        check_pool(pool)



def break_a_page(part: Path, row_groups: int = 4, broken: int = 2) -> None:
    """Rewrite ``part`` in ``row_groups`` row groups and make its image column undecodable
    in row group ``broken``. Footer and first row group stay intact: the preflight passes."""
    table = pq.read_table(part)
    pq.write_table(table, part, row_group_size=-(-table.num_rows // row_groups), data_page_size=4096,
                   use_dictionary=["label", "source"])
    chunk = pq.ParquetFile(part).metadata.row_group(broken).column(1)
    assert chunk.path_in_schema == "image" and not chunk.has_dictionary_page
    raw = bytearray(part.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    raw[middle:middle + 200] = b"\xff" * 200
    part.write_bytes(bytes(raw))


def pool_with_a_broken_page(path: Path, n: int = 2000) -> Path:
    """A one-file pool whose image column does not decode in rows 1000-1499 (row group 2)."""
    images = encode_images(np.random.default_rng(0).integers(0, 256, (n, *SHAPE), dtype=np.uint8))
    (part,) = raw_pool(path, [rows(np.arange(n), images=images)])
    break_a_page(part)
    return part


def test_a_broken_page_deep_in_a_file_is_found_and_named(tmp_path):
    from rayprune.data.pool_check import find_unreadable_data

    good_pool(tmp_path / "good")
    find_unreadable_data(tmp_path / "good")  # everything decodes: no error
    part = pool_with_a_broken_page(tmp_path / "p")
    check_pool(tmp_path / "p")  # the cheap preflight does not read that far
    with pytest.raises(OSError):
        pq.read_table(part)  # ... but a full read fails, as it would inside Ray Data
    expect([part, "row group 2 (rows 1000-1499)", "column 'image'", "cannot be decoded"], find_unreadable_data,
           tmp_path / "p", error=PoolError)


def test_a_failed_read_is_turned_into_an_error_naming_the_file(tmp_path):
    from rayprune.pipeline import _naming_unreadable_files

    class RemoteFailure(RuntimeError):
        """Like Ray's wrappers: no __cause__ after pickling, the remote traceback as text."""

        traceback_str = 'File "pyarrow/_parquet.pyx", line 1, in read\nOSError: Corrupt snappy compressed data.'

    part = pool_with_a_broken_page(tmp_path / "p")
    with pytest.raises(PoolError, match=re.escape(str(part))) as found:
        with _naming_unreadable_files(tmp_path / "p"):
            raise RemoteFailure("a read task failed")
    assert isinstance(found.value.__cause__, RemoteFailure)
    good_pool(tmp_path / "good")
    with pytest.raises(RemoteFailure):  # nothing to blame on the pool: the error passes unchanged
        with _naming_unreadable_files(tmp_path / "good"):
            raise RemoteFailure("a read task failed")
    with pytest.raises(ConnectionError):  # not a read failure: no full read, unchanged
        with _naming_unreadable_files(tmp_path / "p"):
            raise ConnectionError("node lost")


@pytest.mark.parametrize(
    "table, parts",
    [
        (rows(np.arange(4)).drop_columns(["label"]), ["missing column(s) label", "id (int64), image (binary)"]),
        (rows(np.arange(4)).append_column("extra", pa.array([1, 2, 3, 4])), ["unexpected column(s) extra"]),
        (rows(np.arange(4)).set_column(2, "label", pa.array([0.0, 1.0, 2.0, 0.0])), ["'label' has type double",
                                                                                     "needs int64"]),
        (rows(np.arange(4)).set_column(1, "image", pa.array(["x"] * 4)), ["'image' has type string", "needs binary"]),
        (rows(np.arange(4)).set_column(0, "id", pa.array(np.arange(4), pa.int32())), ["'id' has type int32"]),
    ],
    ids=["missing-column", "extra-column", "float-labels", "string-images", "int32-ids"],
)
def test_wrong_schema_names_file_and_column(tmp_path, table, parts):
    (part,) = raw_pool(tmp_path / "p", [table])
    expect([part, *parts], check_pool, tmp_path / "p", error=PoolError)


def test_wrong_image_shape_or_dtype(tmp_path):
    # A file written for 8x8x3 images in a pool.json that says 4x4x3.
    with PoolWriter(tmp_path / "eight", image_shape=(8, 8, 3), num_classes=3) as writer:
        writer.add(np.arange(5), np.zeros((5, 8, 8, 3), np.uint8), np.zeros(5, int), "synthetic")
    meta = json.loads((tmp_path / "eight" / "pool.json").read_text())
    meta["image_shape"] = list(SHAPE)
    (tmp_path / "eight" / "pool.json").write_text(json.dumps(meta))
    expect(["part-00000.parquet", "[8, 8, 3]", "pool.json says [4, 4, 3]"], check_pool, tmp_path / "eight",
           error=PoolError)
    # float32 images (4 bytes a pixel) in files without the shape metadata: named by row and id.
    floats = pa.array([np.zeros(SHAPE, np.float32).tobytes()] * 3, pa.binary())
    (part,) = raw_pool(tmp_path / "float", [rows([7, 8, 9], images=floats)])
    expect([part, "row 0 (id 7)", "192 bytes", "needs 48 bytes", "uint8"], check_pool, tmp_path / "float",
           error=PoolError)


def test_mixed_image_sizes_are_named_by_row_and_id(tmp_path):
    images = [bytes(48)] * 10
    images[6] = bytes(27)  # a 3x3x3 image among 4x4x3 ones
    (part,) = raw_pool(tmp_path / "p", [rows(np.arange(100, 110), images=pa.array(images, pa.binary()))])
    expect([part, "row 6 (id 106)", "27 bytes", "needs 48"], check_pool, tmp_path / "p", error=PoolError)


def test_image_sizes_beyond_the_preflight_sample_fail_where_rows_are_read(tmp_path):
    from rayprune.stages.prepare import check_image_lengths

    images = [bytes(48)] * 200
    images[150] = bytes(47)
    table = rows(np.arange(200), images=pa.array(images, pa.binary()))
    raw_pool(tmp_path / "p", [table])
    check_pool(tmp_path / "p")  # the preflight samples the first 64 images of each file
    # Every row passes the split stage's row filter, which checks every length ...
    expect(["pool /data/p, id 150", "47 bytes", "needs 48"], check_image_lengths, table, SHAPE, "pool /data/p")
    # ... and decoding names the id too (training workers, embedding actors, evaluation).
    with pytest.raises(PoolError, match=r"pool, id 150: image has 47 bytes; expected 48"):
        decode_images(table["image"], SHAPE, ids=table["id"], origin="pool")
    with pytest.raises(PoolError, match=r"row 0 of the batch: image is missing \(null\); expected 48 bytes"):
        decode_images(pa.array([None], pa.binary()), SHAPE)


@pytest.mark.parametrize("statistics", [True, False], ids=["from-statistics", "from-column"])
@pytest.mark.parametrize("bad_label, message", [(3, "label 3 is out of range [0, 2]"),
                                                (-1, "label -1 is out of range [0, 2]")])
def test_labels_out_of_range_or_negative(tmp_path, statistics, bad_label, message):
    labels = np.arange(30) % 3
    labels[17] = bad_label
    tables = [rows(np.arange(10), labels=labels[:10]), rows(np.arange(10, 30), labels=labels[10:])]
    files = raw_pool(tmp_path / "p", tables, write_statistics=statistics)
    expect([files[1], "row 7", message, "num_classes = 3"], check_pool, tmp_path / "p", error=PoolError)


def test_null_labels_and_ids(tmp_path):
    labels = pa.array([0, None, 1], pa.int64())
    (part,) = raw_pool(tmp_path / "a", [rows([1, 2, 3]).set_column(2, "label", labels)])
    expect([part, "row 1", "label is missing (null)"], check_pool, tmp_path / "a", error=PoolError)
    ids = pa.array([1, 2, None], pa.int64())
    (part,) = raw_pool(tmp_path / "b", [rows([1, 2, 3]).set_column(0, "id", ids)])
    expect([part, "row 2", "id is missing (null)"], check_pool, tmp_path / "b", error=PoolError)


def test_duplicate_ids_name_both_occurrences(tmp_path):
    files = raw_pool(tmp_path / "p", [rows([1, 2, 3, 4]), rows([5, 6, 3])])
    expect([f"{files[1]}, row 2: duplicate id 3", f"also at {files[0]}, row 2", "unique"], check_pool, tmp_path / "p",
           error=PoolError)


def test_empty_pool_and_row_counts_that_disagree(tmp_path):
    raw_pool(tmp_path / "empty", [rows([])], num_rows=0)
    expect(["pool.json", "the pool is empty"], check_pool, tmp_path / "empty", error=PoolError)
    raw_pool(tmp_path / "zero", [rows([])], num_rows=5)
    expect(["pool.json says the pool has 5 rows but its files hold 0"], check_pool, tmp_path / "zero", error=PoolError)
    # pool.json promising more rows than the files hold (a subset drawn from it could exceed the pool)
    raw_pool(tmp_path / "short", [rows(np.arange(10))], num_rows=1000)
    expect(["says the pool has 1000 rows but its files hold 10"], check_pool, tmp_path / "short", error=PoolError)


def test_pool_json_problems(tmp_path):
    pool = good_pool(tmp_path / "p")
    meta = json.loads((pool / "pool.json").read_text())
    for change, parts in [
        ({"files": meta["files"] + meta["files"][:1]}, ["lists the file part-00000.parquet more than once"]),
        ({"files": [".."]}, ["plain names inside the pool", "'..'"]),
        ({"sources": {"real": 10, "synthetic": 3}}, ["rows per source", "must add up to num_rows (40)"]),
        ({"image_shape": [4, 4]}, ["image_shape must be [H, W, C]"]),
        ({"num_classes": "three"}, ["pool.json is malformed"]),
    ]:
        (pool / "pool.json").write_text(json.dumps({**meta, **change}))
        expect([pool / "pool.json", *parts], check_pool, pool, error=PoolError)
    (pool / "pool.json").unlink()
    expect([pool, "pool.json is missing"], check_pool, pool, error=PoolError)


# ----------------------------------------------------------------------------- options against the pool


SOURCES = {"real": 100, "synthetic": 400}


@pytest.mark.parametrize(
    "overrides, parts",
    [
        ({"extrapolation.k": "80"}, ["extrapolation.k=80 exceeds the 72 scored samples", "subset of 80",
                                     "probe of 8", "lower k"]),
        ({"pool.prunable_sources": "generated"}, ["pool.prunable_sources names generated", "the test pool",
                                                  "its sources are real, synthetic"]),
        ({"final.val_size": "1000", "pool.prunable_sources": "real,synthetic"},
         ["final.val_size=1000 leaves no training samples in the pruned pool of 250"]),
    ],
    ids=["k-above-scored", "unknown-source", "val-size"],
)
def test_options_checked_against_the_pool_size(overrides, parts):
    config = load_config(None, {"split.subset_fraction": "0.2", **overrides})
    expect(parts, check_sizes, config, SOURCES, "the test pool", error=ConfigError)


def test_k_is_checked_exactly_as_the_stage_counts_neighbours():
    from rayprune.scoring.quality import split_probe
    from rayprune.scoring.select import draw_subset

    config = load_config(None, {"split.subset_fraction": "0.2", "extrapolation.k": "72"})
    check_sizes(config, SOURCES, "pool")  # k = every neighbour: allowed
    subset = draw_subset(500, 0.2, 0, eligible=np.arange(500) >= 100)
    assert (~split_probe(len(subset), 0.1, 0)).sum() == 72
    with pytest.raises(ConfigError, match="exceeds the 2 scored samples"):
        check_sizes(load_config(None, {"extrapolation.k": "3", "split.subset_fraction": "0.005"}), SOURCES, "pool")
    with pytest.raises(ConfigError, match="no rows in pool.prunable_sources"):
        check_sizes(load_config(None, {}), {"real": 5, "synthetic": 0}, "pool")


def test_k_against_the_neighbours_the_extrapolation_stage_has():
    from rayprune.stages.extrapolate import check_neighbour_counts

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    check_neighbour_counts(load_config(None, {"extrapolation.k": "8"}), labels)
    with pytest.raises(ConfigError, match=r"extrapolation\.k=9 exceeds the 8 scored samples used as neighbours"):
        check_neighbour_counts(load_config(None, {"extrapolation.k": "9"}), labels)
    with pytest.raises(ConfigError, match=r"same_label needs extrapolation\.k=3 .* class 1 has 2"):
        check_neighbour_counts(load_config(None, {"extrapolation.k": "3", "extrapolation.same_label": "true"}), labels)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"selection.keep_fraction": "0"}, r"selection\.keep_fraction must be a number in \(0, 1\]; got 0\.0"),
        ({"selection.keep_fraction": "-0.5"}, r"selection\.keep_fraction must be a number in \(0, 1\]"),
        ({"selection.keep_fraction": "1.01"}, r"selection\.keep_fraction must be a number in \(0, 1\]"),
        ({"split.subset_fraction": "1.5"}, r"split\.subset_fraction must be a number in \(0, 1\]"),
        ({"model.name": "resnet50"}, r"model\.name must be one of small_cnn, preact_resnet18, .*; got 'resnet50'"),
        ({"attack.norm": "l0"}, r"attack\.norm must be one of linf, l2; got 'l0'"),
        ({"train.loss": "mart"}, r"train\.loss must be one of .*; got 'mart'"),
        ({"evaluation.attacks": "clean,sqare"},
         r"evaluation\.attacks must name .* from: clean, pgd_ce.*got clean, sqare"),
        ({"evaluation.attacks": "clean,clean"}, r"evaluation\.attacks must name each of its attacks once"),
        ({"final.train.epoch": "3"}, r"unknown config key\(s\) final\.train\.epoch; allowed in final\.train: .*epochs"),
        ({"tracking.registered_model": " "}, r"tracking\.registered_model must be a non-empty name"),
    ],
)
def test_bad_options_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_typo_is_never_ignored(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("selection:\n  keep_fraction: 0.3\n  class_balance: false\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) selection\.class_balance; allowed in selection"):
        load_config(path)


def test_test_pool_must_fit_the_training_pool(tmp_path):
    good_pool(tmp_path / "train")
    with PoolWriter(tmp_path / "test", image_shape=(8, 8, 3), num_classes=3) as writer:
        writer.add(np.arange(4), np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, int), "real")
    config = load_config(None, {"pool.path": str(tmp_path / "train"), "evaluation.test_pool": str(tmp_path / "test"),
                                "split.subset_fraction": "1", "extrapolation.k": "2", "final.val_size": "2",
                                "output_dir": str(tmp_path / "out")})
    expect(["evaluation.test_pool", "images [8, 8, 3]", "images [4, 4, 3]"], preflight, config, error=PoolError)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="output_dir .*file exists and is not a directory"):
        preflight(load_config(None, {"output_dir": str(tmp_path / "file")}))


# ----------------------------------------------------------------------------- scores and checkpoints


def test_nan_or_infinite_scores_name_the_id(tmp_path):
    with pytest.raises(InputError, match=r"where: the score of id 12 is nan; scores must be finite .*2 NaN/inf"):
        check_finite_scores([10, 11, 12, 13], [0.1, 0.2, np.nan, -np.inf], "where")
    from rayprune.stages.select import read_scores

    scores = tmp_path / "scores"
    scores.mkdir()
    pq.write_table(pa.table({"id": [3, 1, 2], "label": [0, 1, 0], "source": ["synthetic"] * 3,
                             "score": [0.5, np.inf, 0.1]}), scores / "part.parquet")
    expect([f"scores table {scores}", "the score of id 1 is inf"], read_scores, scores, 3)


def test_nan_in_recorded_histories_names_record_and_id(tmp_path):
    from rayprune.stages.score import assemble_scores, record_path

    config = load_config(None, {"train.epochs": "3", "scoring.window": "2"})
    for epoch in range(3):
        p = np.array([0.2, 0.5, np.nan if epoch == 1 else 0.4])
        pq.write_table(pa.table({"id": [4, 5, 6], "p_adv": p, "margin_adv": p, "l2_error_adv": p}),
                       record_path(tmp_path, epoch, 0))
    expect([record_path(tmp_path, 1, 0), "p_adv of id 6 is nan", "must be finite"],
           assemble_scores, config, tmp_path, 1, 3)


def small_config(name="small_cnn", width=8):
    return load_config(None, {"model.name": name, "model.width": str(width)})


def test_checkpoint_from_a_different_model_names_both(tmp_path):
    from rayprune.stages.training import (
        load_model_file,
        model_from_config,
        model_identity,
        save_model_file,
    )

    config = small_config(width=8)
    path = tmp_path / "model.pt"
    save_model_file(model_from_config(config, 3, 3).state_dict(), path, model_identity("small_cnn", 8, 3, 3))
    assert load_model_file(config, path, 3, 3) is not None
    expect([path, "'small_cnn' (width 8) with 3 classes", "this job builds a 'preact_resnet18' with 3 classes",
            "model.name"], load_model_file, small_config("preact_resnet18"), path, 3, 3)
    expect([path, "(width 8) with 3 classes", "(width 16) with 3 classes"], load_model_file,
           small_config(width=16), path, 3, 3)
    # Without the identity file (weights saved by other code): the mismatch itself is named.
    path.with_suffix(".json").unlink()
    expect([path, "does not fit the 'small_cnn' (width 16) with 5 classes", "another model", "size mismatch"],
           load_model_file,
           small_config(width=16), path, 5, 3)


def test_untrusted_checkpoints_are_refused_not_unpickled(tmp_path):
    from rayprune.stages.training import load_model_file

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": EvilPickle(marker)}, evil)
    message = expect([evil, "not a weights-only state dict", "refused"], load_model_file, small_config(), evil, 3, 3)
    assert not marker.exists() and "weights_only=False" not in message
    truncated = tmp_path / "short.pt"
    torch.save({"w": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    expect([truncated, "not a readable weights-only state dict", "corrupt or truncated"], load_model_file,
           small_config(), truncated, 3, 3)
    expect([tmp_path / "absent.pt", "does not exist"], load_model_file, small_config(), tmp_path / "absent.pt", 3, 3)


# ----------------------------------------------------------------------------- the command line


def bad_pool(tmp_path) -> Path:
    pool = tmp_path / "pool"
    good_pool(pool)
    labels = np.zeros(20, int)
    labels[4] = 7
    pq.write_table(rows(np.arange(20, 40), labels=labels, sources=["synthetic"] * 20), pool / "part-00001.parquet")
    return pool


def test_cli_bad_pool_one_line_exit_2_nothing_written_no_mlflow(tmp_path):
    pool, out, db = bad_pool(tmp_path), tmp_path / "out", tmp_path / "mlflow.db"
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "prune.py"), "--pool.path", str(pool), "--output-dir", str(out),
         "--tracking.enabled", "true", "--tracking.uri", f"sqlite:///{db}", "--ray.address", "127.0.0.1:1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("rayprune: error: ")
    assert f"{pool / 'part-00001.parquet'}, row 4: label 7 is out of range [0, 2]" in lines[0]
    # The preflight ran before the output directory, MLflow and Ray (the bogus address was never dialled).
    assert not out.exists() and not db.exists() and not (tmp_path / "mlruns").exists()
    if db.exists():  # pragma: no cover - documents the invariant should the order ever change
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from registered_models").fetchone()[0] == 0


def test_cli_input_error_is_one_line_and_does_not_start_ray(tmp_path, monkeypatch, capsys):
    from rayprune import cli
    from rayprune.stages import resources

    monkeypatch.setattr(resources, "connect", lambda *a: pytest.fail("Ray was started before the preflight"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--pool.path", str(bad_pool(tmp_path)), "--output-dir", str(tmp_path / "o"),
                  "--tracking.enabled", "false", "--log-level", "ERROR"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "label 7 is out of range" in err
    assert not (tmp_path / "o").exists()


def test_cli_programming_errors_keep_their_traceback(tmp_path, monkeypatch):
    from rayprune import cli, pipeline

    def broken(config):
        raise KeyError("a bug")

    monkeypatch.setattr(pipeline, "run_pipeline", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["--tracking.enabled", "false", "--output-dir", str(tmp_path / "o"), "--log-level", "ERROR"])


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    from rayprune import cli

    for argv, part in [(["--selection.keep_fraction", "0"], "selection.keep_fraction must be a number in (0, 1]"),
                       (["--model.nmae", "x"], "unrecognized arguments: --model.nmae x"),
                       (["--scoring.score", "vibes"], "scoring.score must be one of")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("rayprune: error: ") and part in err


# ----------------------------------------------------------------------------- through Ray (the lead runs it)


def _short_image(part: Path) -> str:
    table = pq.read_table(part)
    images = table["image"].to_pylist()
    images[150] = images[150][:-1]  # id 350: one byte short, far beyond the preflight's sample
    pq.write_table(table.set_column(1, "image", pa.array(images, pa.binary())), part)
    return "id 350: image has 191 bytes"


def _broken_page(part: Path) -> str:
    break_a_page(part)
    return f"{part}, row group 2 (rows 100-149): column 'image' cannot be decoded"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the jobs below: the CLI joins the Ray this process runs, so each
    case pays its split stage, not a process start and a Ray start. (The CLI as a process
    of its own: test_cli_bad_pool_one_line_exit_2_nothing_written_no_mlflow; a job starting
    its own local Ray: test_resume.)"""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_short_image, _broken_page], ids=["short-image", "broken-page"])
def test_bad_data_deep_in_a_file_stops_the_job_in_the_split_stage(tmp_path, damage, local_ray, capsys):
    """Data the preflight's sample misses fails inside Ray Data; the CLI still prints one
    line naming the id (a wrong image size) or the file, row group and column (a page
    that does not decode), exits 2, and commits no stage or model."""
    from conftest import tiny_job_flags

    from rayprune.cli import main
    from rayprune.data.demo_pool import DemoPoolSpec, generate_rows

    spec = DemoPoolSpec(n_real=150, n_synthetic=450, image_size=8, num_classes=3)
    demo = generate_rows(spec)
    pool, out, db = tmp_path / "pool", tmp_path / "out", tmp_path / "mlflow.db"
    with PoolWriter(pool, image_shape=(8, 8, 3), num_classes=3, rows_per_file=200) as writer:
        writer.add(demo.ids, demo.images, demo.labels, demo.sources)
    expected = damage(pool / "part-00001.parquet")
    with pytest.raises(SystemExit) as exit_:
        main([*tiny_job_flags(), "--pool.path", str(pool), "--output-dir", str(out), "--tracking.enabled", "true",
              "--tracking.uri", f"sqlite:///{db}", "--log-level", "WARNING"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-4000:]
    errors = [line for line in err.splitlines() if line.startswith("rayprune: error: ")]
    assert len(errors) == 1 and expected in errors[0], err[-4000:]
    assert not list(out.glob("*/_COMMITTED.json")) and not (out / "manifest.json").exists()
    assert not (out / "split").exists()  # the failed stage left nothing a rerun could take for progress
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from registered_models").fetchone()[0] == 0
        reasons = conn.execute("select value from tags where key = 'failure_reason'").fetchall()
    assert len(reasons) == 1 and expected in reasons[0][0]  # the job's MLflow run says why it failed
