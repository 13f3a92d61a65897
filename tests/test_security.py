"""Security: nothing untrusted is unpickled; output paths stay in the output directory;
local Ray keeps token auth."""

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
        (tmp_path / "pool.json").write_text(json.dumps({"num_rows": 1, "image_shape": [1, 1, 3], "num_classes": 2,
                                                        "sources": {"real": 1}, "files": [name]}))
        with pytest.raises(PoolError, match="plain names inside the pool"):
            read_pool_info(tmp_path)



# Runs in a fresh process with the product's defaults (token auth on, no RAY_ADDRESS):
# starts the job's local Ray, lists every new listening TCP socket of the processes it
# started (other programs on the machine may open sockets meanwhile), and tries to join
# the cluster from a second process that has no token.
_PROBE = """
import json, os, subprocess, sys
from rayprune.config import RaySection
from rayprune.stages.resources import connect

def listeners():
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":  # LISTEN
                    out[cols[9]] = cols[1]  # inode -> hex address:port
    return out

def parents():
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out[pid] = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue  # the process ended
    return out

def descendants():
    # This process and its descendants: the local Ray it starts, and nothing else on the
    # machine (another Ray, an MLflow server of a test running beside this one).
    tree, mine = parents(), {str(os.getpid())}
    grew = True
    while grew:
        new = {pid for pid, parent in tree.items() if parent in mine and pid not in mine}
        mine |= new
        grew = bool(new)
    return mine

def owners(inodes):
    named = {}
    for pid in descendants():
        try:
            name = open(f"/proc/{pid}/comm").read().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # the process ended
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # that descriptor closed meanwhile
            if link.startswith("socket:[") and link[8:-1] in inodes:
                named[link[8:-1]] = name
    return named

before = set(listeners().values())
connect(RaySection())
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
now = listeners()
new = {inode: addr for inode, addr in now.items() if addr not in before}
names = owners(set(new))
names.update(owners(set(new) - set(names)))  # a second look for sockets of processes that started meanwhile
new = {inode: addr for inode, addr in new.items() if inode in names}  # this probe's, not other programs'
dashboard_port = int(ray.init(ignore_reinit_error=True).dashboard_url.rsplit(":", 1)[1])
gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
joiner = f"import ray; ray.init(address='{ray.util.get_node_ip_address()}:{gcs_port}')"
env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
# One connection attempt: refused for the missing token, the client would otherwise retry
# for about 20 s before giving up with the same error.
env.update(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH="/nonexistent", RAY_NUM_REDIS_GET_RETRIES="1")
joined = subprocess.run([sys.executable, "-c", joiner], capture_output=True, text=True, env=env, timeout=120)
print(json.dumps({"listeners": [[addr, names.get(inode, "?")] for inode, addr in new.items()],
                  "dashboard_port": dashboard_port, "join_rc": joined.returncode, "join_err": joined.stderr[-600:]}))
ray.shutdown()
"""

LOOPBACK = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")
# Ray 2.60's own servers (GCS, raylet, object manager, core workers, agents). Their gRPC
# ports bind to every interface or the node IP whatever ray.init is given (127.0.0.1 is
# resolved to the node IP on purpose); token authentication is what guards them.
RAY_CORE = ("gcs_server", "raylet", "ray::", "python", "ray")


@pytest.mark.slow
def test_local_mode_keeps_token_auth_and_a_loopback_dashboard():
    """The job's local Ray: the dashboard (HTTP, no token) is on loopback only, every other
    listener belongs to Ray itself, and a client without the token cannot join."""
    import json
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux /proc")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    listeners = seen["listeners"]
    assert listeners, "no listening socket appeared: the probe saw nothing"
    dashboard = [addr for addr, _ in listeners if addr.endswith(f":{seen['dashboard_port']:04X}")]
    assert dashboard and all(addr.startswith(LOOPBACK) for addr in dashboard), listeners
    foreign = [(addr, name) for addr, name in listeners if not name.startswith(RAY_CORE)]
    assert not foreign, f"listeners not owned by Ray's own processes: {foreign}"
    assert seen["join_rc"] != 0, "a client without the token joined the job's local Ray"
    assert "AuthenticationError" in seen["join_err"] or "token" in seen["join_err"].lower(), seen["join_err"]
