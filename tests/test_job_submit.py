"""`ray job submit -- python jobs/prune.py ...` against a real local Ray head."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, kill_process_group, tiny_job_flags
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "outputs", "mlruns", "mlflow.db"]


def wait_for_dashboard(head: subprocess.Popen, url: str, timeout: float) -> None:
    """Until the head's job API answers (``ray start --block`` never returns)."""
    deadline = time.monotonic() + timeout
    while True:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the Ray head's dashboard at {url} did not answer within {timeout} s"
        time.sleep(0.5)


def test_job_submit_runs_the_job_on_a_ray_head_and_tracks_to_an_mlflow_server(tmp_path, mlflow_server):
    """The cluster path end to end: ray job submit, MLFLOW_TRACKING_URI via the runtime env."""
    uri, _ = mlflow_server
    runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": {"MLFLOW_TRACKING_URI": uri}})
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    ray_cli = str(bin_dir / "ray")
    dashboard = free_port()
    start = [
        ray_cli, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--node-ip-address=127.0.0.1",
        f"--object-store-memory={300 * 2**20}", "--disable-usage-stats",
    ]
    # --block keeps the head's processes in this process group, so the test stops exactly
    # them (``ray stop`` would stop every Ray on the machine).
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    out = tmp_path / "job-out"
    try:
        wait_for_dashboard(head, f"http://127.0.0.1:{dashboard}", timeout=180)
        submit = [
            ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT),
            "--runtime-env-json", runtime_env, "--",
            "python", "jobs/prune.py", *tiny_job_flags(), "--tracking.enabled", "true", "--output-dir", str(out),
        ]
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    finally:
        kill_process_group(head.pid)
        head.wait()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr)
    assert "rayprune summary" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["pool_size"] == 600
    assert manifest["summary"]["scored"] == 90
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("rayprune")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.params["output_dir"] == str(out)
    assert client.get_registered_model("rayprune-robust").aliases["champion"] in (1, "1")
