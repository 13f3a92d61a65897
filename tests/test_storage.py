"""Pools and published outputs on local paths and on S3.

S3 is real S3 API traffic to a moto server on 127.0.0.1 (no internet): pyarrow's own
S3FileSystem talks to it, with the endpoint given in the URIs' query
(``?endpoint_override=...&scheme=http``) and dummy credentials in the environment. The
same pool, uploaded there, must read exactly as its local copy through every reader the
job uses; publishing must copy every product and write ``_COMPLETE.json`` last.
"""

import json
import logging
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rayprune import storage
from rayprune.config import ConfigError, JobConfig, load_config
from rayprune.data.demo_pool import DemoPoolSpec
from rayprune.data.pool import PoolError, pool_files, read_pool_info, write_demo_pool
from rayprune.data.pool_check import check_pool
from rayprune.errors import InputError
from rayprune.preflight import preflight
from rayprune.stages.prepare import open_pool, read_ids_and_sources
from rayprune.stages.training import load_rows, train_run_location

moto_server = pytest.importorskip("moto.server")

BUCKET = "rayprune-test"
SPEC = DemoPoolSpec(n_real=100, n_synthetic=300, image_size=8, num_classes=3)
SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port with one bucket; yields a function making URIs."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_SESSION_TOKEN": "testing", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(key, value)
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}{query}&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield lambda key, bucket=BUCKET: f"s3://{bucket}/{key}{query}"
    server.stop()


@pytest.fixture(scope="module")
def pools(s3, tmp_path_factory):
    """The same small demo pool, locally and uploaded to S3: (local dir, s3 URI)."""
    local = tmp_path_factory.mktemp("storage") / "pool"
    write_demo_pool(SPEC, local, rows_per_file=150)
    uri = s3("pools/demo")
    fs, path = storage.resolve(uri)
    pafs.copy_files(str(local), path, destination_filesystem=fs)
    return local, uri


def test_locations_join_and_split_keep_the_uri_query():
    uri = "s3://b/runs/one?region=eu-west-1&scheme=http"
    assert storage.is_uri(uri) and not storage.is_uri("/data/pool") and not storage.is_uri("relative/pool")
    assert storage.join(uri, "select", "kept.parquet") == "s3://b/runs/one/select/kept.parquet?region=eu-west-1&scheme=http"
    assert storage.join("s3://b/runs/", "x") == "s3://b/runs/x"
    assert storage.join("/data/pool", "pool.json") == "/data/pool/pool.json"
    assert storage.basename(storage.join(uri, "part-00000.parquet")) == "part-00000.parquet"
    fs, path = storage.resolve("file:///tmp/some/pool")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/some/pool"


def test_pool_on_s3_reads_exactly_like_its_local_copy(pools):
    local, uri = pools
    assert read_pool_info(uri) == read_pool_info(local)
    files = pool_files(uri)
    assert [storage.basename(f) for f in files] == [Path(f).name for f in pool_files(local)]
    assert all(storage.is_uri(f) and f.endswith("&region=us-east-1") for f in files)

    assert check_pool(uri) == check_pool(local)
    remote, here = open_pool(uri), open_pool(local)
    assert remote.digest == here.digest  # names, sizes and pool.json: the same pool wherever it is stored
    assert remote.path == uri and remote.info == here.info

    for a, b in zip(read_ids_and_sources(remote.files), read_ids_and_sources(here.files)):
        np.testing.assert_array_equal(a, b)
    ids = np.array([399, 3, 150, 42, 0, 251])  # across files, unsorted
    subset = uri.replace("/pools/demo", "/subset")  # a directory of Parquet files only (split/subset)
    fs, path = storage.resolve(subset)
    for f in pool_files(local):
        pafs.copy_files(f, f"{path}/{Path(f).name}", destination_filesystem=fs)
    for source in (remote.files, subset):  # a list of files, or a directory of them
        got, want = load_rows(source, ids, SHAPE), load_rows(here.files, ids, SHAPE)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(got[0], ids)

    fs, paths = storage.files_on(remote.files)
    table = pads.dataset(paths, format="parquet", filesystem=fs).to_table().sort_by("id")
    assert table.equals(pads.dataset(pool_files(local), format="parquet").to_table().sort_by("id"))
    # What Ray ships to its read tasks must survive pickling and still reach the bucket.
    source = storage.ray_parquet_source(remote.files)
    again = pickle.loads(pickle.dumps(source["filesystem"]))
    assert pq.read_table(source["paths"][0], filesystem=again).num_rows == 150
    assert storage.ray_parquet_source(here.files) == {"paths": here.files}  # local reads stay as they were


