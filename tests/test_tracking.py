"""rayprune.tracking against a SQLite store, an unreachable server and a real MLflow server.

Every store lives in tmp_path; nothing is written to the working directory.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import free_port
from mlflow import MlflowClient

from rayprune.robust.models import build_model
from rayprune.tracking import (
    ModelRegistration,
    Tracker,
    TrackingError,
    figure_composition,
    figure_curves,
    figure_scatter,
    figure_score_distributions,
    flatten_params,
)

MODEL_NAME = "tiny-cnn"
CONFIG = {
    "output_dir": "outputs/demo",
    "pool": {"path": "", "prunable_sources": ["synthetic"], "demo": {"n_real": 150, "image_size": 8}},
    "train": {"epochs": 4, "lr": 0.1, "nesterov": True},
    "attack": {"norm": "linf", "eps": 8 / 255},
}
DIGEST = "0123456789abcdef"
LOSSES = [1.0, 0.6, 0.45]


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=3, in_channels=3, width=4)  # train mode


def run_fake_job(tracker: Tracker, tmp_path: Path, client: MlflowClient | None = None) -> dict:
    """A job shaped like the pipeline's; checks the registry between registrations if ``client``."""
    out: dict = {"models": {}, "registrations": []}
    out["job"] = tracker.start_job("fake-job", params=CONFIG, tags={"purpose": "test"})
    with tracker.stage("score_subset") as score_run:
        out["score_subset"] = score_run
        for step, loss in enumerate(LOSSES):
            tracker.log_metrics({"loss": loss, "robust_acc": 0.1 * step}, step=step)
        tracker.log_dataset(
            "scored subset", digest=DIGEST, source=str(tmp_path / "split" / "subset"), context="training",
            num_rows=120, schema={"id": "int64", "image": "binary", "label": "int64", "source": "string"},
            preview=pd.DataFrame({"id": [1, 2], "label": [0, 2], "source": ["synthetic"] * 2}),
        )
    with tracker.stage("select") as select_run:
        out["select"] = select_run
        for step in range(4):
            tracker.log_metrics({"kept": 100 + step}, step=step)
        tracker.log_params({"selection": {"keep_fraction": 0.4}})
        report = tmp_path / "summary.txt"
        report.write_text("kept 103 of 600\n")
        tracker.log_artifact(report, "reports")
        tracker.log_figure(figure_composition({"real": 150, "synthetic": 450}, {"real": 150, "synthetic": 180},
                                              "per source"), "figures/composition.png")
        tracker.log_dict({"kept": 103}, "summary.json")
    example = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    for seed, value in ((1, 0.3), (2, 0.2), (3, 0.5)):
        model = _tiny_model(seed)
        out["models"][seed] = model
        state = {k: v.clone() for k, v in model.state_dict().items()}
        reg = tracker.register_model(model, name=MODEL_NAME, input_example=example, metric_name="robust_acc",
                                     metric_value=value, tags={"pool_digest": DIGEST, "seed": seed})
        # The caller's model is untouched (mode and BatchNorm statistics).
        assert model.training
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        out["registrations"].append(reg)
        if client is not None and seed == 2:
            aliases = {k: int(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}
            assert aliases == {"candidate": 2, "champion": 1}  # 0.2 does not beat 0.3
    tracker.end_job("FINISHED")
    return out


def check_records(client: MlflowClient, out: dict, tracking_uri: str, monkeypatch, tmp_path: Path) -> None:
    """What a finished fake job must leave in the store."""
    job = client.get_run(out["job"])
    assert job.info.status == "FINISHED"
    assert job.info.run_name == "fake-job"
    assert job.data.tags["purpose"] == "test"
    assert job.data.params == flatten_params(CONFIG)
    assert job.data.params["pool.demo.n_real"] == "150"
    assert job.data.params["pool.prunable_sources"] == '["synthetic"]'
    assert job.data.params["attack.eps"] == str(8 / 255)

    children = client.search_runs([job.info.experiment_id], f"tags.mlflow.parentRunId = '{out['job']}'")
    assert {r.data.tags["stage"]: r.info.run_id for r in children} == {
        "score_subset": out["score_subset"], "select": out["select"]}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.metrics["wall_seconds"] >= 0

    loss = client.get_metric_history(out["score_subset"], "loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == list(enumerate(LOSSES))
    kept = client.get_metric_history(out["select"], "kept")
    assert sorted((m.step, m.value) for m in kept) == [(s, 100.0 + s) for s in range(4)]
    assert "loss" not in job.data.metrics  # metrics went to the innermost run
    assert client.get_run(out["select"]).data.params == {"selection.keep_fraction": "0.4"}

    inputs = client.get_run(out["score_subset"]).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert (dataset.name, dataset.digest) == ("scored subset", DIGEST)
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert '"num_rows": 120' in dataset.profile
    assert '"binary"' in dataset.schema

    assert {f.path for f in client.list_artifacts(out["select"])} >= {"reports", "figures", "summary.json"}
    assert [f.path for f in client.list_artifacts(out["select"], "reports")] == ["reports/summary.txt"]
    assert [f.path for f in client.list_artifacts(out["select"], "figures")] == ["figures/composition.png"]

    assert out["registrations"] == [ModelRegistration(1, True), ModelRegistration(2, False),
                                    ModelRegistration(3, True)]
    versions = {int(v.version): v for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}
    assert sorted(versions) == [1, 2, 3]
    for (version, value), seed in zip(((1, 0.3), (2, 0.2), (3, 0.5)), (1, 2, 3), strict=True):
        tags = versions[version].tags
        assert float(tags["robust_acc"]) == value
        assert tags["pool_digest"] == DIGEST and tags["seed"] == str(seed)
    aliases = {k: int(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()}
    assert aliases == {"candidate": 3, "champion": 3}
    logged = client.search_logged_models([job.info.experiment_id])
    assert len(logged) == 3 and {m.source_run_id for m in logged} == {out["job"]}

    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    loaded = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}@champion")
    assert not isinstance(loaded, type(out["models"][3]))  # an exported graph, not our class unpickled
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(7))  # another batch size than traced
    with torch.no_grad():
        assert torch.allclose(loaded(x), out["models"][3].eval()(x), atol=1e-6)
        assert not torch.allclose(loaded(x), out["models"][1].eval()(x))
    version = client.get_model_version(MODEL_NAME, "3")
    model_info = mlflow.models.get_model_info(version.source)
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "dl")))
             .rglob("*") if p.is_file()}
    assert "model.pt2" in files and not {"model.pth", "pickle_module_info.txt"} & files  # exported, not pickled
    (spec_in,), (spec_out,) = model_info.signature.inputs.inputs, model_info.signature.outputs.inputs
    assert (spec_in.type, spec_in.shape) == (np.dtype(np.float32), (-1, 3, 8, 8))
    assert (spec_out.type, spec_out.shape) == (np.dtype(np.float32), (-1, 3))
    assert "[0, 1]" in model_info.metadata["input"]
    experiment = client.get_experiment(job.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


#: Loads the champion in a fresh interpreter in which importing rayprune fails.
_LOAD_WITHOUT_RAYPRUNE = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "rayprune" or name.startswith("rayprune."):
            raise ImportError("rayprune is blocked in this test")
sys.meta_path.insert(0, Refuse())
sys.modules.pop("rayprune", None)
try:
    import rayprune  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the import block does not work")
import mlflow.pytorch, numpy as np, torch
model = mlflow.pytorch.load_model(sys.argv[1])
x = torch.from_numpy(np.load(sys.argv[2]))
np.save(sys.argv[3], model(x).detach().numpy())
assert not any(m == "rayprune" or m.startswith("rayprune.") for m in sys.modules)
"""


def test_the_registered_model_loads_without_rayprune_and_without_pickle(tmp_path, one_torch_thread):
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri=uri, experiment="test-rayprune", strict=True)
    tracker.start_job("job")
    model = _tiny_model(4).eval()
    example = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    tracker.register_model(model, name=MODEL_NAME, input_example=example, metric_name="robust_acc",
                           metric_value=0.4, description="a robust model")
    tracker.end_job("FINISHED")
    assert MlflowClient(uri).get_model_version(MODEL_NAME, "1").description == "a robust model"

    x = np.random.default_rng(1).random((3, 3, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = uri
    subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_RAYPRUNE, f"models:/{MODEL_NAME}@champion",
                    str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], check=True, cwd=tmp_path, env=env,
                   timeout=300)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-6)


def test_sqlite_job_is_recorded(tmp_path, monkeypatch, one_torch_thread):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri=uri, experiment="test-rayprune", strict=True)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    out = run_fake_job(tracker, tmp_path, MlflowClient(uri))
    assert tracker.enabled and tracker.run_id is None
    # No global MLflow state left behind: no active run, global URI restored.
    assert mlflow.active_run() is None
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before and mlflow.get_tracking_uri() != uri
    check_records(MlflowClient(uri), out, uri, monkeypatch, tmp_path)
    experiment = MlflowClient(uri).get_experiment_by_name("test-rayprune")
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()
    assert list((tmp_path / "mlruns").iterdir())


def test_unreachable_server_disables_tracking_once(tmp_path, caplog, one_torch_thread):
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(uri=uri)
    caplog.set_level(logging.WARNING)
    env_before = dict(os.environ)
    start = time.perf_counter()
    out = run_fake_job(tracker, tmp_path)
    assert time.perf_counter() - start < 30
    assert not tracker.enabled
    assert out["job"] is None and out["score_subset"] is None and out["registrations"] == [None] * 3
    ours = [r for r in caplog.records if r.name == "rayprune.tracking" and r.levelno >= logging.WARNING]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    message = ours[0].getMessage()
    assert message.startswith("MLflow tracking failed at start_job")
    assert uri in message and message.endswith("the job continues without tracking")
    assert dict(os.environ) == env_before  # the short HTTP policy was scoped to the calls


def test_unreachable_server_strict_raises(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    # Strict trackers keep MLflow's own retry policy (minutes); keep this test short.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(uri=uri, strict=True)
    with pytest.raises(TrackingError, match=f"start_job .*{uri}"):
        tracker.start_job("fake-job", params=CONFIG)


def test_misuse_is_an_error_not_a_tracking_failure(tmp_path):
    tracker = Tracker(uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(RuntimeError, match="start_job"):
        tracker.log_metrics({"a": 1.0})
    tracker.start_job("j")
    with pytest.raises(ValueError, match="digest"):
        tracker.log_dataset("pool", digest="x" * 40, source="/p", context="training", num_rows=1)
    with pytest.raises(ValueError, match="status"):
        tracker.end_job("DONE")
    tracker.end_job()
    assert tracker.enabled


def test_figures_render():
    rng = np.random.default_rng(0)
    figures = [
        figure_score_distributions(rng.random(50), np.append(rng.random(500), np.nan)),
        figure_scatter(rng.random(30), rng.random(30), "measured", "extrapolated", "probe"),
        figure_composition({"0": 10, "1": 12}, {"0": 5, "2": 1}, "per class"),
        figure_curves({"loss": [1.0, 0.5, 0.4], "robust_acc": [0.1, 0.2]}, "epoch"),
    ]
    for fig in figures:
        fig.canvas.draw()
        assert fig.get_axes()



@pytest.mark.parametrize("before", ["nothing set", "variables", "set in this process"])
def test_model_logging_scope_puts_back_the_global_uris(before, monkeypatch, tmp_path):
    # mlflow.pytorch.log_model only reads the process-wide URIs; registration switches them
    # for that call alone and must leave the caller's setting exactly as it was.
    from rayprune.tracking.registry import _global_uris

    ours, theirs, later = (f"sqlite:///{tmp_path / name}.db" for name in ("ours", "theirs", "later"))
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, "")  # so that monkeypatch restores the variable after the test
        monkeypatch.delenv(key)
        if before == "variables":
            monkeypatch.setenv(key, theirs)
    try:
        if before == "set in this process":
            mlflow.set_tracking_uri(theirs)
            mlflow.set_registry_uri(theirs)
        state = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"),
                 os.environ.get("MLFLOW_REGISTRY_URI"))
        with _global_uris(ours):
            assert mlflow.get_tracking_uri() == ours and mlflow.get_registry_uri() == ours
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"),
                os.environ.get("MLFLOW_REGISTRY_URI")) == state
        # Whatever was in force still is: a variable set later wins only over a variable.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", later)
        assert mlflow.get_tracking_uri() == (theirs if before == "set in this process" else later)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.mark.slow
def test_real_mlflow_server(mlflow_server, tmp_path, monkeypatch, one_torch_thread):
    uri, artifacts = mlflow_server
    tracker = Tracker(uri=uri, experiment="test-rayprune", strict=True)
    client = MlflowClient(uri)
    out = run_fake_job(tracker, tmp_path, client)
    check_records(client, out, uri, monkeypatch, tmp_path)
    assert any(artifacts.rglob("composition.png"))


def test_failed_stage_and_failure_mid_job(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri=uri)
    job = tracker.start_job("j", params={"a": {"b": 1}})
    with pytest.raises(ZeroDivisionError), tracker.stage("broken") as broken:
        raise ZeroDivisionError("stage body failed")
    client = MlflowClient(uri)
    assert client.get_run(broken).info.status == "FAILED"
    assert "wall_seconds" in client.get_run(broken).data.metrics
    assert tracker.run_id == job

    def store_down(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("database is locked")

    caplog.set_level(logging.WARNING)
    with tracker.stage("later") as later:
        tracker._client.log_batch = store_down  # the store fails from here on
        tracker.log_metrics({"x": 1.0}, step=0)
        tracker.log_metrics({"x": 2.0}, step=1)  # no-op, no second warning
        tracker.log_figure(figure_curves({"x": [1.0, 2.0]}, "epoch"), "curves.png")
    tracker.end_job()
    assert not tracker.enabled and later is not None
    ours = [r.getMessage() for r in caplog.records if r.name == "rayprune.tracking"]
    assert ours == [(f"MLflow tracking failed at log_metrics (tracking URI {uri}): MlflowException: "
                     f"database is locked; the job continues without tracking")]
    assert client.get_run(job).info.status == "RUNNING"  # nothing more was sent
