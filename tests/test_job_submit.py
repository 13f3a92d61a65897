"""`ray job submit -- python jobs/prune.py ...` against a real local Ray head."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import free_port, kill_process_group, tiny_job_flags
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", ".git", "outputs", "mlruns", "mlflow.db"]


def forget_current_cluster(gcs_port: int) -> None:
    """Remove the note `ray start` leaves for later ``ray.init()`` calls (the address of "the"
    cluster on this machine), but only if it still names the head this test started and stopped."""
    note = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        if note.read_text().strip().endswith(f":{gcs_port}"):
            note.unlink()
    except FileNotFoundError:
        pass


def test_job_submit_runs_the_job_on_a_ray_head_and_tracks_to_an_mlflow_server(tmp_path, mlflow_server):
    """The cluster path end to end: ray job submit, MLFLOW_TRACKING_URI via the runtime env."""
    uri, _ = mlflow_server
    runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": {"MLFLOW_TRACKING_URI": uri}})
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    ray_cli = str(bin_dir / "ray")
    dashboard, gcs_port = free_port(), free_port()
    start = [
        ray_cli, "start", "--head", f"--port={gcs_port}", "--num-cpus=2", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--node-ip-address=127.0.0.1",
        f"--object-store-memory={300 * 2**20}", "--disable-usage-stats",
        # Its own agent port: the default (52365) belongs to any other Ray on the machine, and an
        # agent that cannot bind it leaves the head with "No available agent to submit job".
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    # In a session of its own, so the head's processes share one process group that the test
    # stops exactly (``ray stop`` would stop every Ray on the machine). ``ray start``
    # returns once the head, its dashboard and its job agent are up.
    head_log = tmp_path / "ray-start.log"
    with head_log.open("wb") as log:  # a file, not a pipe: the head's daemons may keep inherited pipes open
        head = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "job-out"
    try:
        assert head.wait(timeout=180) == 0, head_log.read_text()[-3000:]
        submit = [
            ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT),
            "--runtime-env-json", runtime_env, "--",
            "python", "jobs/prune.py", *tiny_job_flags(), "--tracking.enabled", "true", "--output-dir", str(out),
        ]
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    finally:
        kill_process_group(head.pid)
        forget_current_cluster(gcs_port)
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
