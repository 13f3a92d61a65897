"""The Tracker: a job's MLflow runs (a parent, a child per stage), params, metrics, tags, artifacts.

Driver only (or Ray Train rank 0): SQLite allows one writer, and tracking is the driver's job.
Every call names its run through an explicit ``MlflowClient``, so MLflow's active-run stack
is never used and two trackers cannot leak runs into each other. Every MLflow call runs in
one guard (:meth:`Tracker._guard`), because tracking must not kill a long pruning job: unless
strict, the first failure warns once and turns tracking off, and MLflow's HTTP retries
(about 4 minutes against a dead server) are cut to :data:`SHORT_HTTP_POLICY` for each call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from rayprune.tracking import datasets, registry
from rayprune.tracking.figures import close_figure
from rayprune.tracking.registry import ModelRegistration

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

logger = logging.getLogger("rayprune.tracking")  # one logger for the package

T = TypeVar("T")

DEFAULT_EXPERIMENT = "rayprune"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

#: MLflow HTTP settings used for non-strict trackers (unless set in the environment):
#: a dead server costs about 3 s (connection refused) or 3 x 20 s (no answer) once, then
#: tracking is off.
SHORT_HTTP_POLICY: Mapping[str, str] = MappingProxyType({
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
})

#: MLflow 3's UI opens an experiment without a kind in its GenAI view (our runs listed as
#: "Evaluation runs"); this kind opens it as model training.
EXPERIMENT_TAGS: Mapping[str, str] = MappingProxyType({"mlflow.experimentKind": "custom_model_development"})

_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
_BATCH = 100  # params/tags per log_batch (MLflow allows 100 params, 1000 metrics)
_MAX_ERROR_CHARS = 500


class TrackingError(RuntimeError):
    """An MLflow call failed and the tracker is strict; the message names the URI."""


# ------------------------------------------------------------------------ helpers


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite file in the working directory.

    Absolute, because Ray workers run in other directories.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_artifact_root(uri: str) -> str | None:
    """``<directory of the database>/mlruns`` as a file URI for a SQLite store, else None.

    MLflow would otherwise put artifacts in ``./mlruns`` of whatever the working directory is.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlruns").as_uri()


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> ``{"a.b.c": "value"}`` as MLflow stores params.

    Lists and tuples become JSON (``["synthetic"]``), everything else ``str(value)``.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = str(value)
    return out


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables that are not already set; restore them afterwards."""
    added = [k for k in values if k not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# ------------------------------------------------------------------------ Tracker


class Tracker:
    """Record one job (or several, one after another) in an MLflow experiment.

    ``uri``: tracking URI; None = ``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``.
    ``strict``: raise :class:`TrackingError` on the first MLflow failure instead of
    warning once and carrying on without tracking.

    Not thread-safe: use one tracker from the driver thread (or Ray Train rank 0).
    Nothing touches the tracking server until :meth:`start_job`.
    """

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT, strict: bool = False) -> None:
        if not experiment:
            raise ValueError("experiment must be a non-empty name")
        self.uri: str = uri or default_tracking_uri()
        self.experiment: str = experiment
        self.strict: bool = strict
        self._client_obj: MlflowClient | None = None  # created lazily, inside the guard
        self._enabled = True
        self._experiment_id: str | None = None
        self._runs: list[str] = []  # parent run first, innermost open stage last
        self._http_policy: Mapping[str, str] = (
            {} if strict or not self.uri.startswith(("http://", "https://")) else SHORT_HTTP_POLICY
        )
        if self._http_policy:
            overridden = [k for k in self._http_policy if k in os.environ]
            logger.debug(
                "MLflow HTTP policy for %s during tracking calls (this process only): %s%s",
                self.uri, dict(self._http_policy),
                f"; kept from the environment: {overridden}" if overridden else "",
            )

    @classmethod
    def off(cls) -> Tracker:
        """A tracker that records nothing (tracking switched off by configuration)."""
        tracker = cls("sqlite:///:memory:")  # never contacted: every call is a no-op
        tracker._enabled = False
        return tracker

    # -------------------------------------------------------------- state

    @property
    def enabled(self) -> bool:
        """False once a non-strict tracker has hit an MLflow failure (all calls are no-ops)."""
        return self._enabled

    @property
    def run_id(self) -> str | None:
        """The innermost open run (the current stage, else the job), or None."""
        return self._runs[-1] if self._runs else None

    @property
    def job_run_id(self) -> str | None:
        """The parent run of the current job, or None."""
        return self._runs[0] if self._runs else None

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def _client(self) -> MlflowClient:
        # Building the client already opens the store (SQLite: creates the tables), which
        # can fail: only call this inside ``_guard``.
        if self._client_obj is None:
            self._client_obj = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client_obj

    # -------------------------------------------------------------- the guard

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Wrap the MLflow calls in the body: a failure warns once and turns tracking off, or
        raises :class:`TrackingError` if strict. Callers check that tracking is on first.
        """
        try:
            with _environ(self._http_policy):
                yield
        except Exception as exc:  # MLflow raises many types (MlflowException, OSError, SQL errors)
            message = f"MLflow tracking failed at {what} (tracking URI {self.uri}): {_short(exc)}"
            if self.strict:
                raise TrackingError(message) from exc
            self._enabled = False
            self._runs.clear()
            logger.warning("%s; the job continues without tracking", message)

    def _target(self) -> str | None:
        """The run to log to (the innermost open one); None when tracking is off."""
        if not self._enabled:
            return None
        if not self._runs:
            raise RuntimeError("no job is running: call Tracker.start_job first")
        return self._runs[-1]

    # -------------------------------------------------------------- runs

    def _ensure_experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        client = self._client
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                experiment_id = client.create_experiment(
                    self.experiment, artifact_location=sqlite_artifact_root(self.uri), tags=EXPERIMENT_TAGS
                )
            except MlflowException:
                found = client.get_experiment_by_name(self.experiment)  # created concurrently
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
            for key, value in EXPERIMENT_TAGS.items():  # an experiment made before the tag: add, never change
                if key not in found.tags:
                    client.set_experiment_tag(experiment_id, key, value)
        self._experiment_id = experiment_id
        return experiment_id

    def start_job(
        self,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Start the job's parent run; ``params`` (nested config) are logged flattened.

        Returns the run id, or None when tracking is off.
        """
        if self._enabled and self._runs:
            raise RuntimeError(f"a job is already running (run {self._runs[0]}); call end_job first")
        flat = self._checked_params(params or {})
        if not self._enabled:
            return None
        run_id = None
        with self._guard("start_job"):
            run = self._client.create_run(
                self._ensure_experiment(), run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()}
            )
            self._runs.append(run.info.run_id)
            self._log_params_now(run.info.run_id, flat)
            run_id = run.info.run_id
        if run_id is not None:
            logger.info("MLflow: job run %s in experiment %r at %s", run_id, self.experiment, self.uri)
        return run_id

    @contextmanager
    def stage(self, name: str) -> Iterator[str | None]:
        """A nested child run for one stage (tag ``stage=name``), timed as ``wall_seconds``.

        Yields the child's run id (None when tracking is off). An exception in the body
        marks the child FAILED and propagates.
        """
        parent = self._target()
        run_id = None
        if parent is not None:
            with self._guard(f"stage {name!r} (start)"):
                run = self._client.create_run(
                    self._ensure_experiment(), run_name=name, tags={MLFLOW_PARENT_RUN_ID: parent, "stage": name}
                )
                self._runs.append(run.info.run_id)
                run_id = run.info.run_id
        start = time.perf_counter()
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            seconds = time.perf_counter() - start
            if run_id is not None and self._enabled:
                with self._guard(f"stage {name!r} (end)"):
                    self._client.log_metric(run_id, "wall_seconds", seconds, timestamp=_now_ms())
                    self._client.set_terminated(run_id, status)
                    if self._runs and self._runs[-1] == run_id:
                        self._runs.pop()

    def end_job(self, status: str = "FINISHED") -> None:
        """Close open stage runs and the job's parent run with ``status``."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}; got {status!r}")
        if not self._enabled or not self._runs:
            return
        with self._guard("end_job"):
            while self._runs:
                self._client.set_terminated(self._runs[-1], status)
                self._runs.pop()

    # -------------------------------------------------------------- params, metrics, tags

    @staticmethod
    def _checked_params(params: Mapping[str, Any]) -> dict[str, str]:
        flat = flatten_params(params)
        for key, value in flat.items():
            if len(value) > _MAX_PARAM_VALUE:
                logger.warning("param %s is %d characters long; MLflow keeps the first %d",
                               key, len(value), _MAX_PARAM_VALUE)
                flat[key] = value[:_MAX_PARAM_VALUE]
        return flat

    def _log_params_now(self, run_id: str, flat: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in flat.items()]
        for chunk in _chunks(items, _BATCH):
            self._client.log_batch(run_id, params=list(chunk), synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested, flattened) params to the current run."""
        run_id = self._target()
        if run_id is None:
            return
        flat = self._checked_params(params)
        with self._guard("log_params"):
            self._log_params_now(run_id, flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics to the current run (the innermost open stage, else the job)."""
        run_id = self._target()
        if run_id is None:
            return
        stamp = _now_ms()
        try:
            items = [Metric(str(k), float(v), stamp, int(step or 0)) for k, v in metrics.items()]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metric values must be numbers; got {dict(metrics)!r}") from exc
        with self._guard("log_metrics"):
            for chunk in _chunks(items, 1000):
                self._client.log_batch(run_id, metrics=list(chunk), synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the current run."""
        run_id = self._target()
        if run_id is None:
            return
        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        with self._guard("set_tags"):
            for chunk in _chunks(items, _BATCH):
                self._client.log_batch(run_id, tags=list(chunk), synchronous=True)

    # -------------------------------------------------------------- datasets

    def log_dataset(
        self,
        name: str,
        *,
        digest: str,
        source: str,
        context: str,
        num_rows: int,
        schema: Mapping[str, str] | None = None,
        preview: pd.DataFrame | None = None,
    ) -> None:
        """Record a dataset as an input of the current run (e.g. pool, scored subset, pruned pool).

        ``digest`` is stored as given (at most 36 characters, MLflow's limit) and is what
        MLflow shows. ``preview``: a few rows or a summary table (no image bytes needed);
        ``num_rows`` is the size of the whole dataset and goes into the profile.
        ``schema``: column -> type name (int64, string, binary, float32, ...); without it
        the preview's schema is recorded.
        """
        run_id = self._target()
        if run_id is None:
            return
        datasets.check_digest(digest)
        columns = datasets.column_specs(schema) if schema is not None else None
        with self._guard(f"log_dataset {name!r}"):
            entry = datasets.dataset_input(name, digest=digest, source=source, context=context, num_rows=num_rows,
                                           columns=columns, preview=preview)
            self._client.log_inputs(run_id, datasets=[entry])

    # -------------------------------------------------------------- artifacts

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file or a directory to the current run's artifacts."""
        run_id = self._target()
        if run_id is None:
            return
        local = Path(path)
        if not local.exists():
            logger.warning("not logging artifact %s: it does not exist", local)
            return
        with self._guard(f"log_artifact {local.name!r}"):
            if local.is_dir():
                self._client.log_artifacts(run_id, str(local), artifact_path)
            else:
                self._client.log_artifact(run_id, str(local), artifact_path)

    def log_figure(self, fig: Figure, name: str) -> None:
        """Save a matplotlib figure as artifact ``name`` (e.g. ``figures/scores.png``), then close it."""
        try:
            run_id = self._target()
            if run_id is not None:
                with self._guard(f"log_figure {name!r}"):
                    self._client.log_figure(run_id, fig, name)
        finally:
            close_figure(fig)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """Save a dict as a JSON or YAML artifact (by the extension of ``name``)."""
        run_id = self._target()
        if run_id is None:
            return
        with self._guard(f"log_dict {name!r}"):
            self._client.log_dict(run_id, dict(d), name)

    # -------------------------------------------------------------- model registry

    def register_model(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        input_example: np.ndarray,
        metric_name: str,
        metric_value: float,
        higher_is_better: bool = True,
        tags: Mapping[str, Any] | None = None,
        pip_requirements: Sequence[str] | None = None,
        description: str = "",
    ) -> ModelRegistration | None:
        """Log ``model`` to the current run and register it as a new version of ``name``.

        The version gets ``tags`` plus ``metric_name=metric_value``, alias ``candidate``, and
        alias ``champion`` if it beats the champion's metric (see
        :func:`~rayprune.tracking.registry.tag_and_promote`) and ``description``. What is
        logged is an eval-mode CPU copy exported as a graph (no pickle; loads without
        rayprune, see :func:`~rayprune.tracking.registry.log_model_version`), traced on
        ``input_example`` (a float32 NCHW batch of at least 2). ``pip_requirements``
        default: the installed versions of mlflow, numpy, pandas and torch.
        """
        run_id = self._target()
        if run_id is None:
            return None
        value = float(metric_value)
        if math.isnan(value):
            raise ValueError(f"metric_value for {metric_name} is NaN")
        version_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        version_tags[metric_name] = repr(value)
        if pip_requirements is None:
            pip_requirements = registry.model_requirements()

        with self._guard(f"register_model {name!r}"):
            version = registry.log_model_version(
                self._client, self.uri, self._ensure_experiment(), run_id, model,
                name=name, input_example=input_example, pip_requirements=pip_requirements,
                description=description,
            )
            becomes = registry.tag_and_promote(self._client, name, version, version_tags, metric_name, value,
                                               higher_is_better)
            return ModelRegistration(version, becomes)
        return None

    def find_model_version(self, name: str, tag: str, value: str) -> int | None:
        """The registered version of ``name`` whose tag ``tag`` equals ``value``, if any.

        Lets a rerun of the same job find the version it already registered.
        """
        if not self._enabled:
            return None
        with self._guard(f"find_model_version {name!r}"):
            return registry.find_version(self._client, name, tag, value)
        return None
