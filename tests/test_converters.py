"""Converters into the pool format: exact round trips, streaming, and errors that name file and row."""

import io
import json
import os
import pickle
import shutil
import struct
import tracemalloc
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import EvilPickle, one_line_error, tree_snapshot
from PIL import Image

from rayprune.data import converters
from rayprune.data.convert_cli import main as cli_main
from rayprune.data.converters import InputSpec, convert, read_npz
from rayprune.data.pool import PoolError, decode_images, read_pool_info

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- fixtures


def planar_rows(rng, n):
    """CIFAR-style rows: (n, 3072) uint8, the red plane, then green, then blue."""
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def planar_to_hwc(data):
    """Independent reference for CHW-planar -> HWC: pixel (y, x) of channel c is data[c*1024 + y*32 + x]."""
    out = np.empty((len(data), 32, 32, 3), np.uint8)
    for c in range(3):
        out[..., c] = data[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32)
    return out


def write_cifar_py(root, rng, sizes=(5, 4, 6, 3, 7), test_size=4):
    """A cifar-10-batches-py like the real one: pickled dicts with bytes keys and numpy data."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, [*sizes, test_size]):
        data, labels = planar_rows(rng, n), [int(v) for v in rng.integers(0, 10, n)]
        batches[name] = (data, labels)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": 10000,
                     b"num_vis": 3072}, f)
    return d, batches


def write_cifar_bin(root, batches):
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        records = np.concatenate([np.asarray(labels, np.uint8)[:, None], data], axis=1)
        (d / f"{name}.bin").write_bytes(records.tobytes())
    (d / "batches.meta.txt").write_text("\n".join(CIFAR_NAMES) + "\n\n")
    return d


def py2_pickle(data, labels):
    """Bytes as Python 2's cPickle (protocol 2) wrote the real CIFAR-10 batches: str as
    BINSTRING, numpy.core.multiarray._reconstruct, raw pixel data as a str."""
    def s(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def k(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
             + b"(K\x01" + k(data.shape[0]) + k(data.shape[1]) + b"\x86" + dtype + b"\x89" + s(data.tobytes()) + b"tb")
    labels_list = b"](" + b"".join(k(int(v)) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + labels_list + s(b"batch_label") + s(b"x") + b"u."


def make_npz(path, images, labels, compressed=False, **extra):
    (np.savez_compressed if compressed else np.savez)(path, image=images, label=labels, **extra)
    return path


def write_folder(root, rng, classes=("cat", "dog", "emu"), per_class=(2, 3, 1), size=(32, 32)):
    """PNG folder; returns the images (HWC) and labels in sorted order."""
    images, labels = [], []
    for label, (name, n) in enumerate(zip(classes, per_class)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
            images.append(img)
            labels.append(label)
    return np.stack(images), np.array(labels)


def read_pool(out):
    info = read_pool_info(out)
    table = (pq.read_table([str(out / f) for f in info.files]) if len(info.files) > 1
             else pq.read_table(out / info.files[0]))
    return info, table, decode_images(table.column("image"), info.image_shape)


def expect_error(match_parts, fn, *args, **kwargs):
    """``fn`` raises a PoolError with a one-line message naming every part."""
    return one_line_error(PoolError, match_parts, fn, *args, **kwargs)


# ----------------------------------------------------------------------------- round trips


def test_round_trip_across_all_kinds(tmp_path):
    rng = np.random.default_rng(0)
    cifar_dir, batches = write_cifar_py(tmp_path / "c", rng)
    npz_images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    npz_labels = rng.integers(0, 10, 30).astype(np.int32)
    npz = make_npz(tmp_path / "gen.npz", npz_images, npz_labels)
    folder_images, folder_labels = write_folder(tmp_path / "f", rng)
    out = tmp_path / "pool"

    info = convert([InputSpec("cifar10", cifar_dir), InputSpec("npz", npz),
                    InputSpec("folder", tmp_path / "f", source="extra")],
                   out, rows_per_file=16)

    train = [f"data_batch_{i}" for i in range(1, 6)]
    cifar_data = np.concatenate([batches[n][0] for n in train])
    cifar_labels = np.concatenate([batches[n][1] for n in train])
    expected_images = np.concatenate([planar_to_hwc(cifar_data), npz_images, folder_images])
    expected_labels = np.concatenate([cifar_labels, npz_labels, folder_labels])
    n_cifar, total = len(cifar_data), len(expected_labels)
    # spot check of the reference itself: pixel (y=3, x=5), blue channel
    assert planar_to_hwc(cifar_data)[2, 3, 5, 2] == cifar_data[2, 2 * 1024 + 3 * 32 + 5]

    pool_info, table, images = read_pool(out)
    assert pool_info == info
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(table.column("label").to_numpy(), expected_labels)
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(total))
    sources = np.array(table.column("source").to_pylist())
    assert (sources[:n_cifar] == "real").all() and (sources[n_cifar:n_cifar + 30] == "synthetic").all()
    assert (sources[n_cifar + 30:] == "extra").all()
    meta = json.loads((out / "pool.json").read_text())
    assert meta["num_rows"] == total and meta["image_shape"] == [32, 32, 3] and meta["num_classes"] == 10
    assert meta["sources"] == {"real": n_cifar, "synthetic": 30, "extra": len(folder_labels)}
    assert len(meta["files"]) == -(-total // 16) > 1
    assert meta["class_names"] == CIFAR_NAMES
    assert not list(tmp_path.glob(".pool.partial"))


def test_cifar10_test_split_and_binary_version_match(tmp_path):
    rng = np.random.default_rng(1)
    py_dir, batches = write_cifar_py(tmp_path / "py", rng)
    bin_dir = write_cifar_bin(tmp_path / "bin", batches)
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        convert([InputSpec("cifar10", py_dir.parent, split=split)], tmp_path / f"py-{split}")  # parent dir works too
        convert([InputSpec("cifar10", bin_dir, split=split)], tmp_path / f"bin-{split}")
        _, t_py, im_py = read_pool(tmp_path / f"py-{split}")
        info_bin, t_bin, im_bin = read_pool(tmp_path / f"bin-{split}")
        expected = planar_to_hwc(np.concatenate([batches[n][0] for n in names]))
        np.testing.assert_array_equal(im_py, expected)
        np.testing.assert_array_equal(im_bin, expected)
        labels = np.concatenate([batches[n][1] for n in names])
        np.testing.assert_array_equal(t_py.column("label").to_numpy(), labels)
        np.testing.assert_array_equal(t_bin.column("label").to_numpy(), labels)
        assert info_bin.class_names == CIFAR_NAMES


@pytest.mark.parametrize("version", ["py", "bin"])
def test_cifar10_split_needs_only_its_own_batches(tmp_path, version):
    """A train directory without test_batch(.bin), or a test directory without the data
    batches, converts; class names still come from batches.meta(.txt)."""
    rng = np.random.default_rng(14)
    py_dir, batches = write_cifar_py(tmp_path / "py", rng)
    full = py_dir if version == "py" else write_cifar_bin(tmp_path / "bin", batches)
    suffix = "" if version == "py" else ".bin"
    for split, names, absent in (("train", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
                                 ("test", ["test_batch"], [f"data_batch_{i}" for i in range(1, 6)])):
        d = tmp_path / f"{split}-only" / full.name
        shutil.copytree(full, d)
        for name in absent:
            (d / f"{name}{suffix}").unlink()
        before = tree_snapshot(d.parent)
        info = convert([InputSpec("cifar10", d, split=split)], tmp_path / f"pool-{split}")
        assert tree_snapshot(d.parent) == before
        _, table, images = read_pool(tmp_path / f"pool-{split}")
        np.testing.assert_array_equal(images, planar_to_hwc(np.concatenate([batches[n][0] for n in names])))
        np.testing.assert_array_equal(table.column("label").to_numpy(), np.concatenate([batches[n][1] for n in names]))
        assert info.class_names == CIFAR_NAMES and info.num_classes == 10


def test_python2_style_cifar_pickle_loads(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    data, labels = planar_rows(rng, 3), [0, 9, 4]
    (d / "test_batch").write_bytes(py2_pickle(data, labels))
    (batch,) = converters.read_cifar10(d, "test")
    np.testing.assert_array_equal(batch.images, planar_to_hwc(data))
    np.testing.assert_array_equal(batch.labels, labels)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_load(tmp_path, protocol):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    data, labels = planar_rows(np.random.default_rng(13), 3), np.array([3, 1, 4])
    (d / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=protocol))
    (batch,) = converters.read_cifar10(d, "test")
    np.testing.assert_array_equal(batch.images, planar_to_hwc(data))
    np.testing.assert_array_equal(batch.labels, labels)


def test_allowed_pickle_helpers_cannot_be_misused(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    # _codecs.encode is allowed only as protocol-2 pickles use it (str -> latin1 bytes)
    (d / "test_batch").write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00base64\x86R.")
    expect_error([d / "test_batch", "corrupt", "latin1"], lambda: list(converters.read_cifar10(d, "test")))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streaming_equals_np_load(tmp_path, monkeypatch, compressed):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2500, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, 2500).astype(">i8")  # big-endian labels read right too
    path = make_npz(tmp_path / "x.npz", images, labels, compressed=compressed)
    monkeypatch.setattr(converters, "NPZ_CHUNK_ROWS", 1000)
    batches = list(read_npz(path))
    assert [len(b.labels) for b in batches] == [1000, 1000, 500]
    assert [b.first_row for b in batches] == [0, 1000, 2000]
    ref = np.load(path)
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), ref["image"])
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), ref["label"])
    assert converters.scan_npz(path) == ((6, 5, 3), 2500, 7)


def test_big_npz_is_streamed_not_loaded(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    n = 20_000
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    path = make_npz(tmp_path / "big.npz", images, labels, compressed=True)
    monkeypatch.setattr(converters, "NPZ_CHUNK_ROWS", 1000)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load must not be used"))
    tracemalloc.start()
    try:
        peak_rows = 0
        for batch in read_npz(path):
            peak_rows = max(peak_rows, len(batch.labels))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_rows == 1000
    assert peak < images.nbytes / 4, f"peak {peak} bytes while streaming a {images.nbytes}-byte array"
    info = convert([InputSpec("npz", path)], tmp_path / "pool", rows_per_file=6000)
    assert info.num_rows == n and len(info.files) == 4 and info.num_classes == int(labels.max()) + 1
    _, table, got = read_pool(tmp_path / "pool")
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels)


def test_npz_num_classes_is_max_over_inputs_and_shapes_must_agree(tmp_path):
    rng = np.random.default_rng(5)
    a = make_npz(tmp_path / "a.npz", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 2, 1]))
    b = make_npz(tmp_path / "b.npz", rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), np.array([5, 0, 0]))
    info = convert([InputSpec("npz", a), InputSpec("npz", b, source="gen2")], tmp_path / "p")
    assert info.num_classes == 6 and info.sources == {"synthetic": 4, "gen2": 3}
    _, table, _ = read_pool(tmp_path / "p")
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(7))
    assert convert([InputSpec("npz", a, num_classes=20)], tmp_path / "q").num_classes == 20

    c = make_npz(tmp_path / "c.npz", rng.integers(0, 256, (2, 9, 8, 3), dtype=np.uint8), np.array([0, 1]))
    out = tmp_path / "r"
    expect_error(["c.npz", "9x8x3", "8x8x3"], convert, [InputSpec("npz", a), InputSpec("npz", c)], out)
    assert not out.exists()


# ----------------------------------------------------------------------------- errors


def good_npz(tmp_path, n=50, compressed=False, name="good.npz"):
    rng = np.random.default_rng(6)
    return make_npz(tmp_path / name, rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, n),
                    compressed=compressed)


def check_fails(tmp_path, spec, parts):
    out = tmp_path / "out"
    msg = expect_error(parts, convert, [spec], out)
    assert not out.exists() and not list(tmp_path.glob(".out.partial"))
    return msg


def test_truncated_npz(tmp_path):
    path = good_npz(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    check_fails(tmp_path, InputSpec("npz", path), [path, "truncated"])


def test_corrupt_zip_data(tmp_path):
    for compressed in (False, True):
        path = good_npz(tmp_path, n=400, compressed=compressed, name=f"bad{compressed}.npz")
        raw = bytearray(path.read_bytes())
        mid = len(raw) // 3
        raw[mid : mid + 64] = bytes(64)  # inside image.npy's (stored or deflated) data
        path.write_bytes(bytes(raw))
        check_fails(tmp_path, InputSpec("npz", path), [path, "corrupt"])
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file at all")
    check_fails(tmp_path, InputSpec("npz", junk), [junk, "not a zip file"])


def test_npy_shorter_than_its_header(tmp_path):
    """A valid zip whose image.npy promises 10 rows but holds 6: the row where it ends is named."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10, 2, 2, 3)})
    image = buf.getvalue() + bytes(6 * 12)
    label = io.BytesIO()
    np.save(label, np.arange(10) % 2)  # two classes: a pool needs at least 2
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("image.npy", image)
        zf.writestr("label.npy", label.getvalue())
    check_fails(tmp_path, InputSpec("npz", path), [path, "image.npy", "row 6", "truncated"])


