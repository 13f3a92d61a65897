"""Registered models: log a model version, tag it, and move the candidate/champion aliases.

Functions of an explicit ``MlflowClient``; :meth:`rayprune.tracking.Tracker.register_model`
calls them inside its guard. ``mlflow.pytorch.log_model`` is the one MLflow call here that
has no URI argument: :func:`_global_uris` points the process-wide URIs at the tracker's
store for that call only.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import mlflow
from mlflow import MlflowClient

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

logger = logging.getLogger("rayprune.tracking")  # one logger for the package

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"

#: Packages pinned in a registered model's requirements (MLflow's inference would find
#: the same list but spends ~4 s per model in a subprocess). Not rayprune: the model is an
#: exported graph (pt2) that loads without it.
_MODEL_REQUIREMENTS = ("mlflow", "numpy", "pandas", "torch")

#: What the registered model takes and returns, in its MLflow metadata and description.
MODEL_INPUT = "float32 images, NCHW, pixels in [0, 1] (normalisation is inside the model)"
MODEL_OUTPUT = "float32 logits, one row per image"

_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


class ModelRegistration(NamedTuple):
    """What :meth:`Tracker.register_model` created: the version and whether it is champion."""

    version: int
    is_champion: bool


def model_requirements() -> list[str]:
    """``dist==version`` for the installed packages of :data:`_MODEL_REQUIREMENTS`."""
    reqs = []
    for dist in _MODEL_REQUIREMENTS:
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return reqs


@contextmanager
def _global_uris(uri: str) -> Iterator[None]:
    """Make ``uri`` MLflow's process-wide tracking and registry URI, then put back what was there.

    Sets MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI for the body and restores them. A URI set
    in this process with ``mlflow.set_tracking_uri`` / ``set_registry_uri`` wins over those
    variables, so only then is it switched too, and set back to its value afterwards.
    """
    saved_env = {key: os.environ.get(key) for key in _URI_VARIABLES}
    saved_tracking, saved_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    os.environ.update(dict.fromkeys(_URI_VARIABLES, uri))
    switch_tracking = mlflow.get_tracking_uri() != uri
    switch_registry = mlflow.get_registry_uri() != uri
    try:
        if switch_tracking:
            mlflow.set_tracking_uri(uri)
        if switch_registry:
            mlflow.set_registry_uri(uri)
        yield
    finally:
        if switch_tracking:
            mlflow.set_tracking_uri(saved_tracking)
        if switch_registry:
            mlflow.set_registry_uri(saved_registry)
        for key, value in saved_env.items():  # last: set_*_uri also write these variables
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_model_version(
    client: MlflowClient,
    uri: str,
    experiment_id: str,
    run_id: str,
    model: torch.nn.Module,
    *,
    name: str,
    input_example: np.ndarray,
    pip_requirements: Sequence[str],
    description: str = "",
) -> int:
    """Log ``model`` as a logged model of run ``run_id`` and register it under ``name``; the version.

    What is logged is an eval-mode CPU copy exported with ``torch.export`` (MLflow's "pt2"
    format): a graph and its weights, no pickled code, so ``mlflow.pytorch.load_model``
    needs neither unpickling nor rayprune, and returns a module that maps a float32 NCHW
    batch (any batch size) to logits. The signature says so: a float32 tensor of shape
    (-1, C, H, W) in, (-1, classes) out. ``input_example`` (a float32 batch of at least 2,
    so the batch dimension is exported as dynamic) traces the graph.
    """
    import copy

    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    snapshot = copy.deepcopy(model).cpu().eval()
    example = np.ascontiguousarray(np.asarray(input_example, dtype=np.float32))
    if example.ndim != 4 or example.shape[0] < 2:
        raise ValueError(f"input_example must be an NCHW batch of at least 2 images; got shape {example.shape}")
    with torch.no_grad():
        n_outputs = snapshot(torch.from_numpy(example)).shape[1]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_outputs))]))
    logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    with _global_uris(uri):
        info = mlflow.pytorch.log_model(
            snapshot,
            name="model",
            input_example=example,
            signature=signature,
            registered_model_name=name,
            serialization_format="pt2",
            pip_requirements=list(pip_requirements),
            metadata={"input": MODEL_INPUT, "output": MODEL_OUTPUT},
            model_id=logged.model_id,
            run_id=run_id,
        )
    version = int(info.registered_model_version)
    if description:
        client.update_model_version(name, str(version), description=description)
    return version


def tag_and_promote(
    client: MlflowClient,
    name: str,
    version: int,
    tags: Mapping[str, str],
    metric_name: str,
    value: float,
    higher_is_better: bool,
) -> bool:
    """Tag the version, make it ``candidate``, and ``champion`` if it beats the current one.

    It becomes champion when ``name`` has none yet or ``value`` strictly beats the
    champion's ``metric_name`` tag (ties keep the old one). Returns whether it did.
    Not atomic: two jobs registering the same model at once may both see the old champion.
    """
    for key, tag_value in tags.items():
        client.set_model_version_tag(name, str(version), key, tag_value)
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, str(version))
    champion = client.get_registered_model(name).aliases.get(CHAMPION_ALIAS)
    becomes = champion is None or _beats(client, name, champion, metric_name, value, higher_is_better)
    if becomes:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    logger.info("MLflow: registered %s version %d (%s=%g)%s", name, version, metric_name, value,
                "; it is the champion" if becomes else f"; champion stays version {champion}")
    return becomes


def _beats(client: MlflowClient, name: str, champion: Any, metric_name: str, value: float,
           higher_is_better: bool) -> bool:
    """Whether ``value`` strictly beats the champion version's ``metric_name`` tag."""
    current = client.get_model_version(name, str(champion)).tags.get(metric_name)
    try:
        best = float(current)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        logger.warning("champion version %s of %s has no numeric %s tag (%r); it stays champion",
                       champion, name, metric_name, current)
        return False
    if math.isnan(best):
        return True
    return value > best if higher_is_better else value < best


def find_version(client: MlflowClient, name: str, tag: str, value: str) -> int | None:
    """The newest version of ``name`` whose tag ``tag`` equals ``value``, if any."""
    versions = client.search_model_versions(f"name = '{name}'")
    matches = [int(v.version) for v in versions if v.tags.get(tag) == value]
    return max(matches) if matches else None