def test_preflight_accepts_s3_pools_and_publish_uri(pools, s3, tmp_path):
    _, uri = pools
    config = load_config(None, {"pool.path": uri, "evaluation.test_pool": uri, "output_dir": str(tmp_path / "out"),
                                "publish_uri": s3("runs/one"), "ray.storage_path": s3("checkpoints")})
    preflight(config)
    assert not (tmp_path / "out").exists()


def test_bad_locations_are_one_line_input_errors_naming_them(pools, s3, tmp_path):
    _, uri = pools
    with pytest.raises(InputError, match=r"^nosuch://bucket/pool/pool.json: cannot open its filesystem .*s3://"):
        read_pool_info("nosuch://bucket/pool")
    missing = s3("pool", bucket="no-such-bucket")
    with pytest.raises(PoolError, match=r"no-such-bucket/pool\?.* is not a pool: pool.json is missing"):
        check_pool(missing)
    with pytest.raises(PoolError, match="is not a pool"):
        open_pool(s3("pools/absent"))

    base = {"output_dir": str(tmp_path / "out"), "pool.path": uri}
    with pytest.raises(InputError, match=r"^publish_uri: s3://no-such-bucket/run\?.*: the bucket 'no-such-bucket' "):
        preflight(load_config(None, {**base, "publish_uri": s3("run", bucket="no-such-bucket")}))
    with pytest.raises(InputError, match=r"^ray.storage_path: nosuch://x/y: cannot open its filesystem"):
        preflight(load_config(None, {**base, "ray.storage_path": "nosuch://x/y"}))
    with pytest.raises(ConfigError, match="publish_uri .* lies inside output_dir"):
        preflight(load_config(None, {**base, "publish_uri": str(tmp_path / "out" / "pub")}))
    with pytest.raises(ConfigError, match="output_dir must be a local or shared POSIX path .* set publish_uri"):
        JobConfig(output_dir=s3("run"))


@pytest.mark.slow  # the S3 client retries for about 6 s
def test_an_unreachable_endpoint_is_a_one_line_pool_error(s3):
    unreachable = "s3://b/pool?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"  # nothing listens
    with pytest.raises(PoolError, match=r"^s3://b/pool/pool.json\?.* is unreadable: .*Could not connect") as info:
        read_pool_info(unreachable)
    assert "\n" not in str(info.value)


def test_cli_reports_a_bad_pool_uri_in_one_line(capsys, tmp_path):
    from rayprune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--pool.path", "nosuch://bucket/pool", "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rayprune: error: nosuch://bucket/pool/pool.json: cannot open")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ publishing

PRODUCTS = ["manifest.json", "score_subset/dynamic_uncertainty-adv-w10-subset_scores.parquet", "extrapolate/scores",
            "extrapolate/quality.json", "select/kept_ids.parquet", "select/pruned_pool", "final_train/model.pt",
            "final_train/model.json", "final_train/history.json", "evaluate/metrics.json",
            "evaluate/per_sample.parquet"]


def fake_run(root: Path, pool: Path) -> Path:
    """An output directory holding every product (with the real pool as the pruned pool)."""
    for rel in PRODUCTS:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "select/pruned_pool":
            shutil.copytree(pool, path)
        elif rel == "extrapolate/scores":
            path.mkdir()
            for i in range(2):
                pq.write_table(pa.table({"id": [i], "score": [0.5]}), path / f"part-{i}.parquet")
        else:
            path.write_bytes(f"{rel}\n".encode() * 10)
    (root / "score_subset" / "_COMMITTED.json").write_text("{}")  # not a product: not published
    return root


def remote_files(uri: str) -> dict[str, int]:
    fs, base = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def test_publish_copies_every_product_then_the_marker(pools, s3, tmp_path):
    local, _ = pools
    root = fake_run(tmp_path / "run", local)
    uri = s3("published/run1")
    record = storage.publish(root, uri, PRODUCTS)

    expected = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
                if p.is_file() and "_COMMITTED" not in p.name}
    assert record["files"] == expected and record["uri"] == uri
    assert storage.read_published(uri) == record
    assert remote_files(uri) == {**expected, storage.COMPLETE: len(json.dumps(record, indent=2))}
    for rel in expected:
        assert storage.read_bytes(storage.join(uri, rel)) == (root / rel).read_bytes()
    assert read_pool_info(storage.join(uri, "select/pruned_pool")) == read_pool_info(local)  # a readable pool

    # Republishing overwrites: a product directory holds only the new files.
    (root / "extrapolate/scores/part-1.parquet").unlink()
    (root / "manifest.json").write_text("{}")
    record = storage.publish(root, uri, PRODUCTS)
    files = remote_files(uri)
    assert "extrapolate/scores/part-1.parquet" not in files and files["manifest.json"] == 2
    assert set(files) - {storage.COMPLETE} == set(record["files"])