@pytest.mark.parametrize(
    "arrays, parts",
    [
        ({"image": np.zeros((3, 4, 4, 3), np.uint8)}, ["missing 'label'"]),
        ({"label": np.zeros(3, np.int64), "images": np.zeros((3, 4, 4, 3), np.uint8)}, ["missing 'image'"]),
        ({"image": np.zeros((3, 4, 4, 3), np.float32), "label": np.zeros(3, np.int64)},
         ["image.npy", "uint8", "float32"]),
        ({"image": np.zeros((3, 4, 4), np.uint8), "label": np.zeros(3, np.int64)},
         ["image.npy", "(N, H, W, C)", "3 dims"]),
        ({"image": np.zeros((3, 4, 4, 3), np.uint8), "label": np.zeros(3, np.float64)}, ["label.npy", "integers"]),
        ({"image": np.zeros((3, 4, 4, 3), np.uint8), "label": np.zeros(2, np.int64)}, ["2 labels for 3 images"]),
        ({"image": np.zeros((3, 4, 4, 3), np.uint8), "label": np.array([0, 2, -1])}, ["row 2", "label -1 is negative"]),
        ({"image": np.zeros((0, 4, 4, 3), np.uint8), "label": np.zeros(0, np.int64)}, ["empty"]),
        ({"image": np.array([None, 1, "x"], dtype=object), "label": np.zeros(3, np.int64)}, ["image.npy", "object"]),
        ({"image": np.zeros((3, 4, 4, 3), np.uint8), "label": np.array([0, 1, None], dtype=object)},
         ["label.npy", "object"]),
    ],
    ids=["no-label", "no-image", "float-images", "wrong-ndim", "float-labels", "length", "negative", "empty",
         "object-image", "object-label"],
)
def test_bad_npz_contents(tmp_path, arrays, parts):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    check_fails(tmp_path, InputSpec("npz", path), [path, *parts])


