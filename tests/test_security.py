"""Security (issue 6): nothing untrusted is unpickled; output paths stay in the output directory."""

import ast
from pathlib import Path

import pytest

from rayprune.errors import InputError
from rayprune.stages.common import Stage, output_path, safe_name

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("rayprune", "jobs", "benchmarks")


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Calls that could unpickle untrusted bytes, as ``file:line: what``.

    Flags ``torch.load`` without ``weights_only=True``, ``np.load``/``numpy.load``
    without ``allow_pickle=False``, any ``pickle``/``cloudpickle``/``dill``/``joblib``
    ``load``/``loads``, ``pd.read_pickle`` and ``yaml.load``/``yaml.unsafe_load``.
    (The CIFAR-10 reader's restricted ``Unpickler(...).load()`` is a method call on an
    instance, not one of these.)
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        module, attr = node.func.value.id, node.func.attr
        where = f"{filename}:{node.lineno}: {module}.{attr}"
        if module == "torch" and attr == "load" and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{where} without weights_only=True")
        elif module in ("np", "numpy") and attr == "load" and not _is_const(_keyword(node, "allow_pickle"), False):
            found.append(f"{where} without allow_pickle=False")
        elif module in ("pickle", "cloudpickle", "dill", "joblib") and attr in ("load", "loads"):
            found.append(f"{where} unpickles")
        elif (module, attr) in (("pd", "read_pickle"), ("pandas", "read_pickle"), ("yaml", "load"),
                                ("yaml", "unsafe_load"), ("yaml", "full_load")):
            found.append(f"{where} can build arbitrary objects")
    return found


def test_the_scanner_finds_unsafe_calls():
    bad = """
import torch, numpy as np, pickle, yaml
torch.load(p)
torch.load(p, weights_only=False)
np.load(p)
np.load(p, allow_pickle=True)
pickle.loads(b)
yaml.load(text)
"""
    assert len(unsafe_loads(bad)) == 6
    good = """
torch.load(p, map_location="cpu", weights_only=True)
np.load(p, allow_pickle=False)
yaml.safe_load(text)
_NumpyOnlyUnpickler(f, path).load()
"""
    assert unsafe_loads(good) == []


def test_nothing_untrusted_is_unpickled_anywhere_in_the_code():
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    problems = [hit for p in files for hit in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert problems == []


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".", "", ".hidden", "/abs", "a\\b", "x\0y", " pad"])
def test_unsafe_names_never_become_output_paths(tmp_path, name):
    with pytest.raises(InputError, match="cannot be used as a file name under the output directory"):
        safe_name(name, "run name")
    with pytest.raises(InputError):
        output_path(tmp_path, "ok", name)
    with pytest.raises(InputError):
        _ = Stage(name, tmp_path, "digest").dir
    assert list(tmp_path.iterdir()) == []


def test_safe_names_stay_inside(tmp_path):
    path = output_path(tmp_path, "score_subset", "dynamic_uncertainty-adv-w10-subset_scores.parquet")
    assert path.resolve().is_relative_to(tmp_path.resolve())
    assert Stage("select", tmp_path, "d").dir == tmp_path / "select"


def test_pool_file_names_cannot_leave_the_pool(tmp_path):
    import json

    from rayprune.data.pool import PoolError, read_pool_info

    for name in ("../../etc/passwd", "..", "sub/part.parquet", ""):
        (tmp_path / "pool.json").write_text(json.dumps({"num_rows": 1, "image_shape": [1, 1, 3], "num_classes": 1,
                                                        "sources": {"real": 1}, "files": [name]}))
        with pytest.raises(PoolError, match="plain names inside the pool"):
            read_pool_info(tmp_path)
