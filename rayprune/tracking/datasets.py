"""A pool, subset or test set as an MLflow dataset input, built with MLflow's public API.

The digest is rayprune's own (the stage digest, not a hash of the data), the profile holds
the full row count, and the schema is given by the caller: the images never pass through
the driver, so MLflow only ever sees a small preview table.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

MAX_DIGEST = 36  # MLflow's limit on a dataset digest

#: Column type names accepted in a schema -> MLflow column types.
_SCHEMA_TYPES: Mapping[str, str] = MappingProxyType({
    **dict.fromkeys(("int64", "long", "int"), "long"),
    **dict.fromkeys(("int32", "integer", "int16", "int8", "uint8", "uint16"), "integer"),
    **dict.fromkeys(("float64", "double"), "double"),
    **dict.fromkeys(("float32", "float"), "float"),
    **dict.fromkeys(("bool", "boolean"), "boolean"),
    **dict.fromkeys(("string", "str", "large_string", "utf8", "object"), "string"),
    **dict.fromkeys(("binary", "bytes", "large_binary"), "binary"),
    **dict.fromkeys(("datetime", "timestamp", "timestamp[ns]", "timestamp[us]", "timestamp[ms]"), "datetime"),
})


def check_digest(digest: str) -> None:
    if not digest or len(digest) > MAX_DIGEST:
        raise ValueError(f"digest must have 1 to {MAX_DIGEST} characters; got {digest!r}")


def column_specs(schema: Mapping[str, str]) -> list[dict[str, Any]]:
    """Column -> type name (int64, string, binary, float32, ...) as MLflow column specs."""
    out = []
    for column, typ in schema.items():
        mlflow_type = _SCHEMA_TYPES.get(str(typ).lower())
        if mlflow_type is None:
            raise ValueError(
                f"schema column {column!r} has type {typ!r}; allowed: {', '.join(sorted(_SCHEMA_TYPES))}"
            )
        out.append({"type": mlflow_type, "name": str(column), "required": True})
    return out


def dataset_input(
    name: str,
    *,
    digest: str,
    source: str,
    context: str,
    num_rows: int,
    columns: list[dict[str, Any]] | None,
    preview: pd.DataFrame | None,
) -> DatasetInput:
    """The input to log with ``MlflowClient.log_inputs``; contacts no server.

    ``columns`` (from :func:`column_specs`) replaces the schema MLflow infers from the
    preview; the profile is ``num_rows`` (the whole dataset) and the preview's length.
    """
    import mlflow.data
    import pandas as pd

    frame = preview if preview is not None else pd.DataFrame({"num_rows": [int(num_rows)]})
    with warnings.catch_warnings():
        # MLflow registers its local source twice and warns about the ambiguity.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        # ... and hints about integer columns in model signatures, irrelevant here.
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        fields = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest).to_dict()
    entity = Dataset(
        name=fields["name"],
        digest=fields["digest"],
        source_type=fields["source_type"],
        source=fields["source"],
        schema=json.dumps({"mlflow_colspec": columns}) if columns is not None else fields.get("schema"),
        profile=json.dumps({"num_rows": int(num_rows), "preview_rows": len(frame)}),
    )
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