def test_npz_label_above_declared_num_classes(tmp_path):
    labels = np.array([0, 1, 2, 3, 4, 7, 1])
    path = make_npz(tmp_path / "l.npz", np.zeros((7, 4, 4, 3), np.uint8), labels)
    check_fails(tmp_path, InputSpec("npz", path, num_classes=5), [path, "row 5", "label 7", "[0, 4]"])


def test_cifar10_label_out_of_range_names_file_and_row(tmp_path):
    d, _ = write_cifar_py(tmp_path / "c", np.random.default_rng(7))
    data = planar_rows(np.random.default_rng(8), 4)
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": data, b"labels": [1, 2, 10, 3]}, f)
    check_fails(tmp_path, InputSpec("cifar10", d), [d / "data_batch_3", "row 2", "label 10"])
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": data.astype(np.float32), b"labels": [1, 2, 3, 3]}, f)
    check_fails(tmp_path, InputSpec("cifar10", d), [d / "data_batch_3", "uint8", "float32"])
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": data, b"labels": [1, 2, 3, 3]})[:-500])
    check_fails(tmp_path, InputSpec("cifar10", d), [d / "data_batch_3", "truncated"])
    (d / "data_batch_4").unlink()
    check_fails(tmp_path, InputSpec("cifar10", d), [d, "missing data_batch_4"])
    (tmp_path / "nothing").mkdir()
    check_fails(tmp_path, InputSpec("cifar10", tmp_path / "nothing"),
                [tmp_path / "nothing", "no CIFAR-10 train batches"])
    check_fails(tmp_path, InputSpec("cifar10", tmp_path / "absent"), [tmp_path / "absent", "not a directory"])


