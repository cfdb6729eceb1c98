"""The snapshot format, owned here: version directories, their metadata, TF Serving's warm-up.

A model directory (a TF Serving `model_base_path`, e.g. `RUN_DIR/snapshots/default/`) holds
one SavedModel per integer-named subdirectory; the highest number is the newest. A version
is a SavedModel with the `SIGNATURES` (written by `vae.export`, read by `vae.serving`) and
two extra assets:

- `assets.extra/aevb.json` (`METADATA_PATH`): the model's name, version, creation time,
  config and input shape, and whatever the writer adds (step, examples seen, reason, ...);
- `assets.extra/tf_serving_warmup_requests` (`WARMUP_PATH`): a TFRecord file of
  `tensorflow.serving.PredictionLog` protos, one `PredictRequest` per signature on a few
  valid rows, which TF Serving replays when it loads a version, so that the first real
  requests do not pay for the graph's initialisation.

These are the only files `vae` reads or writes. Nothing but the warm-up writer imports
TensorFlow, so paths and metadata can be checked before the slow import.

>>> import pathlib, tempfile
>>> model_dir = pathlib.Path(tempfile.mkdtemp())
>>> for name in ("9", "10", "tmp"):
...     (model_dir / name).mkdir()
...     (model_dir / name / "saved_model.pb").touch()
>>> [p.name for p in version_directories(model_dir)]       # by number, not by name
['9', '10']
>>> resolve_version(model_dir).name, resolve_version(model_dir / "9").name
('10', '9')
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tensorflow_serving.apis import prediction_log_pb2

    from vae.config import VAEConfig

__all__ = [
    "METADATA_PATH",
    "SAVED_MODEL_FILE",
    "SIGNATURES",
    "WARMUP_PATH",
    "read_metadata",
    "resolve_version",
    "version_directories",
    "version_number",
    "warmup_requests",
    "write_metadata",
    "write_warmup_requests",
]

SAVED_MODEL_FILE = "saved_model.pb"
# `saved_model-<digest>.pb`: a configuration's graph kept beside the versions (`vae.save`'s
# `graph_dir`), which their `saved_model.pb` are hard links to.
GRAPH_FILE_PREFIX = "saved_model-"
# The signatures every snapshot serves (see vae.export for their inputs and outputs).
SIGNATURES = ("serving_default", "encode", "decode", "elbo", "score", "sample")
METADATA_PATH = pathlib.Path("assets.extra") / "aevb.json"
WARMUP_PATH = pathlib.Path("assets.extra") / "tf_serving_warmup_requests"
# Rows per warm-up request: a batch, not a single example, like real traffic.
WARMUP_ROWS = 3


def version_directories(model_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The integer version directories of a model directory, oldest first ([] if none)."""
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        return []
    versions = [p for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()]
    return sorted(versions, key=lambda p: int(p.name))


def resolve_version(path: str | os.PathLike) -> pathlib.Path:
    """A SavedModel directory as given, or the newest version of a model directory.

    Raises:
        FileNotFoundError: `path` is neither (the message names it).
    """
    path = pathlib.Path(path)
    if (path / SAVED_MODEL_FILE).exists():
        return path
    versions = version_directories(path)
    if not versions:
        raise FileNotFoundError(
            f"{path} is neither a SavedModel directory nor a model directory with "
            "integer version subdirectories"
        )
    return versions[-1]


def version_number(version_dir: str | os.PathLike) -> int | None:
    """The version a SavedModel directory's name says (None for a non-integer name)."""
    name = pathlib.Path(version_dir).name
    return int(name) if name.isdigit() else None


def read_metadata(version_dir: str | os.PathLike) -> dict[str, Any]:
    """The `assets.extra/aevb.json` of a snapshot ({} for a SavedModel without one)."""
    path = pathlib.Path(version_dir) / METADATA_PATH
    return json.loads(path.read_text()) if path.exists() else {}


def write_metadata(
    version_dir: str | os.PathLike,
    model_name: str,
    version: int,
    config: VAEConfig,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Writes a snapshot's `assets.extra/aevb.json`; returns the document written."""
    document = {
        "model": model_name,
        "version": version,
        "created_unix_seconds": time.time(),
        "config": config.to_dict(),
        "input_shape": [None, config.input_dim],
        **metadata,
    }
    path = pathlib.Path(version_dir) / METADATA_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True))
    return document


def warmup_requests(
    input_dim: int, latent_dim: int, model_name: str, rows: int = WARMUP_ROWS
) -> list[prediction_log_pb2.PredictionLog]:
    """One `PredictionLog` (a `PredictRequest` of `rows` examples) per signature.

    The inputs are valid for either decoder: pixels 0, 1/2, 1, ... cycling, and z on a
    small grid; `sample` draws `rows` examples with seed 0.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    levels = np.array([0.0, 0.5, 1.0], dtype=np.float32)
    x = levels[(np.arange(rows)[:, None] + np.arange(input_dim)[None, :]) % len(levels)]
    z = np.linspace(-1.0, 1.0, rows * latent_dim, dtype=np.float32).reshape(rows, latent_dim)
    inputs = {name: {"x": x} for name in ("serving_default", "encode", "elbo", "score")}
    inputs["decode"] = {"z": z}
    inputs["sample"] = {"num_samples": np.int32(rows), "seed": np.int32(0)}
    logs = []
    for signature in SIGNATURES:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        for name, value in inputs[signature].items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        logs.append(
            prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
        )
    return logs


def write_warmup_requests(
    version_dir: str | os.PathLike, input_dim: int, latent_dim: int, model_name: str
) -> pathlib.Path:
    """Writes `warmup_requests(...)` to `version_dir/assets.extra/tf_serving_warmup_requests`."""
    import tensorflow as tf

    path = pathlib.Path(version_dir) / WARMUP_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
        for log in warmup_requests(input_dim, latent_dim, model_name):
            writer.write(log.SerializeToString())
    return path