def test_a_failed_publish_leaves_no_marker(pools, s3, tmp_path):
    local, _ = pools
    root = fake_run(tmp_path / "run", local)
    uri = s3("published/run2")
    storage.publish(root, uri, PRODUCTS)
    assert storage.read_published(uri) is not None
    (root / "evaluate/per_sample.parquet").unlink()  # the last product: everything else is copied first
    with pytest.raises(InputError, match=r"^publishing .* to s3://.*run2.* failed: .*per_sample.parquet"):
        storage.publish(root, uri, PRODUCTS)
    assert storage.read_published(uri) is None  # the old marker went first, no new one
    assert "select/kept_ids.parquet" in remote_files(uri)  # partial upload, but not marked complete


def test_publish_to_a_local_directory(pools, tmp_path):
    local, _ = pools
    root = fake_run(tmp_path / "run", local)
    record = storage.publish(root, str(tmp_path / "archive"), PRODUCTS)
    assert json.loads((tmp_path / "archive" / storage.COMPLETE).read_text()) == record
    assert (tmp_path / "archive/final_train/model.pt").read_bytes() == (root / "final_train/model.pt").read_bytes()


def test_publish_never_overwrites_a_location_holding_other_data(pools, tmp_path):
    """Only an empty location or an earlier publish (complete or interrupted) is written to."""
    from conftest import tree_snapshot

    local, _ = pools
    root = fake_run(tmp_path / "run", local)
    theirs = tmp_path / "theirs"
    (theirs / "select").mkdir(parents=True)
    (theirs / "select" / "kept_ids.parquet").write_bytes(b"someone else's file")
    before = tree_snapshot(theirs)
    with pytest.raises(InputError, match=r"publish_uri .*theirs holds other data \(select, ...\) and no earlier "):
        storage.publish(root, str(theirs), PRODUCTS)
    assert tree_snapshot(theirs) == before
    # An interrupted publish of ours (no _COMPLETE.json yet) may be redone.
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / storage.PUBLISHING).write_text("{}")
    (ours / "manifest.json").write_text("half")
    record = storage.publish(root, str(ours), PRODUCTS)
    assert storage.read_published(str(ours)) == record and not (ours / storage.PUBLISHING).exists()


def test_publish_products_are_the_pipeline_results(pools, tmp_path):
    from rayprune.pipeline import publish_products

    local, _ = pools
    root = fake_run(tmp_path / "run", local)
    score = SimpleNamespace(scores_file=root / PRODUCTS[1])
    extrap = SimpleNamespace(scores_dir=root / "extrapolate/scores")
    selected = SimpleNamespace(kept_file=root / "select/kept_ids.parquet", pruned_pool=root / "select/pruned_pool")
    final = SimpleNamespace(model_file=root / "final_train/model.pt")
    evaluation = SimpleNamespace(per_sample_file=root / "evaluate/per_sample.parquet")
    assert sorted(publish_products(root, score, extrap, selected, final, evaluation)) == sorted(PRODUCTS)
    assert "final_train/model.pt" not in publish_products(root, score, extrap, selected)  # final.enabled=false


def test_train_runs_resume_by_name_under_a_storage_path(s3, tmp_path):
    stage_dir = tmp_path / "out" / "score_subset"
    assert train_run_location(stage_dir, "abc", "") == ("train", str(stage_dir), None)  # default: in the stage
    name, path, fs = train_run_location(stage_dir, "abc", s3("ckpt"))
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{BUCKET}/ckpt" and name.startswith("rayprune-score_subset-")
    assert train_run_location(stage_dir, "abc", s3("ckpt"))[0] == name  # same job and inputs: same run, resumes
    assert train_run_location(stage_dir, "abd", s3("ckpt"))[0] != name  # changed inputs: a new run
    assert train_run_location(tmp_path / "other" / "score_subset", "abc", s3("ckpt"))[0] != name  # other job
    assert train_run_location(stage_dir, "abc", "shared/ckpt")[1] == str(Path("shared/ckpt").resolve())


@pytest.mark.slow
def test_ray_data_reads_the_s3_pool(pools):
    import ray

    local, uri = pools
    pool = open_pool(uri)
    ray.init(address="local", num_cpus=1, object_store_memory=100 * 2**20, include_dashboard=False)
    try:
        rows = ray.data.read_parquet(**storage.ray_parquet_source(pool.files)).select_columns(["id", "label"])
        table = pa.Table.from_pandas(rows.to_pandas()).sort_by("id")
    finally:
        ray.shutdown()
    want = pads.dataset(pool_files(local), format="parquet").to_table(columns=["id", "label"]).sort_by("id")
    assert table.select(["id", "label"]).equals(want)