def test_truncated_cifar10_binary(tmp_path):
    _, batches = write_cifar_py(tmp_path / "c", np.random.default_rng(9))
    d = write_cifar_bin(tmp_path / "b", batches)
    raw = (d / "test_batch.bin").read_bytes()
    (d / "test_batch.bin").write_bytes(raw[:-100])
    check_fails(tmp_path, InputSpec("cifar10", d, split="test"), [d / "test_batch.bin", "row 3", "truncated"])


class EvilEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("evil", [EvilPickle, EvilEval])
@pytest.mark.parametrize("where", ["data_batch_2", "batches.meta"])
def test_malicious_cifar_pickle_is_refused_not_executed(tmp_path, evil, where):
    d, _ = write_cifar_py(tmp_path / "c", np.random.default_rng(10))
    marker = tmp_path / "pwned"
    with open(d / where, "wb") as f:
        pickle.dump({b"data": planar_rows(np.random.default_rng(0), 2), b"labels": [0, 1], b"x": evil(marker)}, f)
    check_fails(tmp_path, InputSpec("cifar10", d), [d / where, "refusing to unpickle"])
    assert not marker.exists()


def test_folder_errors(tmp_path):
    rng = np.random.default_rng(11)
    root = tmp_path / "mixed"
    write_folder(root, rng, per_class=(2, 2, 1))
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(root / "dog" / "zzz.png")
    check_fails(tmp_path, InputSpec("folder", root), [root / "dog" / "zzz.png", "mixed image sizes", "16x24", "32x32"])

    root = tmp_path / "unreadable"
    write_folder(root, rng, per_class=(1, 1, 1))
    (root / "cat" / "bad.png").write_bytes(b"not a png")
    check_fails(tmp_path, InputSpec("folder", root), [root / "cat" / "bad.png", "unreadable image"])

    root = tmp_path / "truncated"
    write_folder(root, rng, per_class=(1, 1, 1))
    raw = (root / "emu" / "000.png").read_bytes()
    (root / "emu" / "000.png").write_bytes(raw[: len(raw) // 2])  # header fine, pixel data cut
    check_fails(tmp_path, InputSpec("folder", root), [root / "emu" / "000.png", "unreadable image"])

    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    check_fails(tmp_path, InputSpec("folder", empty), [empty, "no images found"])


def test_folder_greyscale_becomes_rgb_and_classes_are_sorted(tmp_path):
    root = tmp_path / "f"
    for name in ("b", "a"):
        (root / name).mkdir(parents=True)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey, mode="L").save(root / "b" / "g.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(root / "a" / "c.png")
    (root / "a" / "notes.txt").write_text("ignored")
    info = convert([InputSpec("folder", root)], tmp_path / "p")
    assert info.num_classes == 2 and info.class_names == ["a", "b"] and info.image_shape == (8, 8, 3)
    _, table, images = read_pool(tmp_path / "p")
    assert table.column("label").to_pylist() == [0, 1]
    np.testing.assert_array_equal(images[1], np.stack([grey] * 3, -1))


def test_output_directory_rules(tmp_path):
    path = good_npz(tmp_path)
    out = tmp_path / "p"
    convert([InputSpec("npz", path)], out)
    expect_error([out, "already exists"], convert, [InputSpec("npz", path)], out)
    assert convert([InputSpec("npz", path, source="again")], out, overwrite=True).sources == {"again": 50}
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    expect_error([precious, "not a pool"], convert, [InputSpec("npz", path)], precious, overwrite=True)
    assert (precious / "thesis.tex").exists()
    expect_error(["inside the output directory"], convert, [InputSpec("npz", path)], tmp_path, overwrite=True)
    inside = out / "again.npz"
    inside.write_bytes(path.read_bytes())
    expect_error([inside, "inside the output directory"], convert, [InputSpec("npz", inside)], out, overwrite=True)
    assert inside.exists()
    expect_error(["no inputs"], convert, [], tmp_path / "q")
    with pytest.raises(PoolError, match="unknown input kind"):
        InputSpec("hdf5", path)


# ----------------------------------------------------------------------------- CLI


def test_cli_success_and_summary(tmp_path, capsys):
    rng = np.random.default_rng(12)
    cifar_dir, _ = write_cifar_py(tmp_path / "c", rng)
    npz = make_npz(tmp_path / "g.npz", rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 9))
    out = tmp_path / "pool"
    code = cli_main([str(out), "--cifar10", str(cifar_dir), "--cifar10-split", "test", "--npz", str(npz),
                     "--npz-source", "gen", "--rows-per-file", "5", "--log-level", "ERROR"])
    captured = capsys.readouterr()
    assert code == 0
    line = captured.out.strip()
    assert "\n" not in line
    assert "13 rows" in line and "3 file(s)" in line and "gen=9" in line and "real=4" in line and "32x32x3" in line
    assert read_pool_info(out).num_rows == 13


def test_cli_error_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    out = tmp_path / "pool"
    code = cli_main([str(out), "--npz", str(bad), "--log-level", "ERROR"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.startswith("rayprune-convert: error: ") and "\n" not in err
    assert str(bad) in err and "Traceback" not in err


def test_cli_needs_an_input_and_has_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main([str(tmp_path / "p")])
    assert exit_.value.code == 2 and "at least one input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "pool.json" in text and "Nothing is downloaded" in text and "--cifar10" in text


# ----------------------------------------------------------------------------- data safety


def refused(root, parts, fn, *args, **kwargs):
    """``fn`` raises one one-line PoolError naming every part; ``root``'s tree is byte-identical
    afterwards (no user file changed or removed, nothing left behind)."""
    before = tree_snapshot(root)
    msg = expect_error(parts, fn, *args, **kwargs)
    assert tree_snapshot(root) == before
    return msg


def test_a_one_class_pool_is_refused_before_writing(tmp_path):
    rng = np.random.default_rng(20)
    write_folder(tmp_path / "one", rng, classes=("cat",), per_class=(3,))
    refused(tmp_path, [tmp_path / "one", "has 1 class (cat)", "at least 2 classes", "--num-classes"],
            convert, [InputSpec("folder", tmp_path / "one")], tmp_path / "out")
    zeros = make_npz(tmp_path / "zeros.npz", np.zeros((4, 4, 4, 3), np.uint8), np.zeros(4, np.int64))
    refused(tmp_path, [zeros, "has 1 class", "at least 2 classes"], convert, [InputSpec("npz", zeros)],
            tmp_path / "out")
    refused(tmp_path, [zeros, "num_classes", "integer >= 2", "got 1"], InputSpec, "npz", zeros, num_classes=1)
    # declaring the classes the labels do not show is the way out
    assert convert([InputSpec("npz", zeros, num_classes=2)], tmp_path / "out").num_classes == 2
    assert read_pool_info(tmp_path / "out").num_classes == 2


def test_images_with_more_channels_than_a_pool_allows_are_refused_before_writing(tmp_path):
    five = make_npz(tmp_path / "five.npz", np.zeros((4, 4, 4, 5), np.uint8), np.array([0, 1, 0, 1]))
    refused(tmp_path, [five, "4x4x5", "C (channels) in 1..4"], convert, [InputSpec("npz", five)], tmp_path / "out")


def cli_refused(root, capsys, args, parts):
    """``rayprune-convert args`` exits 2 with exactly one stderr line, ``rayprune-convert: error:``
    naming every part, and ``root``'s tree is byte-identical afterwards."""
    before = tree_snapshot(root)
    code = cli_main([*args, "--log-level", "ERROR"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("rayprune-convert: error: "), lines
    for part in parts:
        assert str(part) in lines[0], f"{part!r} not in {lines[0]!r}"
    assert tree_snapshot(root) == before
    return lines[0]


def pool_with_npz(tmp_path, name="old"):
    """A pool at tmp_path/pool converted from a fresh npz named ``name``; returns (pool, npz)."""
    rng = np.random.default_rng(len(name))
    npz = make_npz(tmp_path / f"{name}.npz", rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8), np.arange(5) % 3)
    convert([InputSpec("npz", npz)], tmp_path / "pool", rows_per_file=2, overwrite=(tmp_path / "pool").exists())
    return tmp_path / "pool", npz


def test_overwrite_replaces_a_pool_with_the_new_one(tmp_path, capsys):
    pool, _ = pool_with_npz(tmp_path)
    new = make_npz(tmp_path / "new.npz", np.full((7, 4, 4, 3), 9, np.uint8), np.arange(7) % 2)
    assert cli_main([str(pool), "--npz", str(new), "--overwrite", "--log-level", "ERROR"]) == 0
    info, _, images = read_pool(pool)
    assert info.num_rows == 7 and (images == 9).all()
    assert sorted(os.listdir(pool)) == sorted(["pool.json", *info.files])
    assert sorted(os.listdir(tmp_path)) == ["new.npz", "old.npz", "pool"]  # no .partial, no .replaced left


def test_a_failed_overwrite_leaves_the_old_pool_intact(tmp_path, capsys):
    pool, _ = pool_with_npz(tmp_path)
    # image.npy promises 10 rows but holds 6: found only while rows are written
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10, 4, 4, 3)})
    label = io.BytesIO()
    np.save(label, np.arange(10) % 2)
    short = tmp_path / "short.npz"
    with zipfile.ZipFile(short, "w") as zf:
        zf.writestr("image.npy", buf.getvalue() + bytes(6 * 48))
        zf.writestr("label.npy", label.getvalue())
    cli_refused(tmp_path, capsys, [str(pool), "--npz", str(short), "--overwrite", "--rows-per-file", "2"],
                [short, "row 6", "truncated"])
    zeros = make_npz(tmp_path / "zeros.npz", np.zeros((3, 4, 4, 3), np.uint8), np.zeros(3, np.int64))
    cli_refused(tmp_path, capsys, [str(pool), "--npz", str(zeros), "--overwrite"], [zeros, "at least 2 classes"])


def foreign_entry(pool, kind):
    """Put something rayprune did not write into ``pool``; return the name an error must give."""
    listed = json.loads((pool / "pool.json").read_text())["files"]
    if kind == "file":
        (pool / "notes.txt").write_text("mine")
        return "notes.txt"
    if kind == "hidden":
        (pool / ".DS_Store").write_bytes(b"\0\1")
        return ".DS_Store"
    if kind == "folder":
        (pool / "plots").mkdir()
        (pool / "plots" / "fig.png").write_bytes(b"png")
        return "plots"
    if kind == "unlisted-part":
        (pool / "part-00099.parquet").write_bytes(b"an older file")
        return "part-00099.parquet"
    if kind == "fifo":
        os.mkfifo(pool / "pipe")
        return "pipe"
    if kind == "listed-is-a-dir":
        (pool / listed[0]).unlink()
        (pool / listed[0]).mkdir()
        (pool / listed[0] / "inside.txt").write_text("mine")
        return f"{pool / listed[0]} is not a regular file (a directory)"
    if kind == "listed-is-a-link":
        (pool / listed[0]).unlink()
        (pool / listed[0]).symlink_to(pool.parent / "old.npz")
        return f"{pool / listed[0]} is not a regular file (a symbolic link)"
    if kind == "bad-pool-json":
        meta = json.loads((pool / "pool.json").read_text())
        (pool / "pool.json").write_text(json.dumps({**meta, "num_classes": 0}))
        return "num_classes must be an integer >= 2"
    if kind == "no-pool-json":
        (pool / "pool.json").unlink()
        return f"not a pool (no pool.json; it holds {listed[0]!r})"
    raise AssertionError(kind)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["file", "hidden", "folder", "unlisted-part", "fifo", "listed-is-a-dir",
                                  "listed-is-a-link", "bad-pool-json", "no-pool-json"])
