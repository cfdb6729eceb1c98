"""SavedModel export: the signatures other systems call, and the way back to a `VAE`.

Signatures (inputs and outputs are float32 unless said otherwise):

- `serving_default(x[N, D])` -> `elbo[N]`, `latent_mean[N, J]`
- `encode(x[N, D])` -> `latent_mean[N, J]`, `latent_stddev[N, J]`
- `decode(z[N, J])` -> `mean[N, D]` (pixel probabilities for a Bernoulli decoder; the
  squashed means for a Gaussian one, which also returns `stddev[N, D]`)
- `elbo(x[N, D])` -> `elbo[N]`, `reconstruction_log_likelihood[N]`, `kl[N]`
- `score(x[N, D])` -> `score[N]`, the negative bound: an anomaly score in nats
- `sample(num_samples: int32[], seed: int32[])` -> `z[n, J]`, `mean[n, D]`

The bound's Monte Carlo part uses the fixed stateless seed `EXPORT_SEED`, so a served model
gives the same score for the same request, and `model.bound(x, EXPORT_SEED)` reproduces it.
The graph holds core TensorFlow ops only: loading it needs neither TFP nor this package.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from vae.config import VAEConfig
from vae.model import VAE
from vae.snapshot_format import SIGNATURES

EXPORT_SEED = (0, 0)
LAYERS = ("encoder_hidden", "encoder_output", "decoder_hidden", "decoder_output")


class ServingModule(tf.Module):
    """What a snapshot holds: the model's variables, its config and the signatures."""

    def __init__(self, model: VAE) -> None:
        super().__init__(name="aevb")
        self.model = model
        self.config_json = tf.Variable(
            json.dumps(model.config.to_dict(), sort_keys=True), trainable=False, dtype=tf.string
        )
        x_spec = tf.TensorSpec([None, model.config.input_dim], tf.float32, name="x")
        z_spec = tf.TensorSpec([None, model.config.latent_dim], tf.float32, name="z")
        self.serving_default = tf.function(self._serving_default, input_signature=[x_spec])
        self.encode = tf.function(self._encode, input_signature=[x_spec])
        self.decode = tf.function(self._decode, input_signature=[z_spec])
        self.elbo = tf.function(self._elbo, input_signature=[x_spec])
        self.score = tf.function(self._score, input_signature=[x_spec])
        self.sample = tf.function(
            self._sample,
            input_signature=[
                tf.TensorSpec([], tf.int32, name="num_samples"),
                tf.TensorSpec([], tf.int32, name="seed"),
            ],
        )

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}

    def _bound(self, x: tf.Tensor):
        return self.model.bound(x, tf.constant(EXPORT_SEED, tf.int32))

    def _serving_default(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"elbo": self._bound(x).elbo, "latent_mean": self.model.posterior(x).mean()}

    def _encode(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        q = self.model.posterior(x)
        return {"latent_mean": q.mean(), "latent_stddev": q.stddev()}

    def _decode(self, z: tf.Tensor) -> dict[str, tf.Tensor]:
        likelihood = self.model.likelihood(z)
        outputs = {"mean": likelihood.mean()}
        if self.model.config.likelihood == "gaussian":
            outputs["stddev"] = likelihood.stddev()
        return outputs

    def _elbo(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._bound(x)._asdict()

    def _score(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"score": -self._bound(x).elbo}

    def _sample(self, num_samples: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        z = self.model.prior().sample(num_samples, seed=tf.stack([seed, 0]))
        return {"z": z, "mean": self.model.decoder_mean(z)}


class Exporter:
    """Writes snapshots of one model again and again, tracing its signatures only once.

    Tracing six signatures costs seconds; saving already traced ones a fraction of that,
    which is what keeps periodic snapshots from stalling training.
    """

    def __init__(self, model: VAE) -> None:
        self.model = model
        self._module = ServingModule(model)
        self._signatures = self._module.signatures()

    def save(self, directory: str | os.PathLike) -> None:
        tf.saved_model.save(self._module, os.fspath(directory), signatures=self._signatures)


def save(model: VAE, directory: str | os.PathLike) -> None:
    """Writes `model` as a SavedModel with the signatures above into `directory`."""
    Exporter(model).save(directory)


def load_model(directory: str | os.PathLike) -> VAE:
    """Rebuilds the in-memory `VAE` from a SavedModel written by `save`."""
    loaded = tf.saved_model.load(os.fspath(directory))
    config = VAEConfig.from_dict(json.loads(loaded.config_json.numpy().decode()))
    model = VAE(config)
    for layer in LAYERS:
        for weight in ("kernel", "bias"):
            source = getattr(getattr(loaded.model, layer), weight)
            getattr(getattr(model, layer), weight).assign(source)
    return model
