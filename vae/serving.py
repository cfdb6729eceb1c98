"""Consuming snapshots: `load` a SavedModel as NumPy functions.

`load(path)` takes a version directory, or a model directory (then its newest version), and
returns a `LoadedModel` whose methods take and return NumPy arrays:

    model = vae.load("runs/mnist/snapshots/default")
    mean, stddev = model.encode(x)          # q(z|x): [N, J] each
    probabilities = model.decode(z)         # decoder mean: [N, D]
    nats = model.score(x)                   # negative bound per example: the anomaly score
    draws = model.sample(16, seed=0)        # draws.z [16, J], draws.mean [16, D]

It runs the SavedModel's signatures through `tf.saved_model.load`, so it needs TensorFlow but
neither TensorFlow Probability nor the training code: this module does not import them.
(`vae.load_model` instead rebuilds a trainable `vae.VAE`.)
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from vae.config import VAEConfig
from vae.snapshot_format import SIGNATURES, read_metadata, resolve_version, version_number

__all__ = ["LoadedModel", "Samples", "load"]


class Samples(NamedTuple):
    """Draws from the prior, `z` [n, J], and the decoder's mean at each, `mean` [n, D]."""

    z: np.ndarray
    mean: np.ndarray


class LoadedModel:
    """A snapshot's signatures as NumPy functions (see the module docstring).

    Attributes:
        path: the version directory loaded.
        version: its integer version (None when the directory name is not an integer).
        config: the `VAEConfig` it was trained with.
        metadata: its `assets.extra/aevb.json` ({} when absent): step, examples seen, ...
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import tensorflow as tf

        self.path = resolve_version(path)
        self.version = version_number(self.path)
        self._module = tf.saved_model.load(os.fspath(self.path))
        missing = [name for name in SIGNATURES if name not in self._module.signatures]
        if missing:
            raise ValueError(f"{self.path} lacks the signatures {missing}: not an aevb snapshot")
        self.config = VAEConfig.from_dict(json.loads(self._module.config_json.numpy().decode()))
        self.metadata = read_metadata(self.path)
        self._tf = tf

    def __repr__(self) -> str:
        return f"LoadedModel({os.fspath(self.path)!r}, version={self.version})"

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def call(self, signature: str, **inputs: np.ndarray | int) -> dict[str, np.ndarray]:
        """Runs one signature by name on keyword inputs; returns its outputs by name."""
        if signature not in SIGNATURES:
            raise ValueError(f"unknown signature {signature!r}; one of {SIGNATURES}")
        function = self._module.signatures[signature]
        tensors = {name: self._tf.constant(value) for name, value in inputs.items()}
        return {name: value.numpy() for name, value in function(**tensors).items()}

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """`serving_default`: {"elbo": [N], "latent_mean": [N, J]} in one pass."""
        return self.call("serving_default", x=self._rows(x, self.input_dim, "x"))

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of q(z|x), [N, J] each."""
        out = self.call("encode", x=self._rows(x, self.input_dim, "x"))
        return out["latent_mean"], out["latent_stddev"]

    def decode(self, z: np.ndarray) -> np.ndarray:
        """The decoder's mean at z, [N, D]: pixel probabilities for a Bernoulli decoder."""
        return self.call("decode", z=self._rows(z, self.latent_dim, "z"))["mean"]

    def score(self, x: np.ndarray) -> np.ndarray:
        """The negative bound per example, [N], in nats: higher is more anomalous."""
        return self.call("score", x=self._rows(x, self.input_dim, "x"))["score"]

    def elbo(self, x: np.ndarray) -> np.ndarray:
        """The bound per example, [N] (`call("elbo", x=x)` also gives its two terms)."""
        return self.call("elbo", x=self._rows(x, self.input_dim, "x"))["elbo"]

    def sample(self, n: int, seed: int = 0) -> Samples:
        """`n` draws z ~ p(z) and the decoder's mean at each; deterministic per seed."""
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        out = self.call("sample", num_samples=np.int32(n), seed=np.int32(seed))
        return Samples(z=out["z"], mean=out["mean"])

    @staticmethod
    def _rows(values: np.ndarray, width: int, name: str) -> np.ndarray:
        rows = np.asarray(values, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != width:
            raise ValueError(f"{name} must be [N, {width}], got shape {rows.shape}")
        return rows


def load(path: str | os.PathLike) -> LoadedModel:
    """A `LoadedModel` of a version directory, or of the newest version of a model directory."""
    return LoadedModel(path)