def test_overwrite_refuses_a_directory_holding_more_than_its_pool(tmp_path, capsys, kind):
    pool, _ = pool_with_npz(tmp_path)
    name = foreign_entry(pool, kind)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")  # refused before any input is read: the error is about OUT_DIR
    line = cli_refused(tmp_path, capsys, [str(pool), "--npz", str(garbage), "--overwrite"], [pool, name])
    assert "garbage.npz" not in line
    refused(tmp_path, [pool, name], convert, [InputSpec("npz", tmp_path / "old.npz")], pool, overwrite=True)


def test_overwrite_refuses_a_link_a_file_and_leftover_siblings(tmp_path, capsys):
    pool, npz = pool_with_npz(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(pool)
    cli_refused(tmp_path, capsys, [str(link), "--npz", str(npz), "--overwrite"], [link, "is a symbolic link"])
    (tmp_path / "afile").write_text("mine")
    cli_refused(tmp_path, capsys, [str(tmp_path / "afile"), "--npz", str(npz), "--overwrite"],
                [tmp_path / "afile", "not a directory (a regular file)"])
    (tmp_path / ".pool.replaced").mkdir()
    (tmp_path / ".pool.replaced" / "pool.json").write_text("{}")
    cli_refused(tmp_path, capsys, [str(pool), "--npz", str(npz), "--overwrite"], [tmp_path / ".pool.replaced"])
    (tmp_path / ".pool.replaced" / "pool.json").unlink()
    (tmp_path / ".pool.replaced").rmdir()
    (tmp_path / ".pool.partial").mkdir()
    (tmp_path / ".pool.partial" / "draft.txt").write_text("mine")
    cli_refused(tmp_path, capsys, [str(pool), "--npz", str(npz), "--overwrite"],
                [tmp_path / ".pool.partial", "not made by rayprune"])


def test_overwrite_of_an_empty_directory_and_without_the_flag(tmp_path, capsys):
    _, npz = pool_with_npz(tmp_path)
    cli_refused(tmp_path, capsys, [str(tmp_path / "pool"), "--npz", str(npz)], ["pool", "already exists",
                                                                                "--overwrite"])
    (tmp_path / "empty").mkdir()
    assert cli_main([str(tmp_path / "empty"), "--npz", str(npz), "--overwrite", "--log-level", "ERROR"]) == 0
    assert read_pool_info(tmp_path / "empty").num_rows == 5


# ----------------------------------------------------------------------------- inputs and output apart, empty paths


@pytest.mark.parametrize("option", ["OUT_DIR", "--cifar10", "--npz", "--folder"])
def test_an_empty_path_is_refused_naming_the_option(tmp_path, capsys, monkeypatch, option):
    monkeypatch.chdir(tmp_path)  # "" would otherwise mean this directory
    npz = good_npz(tmp_path)
    args = {"OUT_DIR": ["", "--npz", str(npz)], "--cifar10": ["pool", "--cifar10", ""],
            "--npz": ["pool", "--npz", str(npz), ""], "--folder": ["pool", "--folder", ""]}[option]
    cli_refused(tmp_path, capsys, [*args, "--overwrite"], [f"{option} is an empty path; give "])
    if option != "OUT_DIR":
        kind = option.removeprefix("--")
        refused(tmp_path, [f"the path of the {kind} input is empty"], InputSpec, kind, "")


def test_the_output_may_not_be_or_sit_inside_an_input(tmp_path, capsys):
    rng = np.random.default_rng(21)
    write_folder(tmp_path / "images", rng, per_class=(1, 1, 1))
    cifar, _ = write_cifar_py(tmp_path / "c", rng)
    npz = good_npz(tmp_path)
    (tmp_path / "link-to-images").symlink_to(tmp_path / "images")
    for out, args, parts in [
        (tmp_path / "images" / "pool", ["--folder", tmp_path / "images"], ["lies inside the folder input"]),
        (tmp_path / "link-to-images" / "new", ["--folder", tmp_path / "images"], ["lies inside the folder input"]),
        (cifar / "pool", ["--cifar10", cifar.parent], ["lies inside the cifar10 input"]),
        (npz, ["--npz", npz], ["is the npz input"]),
        (tmp_path / "images", ["--folder", tmp_path / "link-to-images"], ["is the folder input"]),
    ]:
        for overwrite in ([], ["--overwrite"]):
            cli_refused(tmp_path, capsys, [str(out), *map(str, args), *overwrite], [out, *parts])


def test_no_input_may_sit_inside_the_output_it_would_replace(tmp_path, capsys):
    pool, _ = pool_with_npz(tmp_path)
    inside = pool / "part-00000.parquet"
    (tmp_path / "link.npz").symlink_to(inside)  # an input reached through a link into OUT_DIR
    for given in (inside, tmp_path / "link.npz"):
        cli_refused(tmp_path, capsys, [str(pool), "--npz", str(given), "--overwrite"],
                    [given, "lies inside the output directory", pool])


# ----------------------------------------------------------------------------- inputs that are not regular files


@pytest.mark.timeout(60)
def test_npz_inputs_that_are_not_regular_files_are_named_never_opened(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.npz")
    (tmp_path / "dir.npz").mkdir()
    for given, parts in [(tmp_path / "pipe.npz", ["is not a regular file (a FIFO)", "expected an .npz file"]),
                         (tmp_path / "dir.npz", ["is not a regular file (a directory)", "expected an .npz file"]),
                         (tmp_path / "absent.npz", ["no such file", "expected an .npz file"])]:
        cli_refused(tmp_path, capsys, [str(tmp_path / "pool"), "--npz", str(given)], [given, *parts])
        refused(tmp_path, [given, *parts], convert, [InputSpec("npz", given)], tmp_path / "pool")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", ["py", "bin"])
def test_cifar10_inputs_that_are_not_regular_files_are_named_never_opened(tmp_path, capsys, version):
    py_dir, batches = write_cifar_py(tmp_path / "py", np.random.default_rng(22))
    d = py_dir if version == "py" else write_cifar_bin(tmp_path / "bin", batches)
    suffix = "" if version == "py" else ".bin"
    out = str(tmp_path / "pool")
    cli_refused(tmp_path, capsys, [out, "--cifar10", str(d / f"data_batch_1{suffix}")],
                [d / f"data_batch_1{suffix}", "not a directory (it is a regular file"])
    batch = d / f"data_batch_3{suffix}"
    batch.unlink()
    os.mkfifo(batch)
    cli_refused(tmp_path, capsys, [out, "--cifar10", str(d)], [batch, "is not a regular file (a FIFO)"])
    batch.unlink()
    batch.write_bytes((d / f"data_batch_1{suffix}").read_bytes())
    meta = d / ("batches.meta" if version == "py" else "batches.meta.txt")
    meta.unlink()
    os.mkfifo(meta)
    cli_refused(tmp_path, capsys, [out, "--cifar10", str(d)], [meta, "is not a regular file (a FIFO)"])


@pytest.mark.timeout(60)
def test_folder_inputs_that_are_not_regular_files_are_named_never_opened(tmp_path, capsys):
    root = tmp_path / "images"
    write_folder(root, np.random.default_rng(23), per_class=(1, 1, 1))
    os.mkfifo(root / "dog" / "001.png")
    cli_refused(tmp_path, capsys, [str(tmp_path / "pool"), "--folder", str(root)],
                [root / "dog" / "001.png", "is not a regular file (a FIFO)"])
    cli_refused(tmp_path, capsys, [str(tmp_path / "pool"), "--folder", str(root / "cat" / "000.png")],
                [root / "cat" / "000.png", "not a directory (it is a regular file"])


def test_class_and_file_counts_are_checked_up_front_naming_the_option(tmp_path, capsys):
    npz = good_npz(tmp_path)
    out = str(tmp_path / "pool")
    for value in ("1", "0", "-4"):
        cli_refused(tmp_path, capsys, [out, "--npz", str(npz), "--num-classes", value],
                    ["--num-classes must be >= 2", "at least 2 classes", f"got {value}"])
    cli_refused(tmp_path, capsys, [out, "--npz", str(npz), "--rows-per-file", "0"], ["--rows-per-file must be >= 1"])
    write_folder(tmp_path / "one", np.random.default_rng(24), classes=("cat",), per_class=(2,))
    cli_refused(tmp_path, capsys, [out, "--folder", str(tmp_path / "one")],
                [tmp_path / "one", "has 1 class (cat)", "at least 2 classes", "--num-classes"])
