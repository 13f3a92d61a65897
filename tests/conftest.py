"""Shared test settings and helpers: Ray without token auth on loopback, the tiny job config,
a Ray head and an MLflow server as users start them, the blob data and small CNNs of the
attack tests, and the checks of one-line errors."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # torch is imported where it is used: most test files never load it
    import torch

# Tests start and stop many short-lived local clusters; the product keeps auth on.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s; a short test training run waits on
# several polls (start, reports, the end): about 7 s of every run, for nothing. Processes
# that tests start (Ray's own, `ray start`, the jobs) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Two of Ray Train's own services that no test reads: the preemption watcher (an actor
# process per run, for spot-instance notices) and its Prometheus metrics. Together about
# 3 CPU-seconds of every training run (measured over a tiny pipeline: 6 of 115).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
# The suite runs in two processes on as many cores (pyproject.toml), so a waiting OpenMP
# thread of torch takes a core another process needs: it sleeps instead of spinning.
# Measured over the whole suite in two processes: 1,485 busy CPU-seconds spinning, 1,329
# sleeping (781 s and 709 s of wall time). Set before any test imports torch; Ray's
# processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
    "final.train.epochs": 2,
    "final.train.steps_per_epoch": 3,
    "final.train.batch_size": 32,
    "final.val_size": 30,
    "final.val_attack_steps": 2,
    "evaluation.demo_test_size": 120,
    "evaluation.pgd_steps": 3,
    "evaluation.apgd_steps": 5,
    "evaluation.apgd_targets": 2,
    "evaluation.fab_steps": 5,
    "evaluation.fab_targets": 2,
    "evaluation.square_queries": 20,
    "tracking.enabled": "false",
}


#: The test files that take longest (minutes each: a pipeline or the benchmark suite on
#: Ray), longest first. They start first, so that the two test processes (pyproject.toml)
#: finish together instead of one starting a long file when the other is nearly done.
LONGEST_FILES = ("test_benchmarks.py", "test_pipeline.py", "test_faults.py", "test_multinode.py", "test_resume.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest test files first (:data:`LONGEST_FILES`), the rest in their usual order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


def job_flags(options: dict) -> list[str]:
    """Job options (dotted names) as command-line flags."""
    return [arg for key, value in options.items() for arg in (f"--{key}", str(value))]


def tiny_job_flags() -> list[str]:
    """TINY_JOB as command-line flags."""
    return job_flags(TINY_JOB)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and threads slow badly when cores are busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def process_group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid`` (Linux: read from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(entry))
    return members


def kill_process_group(pgid: int, timeout: float = 60) -> None:
    """SIGKILL every process of group ``pgid`` (a driver or ``ray start --block`` started with
    ``start_new_session=True``, and the Ray processes it started) and wait until they are gone.

    Unlike ``ray stop``, this never touches another Ray instance on the machine (a user's,
    a benchmark's, another test run's)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while (left := process_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes {left} of group {pgid} outlived SIGKILL for {timeout} s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_mlflow_server(directory: Path):
    """A real `mlflow server` on loopback with its stores in ``directory``; yields (tracking
    URI, artifact directory) once it answers, and stops the server's whole process group on exit."""
    with starting_mlflow_server(directory) as (uri, artifacts, wait_until_ready):
        wait_until_ready()
        yield uri, artifacts


@contextlib.contextmanager
def starting_mlflow_server(directory: Path):
    """:func:`running_mlflow_server` that yields as soon as the server is launched, with a
    function that waits until it answers: a caller can start other services (a Ray head)
    while the server starts (about 10 s here, mostly imports). Yields (tracking URI,
    artifact directory, wait_until_ready)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = directory / "mlflow-server.log"
    log = log_path.open("wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner workers
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{directory / 'srv.db'}",
         "--artifacts-destination", str(directory / "art")],
        cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    started = time.monotonic()

    def wait_until_ready() -> None:
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < started + 60, "mlflow server did not answer /health within 60 s"
            time.sleep(0.3)

    try:
        yield uri, directory / "art", wait_until_ready
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
        time.sleep(0.5)
        try:  # uvicorn's worker may outlive the leader for a moment
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback for one test; yields (tracking URI, artifact directory)."""
    with running_mlflow_server(tmp_path) as server:
        yield server


def forget_current_cluster(gcs_port: int) -> None:
    """Remove the note `ray start` leaves for later ``ray.init()`` calls (the address of "the"
    cluster on this machine), but only if it still names the head the caller started and stopped."""
    note = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        if note.read_text().strip().endswith(f":{gcs_port}"):
            note.unlink()
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def ray_head(directory: Path, num_cpus: int = 2, object_store_mib: int = 300):
    """A Ray head started with `ray start`, as a user starts one for `ray job submit`; yields
    (dashboard URL, GCS address) and stops exactly its processes on exit.

    It runs in a session of its own, so its processes share one process group that is
    killed on exit (``ray stop`` would stop every Ray on the machine). ``ray start``
    returns once the head, its dashboard and its job agent are up."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    dashboard, gcs_port = free_port(), free_port()
    start = [
        ray_cli, "start", "--head", f"--port={gcs_port}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--node-ip-address=127.0.0.1",
        f"--object-store-memory={object_store_mib * 2**20}", "--disable-usage-stats",
        # Its own agent port: the default (52365) belongs to any other Ray on the machine, and an
        # agent that cannot bind it leaves the head with "No available agent to submit job".
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    head_log = directory / "ray-start.log"
    with head_log.open("wb") as log:  # a file, not a pipe: the head's daemons may keep inherited pipes open
        head = subprocess.Popen(start, env=with_venv_path(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        assert head.wait(timeout=180) == 0, head_log.read_text()[-3000:]
        yield f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs_port}"
    finally:
        kill_process_group(head.pid)
        forget_current_cluster(gcs_port)


def with_venv_path() -> dict[str, str]:
    """This environment with the test interpreter's bin directory first on PATH (so `ray`,
    `mlflow` and `python` are the venv's, in the processes Ray starts too)."""
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


#: The type of ``blob_sampler``: ``sample(n, seed) -> (images, labels)``.
Sampler = Callable[[int, int], tuple["torch.Tensor", "torch.Tensor"]]


@pytest.fixture(scope="module")
def blob_sampler():
    """Four classes of 3x8x8 images: a class prototype plus Gaussian pixel noise.

    Returns ``sample(n, seed) -> (x, y)``; attack tests train tiny models on it.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1

    def sample(n: int, seed: int):
        gs = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 4, (n,), generator=gs)
        x = (0.5 + 0.12 * protos[y] + 0.15 * torch.randn(n, 3, 8, 8, generator=gs)).clamp(0, 1)
        return x, y

    return sample


@pytest.fixture(scope="module")
def sample_batch(blob_sampler):
    """256 blob images and labels, drawn with a seed no trained model has seen."""
    return blob_sampler(256, 3)


def seeded_generator(seed: int):
    """A torch.Generator seeded with ``seed``, for reproducible random starts in attack tests."""
    import torch

    return torch.Generator().manual_seed(seed)


def fit_small_cnn(sampler, n_samples: int, steps: int, pgd_from: int | None = None, pgd_eps: float = 2 / 255):
    """A width-8 SmallCNN after ``steps`` Adam steps on ``sampler`` data, in eval mode.

    With ``pgd_from``, every step from that one on trains on the batch's PGD-2 adversarial
    version (L-inf ``pgd_eps``, random start): light adversarial training.
    """
    import torch
    import torch.nn.functional as F

    from rayprune.robust.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = sampler(n_samples, 1)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        xb, yb = x[idx], y[idx]
        if pgd_from is not None and step >= pgd_from:
            xa = (xb + (2 * torch.rand(xb.shape, generator=g) - 1) * pgd_eps).clamp(0, 1)
            for _ in range(2):
                xa.requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), yb), xa)
                xa = xa.detach() + pgd_eps / 2 * grad.sign()
                xa = torch.min(torch.max(xa, xb - pgd_eps), xb + pgd_eps).clamp(0, 1)
            xb = xa.detach()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture
def no_ray_no_mlflow(monkeypatch):
    """Fail the test if the job gets as far as starting Ray or MLflow."""
    def forbidden(*_a, **_k):
        raise AssertionError("the job started Ray or MLflow: bad input got past the checks")

    monkeypatch.setattr("rayprune.stages.resources.connect", forbidden)
    monkeypatch.setattr("rayprune.tracking.job.make_tracker", forbidden)


def one_line_error(error: type[BaseException], parts, fn, *args, **kwargs) -> str:
    """``fn(*args, **kwargs)`` raises ``error`` with a one-line message containing every part;
    returns the message."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"
    return message


class EvilPickle:
    """Unpickling this runs ``touch <marker>``: a file that must never appear."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tree_snapshot(root: Path) -> dict[str, object]:
    """{path relative to ``root``: content} of everything under ``root``, hidden entries included.

    Regular files map to their bytes, directories to "<dir>", symbolic links to their target and
    anything else (FIFOs, sockets, devices) to its kind; non-regular files are never opened, so a
    FIFO cannot block. Comparing two snapshots shows any file changed, removed or left behind.
    """
    import stat

    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            key = str(path.relative_to(root))
            if stat.S_ISREG(mode):
                out[key] = path.read_bytes()
            elif stat.S_ISDIR(mode):
                out[key] = "<dir>"
            elif stat.S_ISLNK(mode):
                out[key] = f"<link to {os.readlink(path)}>"
            else:
                out[key] = f"<special {stat.S_IFMT(mode):o}>"
    return out
