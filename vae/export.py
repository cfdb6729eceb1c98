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

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import tempfile
import threading

import tensorflow as tf

from vae.checkpoint_writer import write_checkpoint
from vae.config import VAEConfig
from vae.model import LAYERS, VAE
from vae.snapshot_format import GRAPH_FILE_PREFIX, SAVED_MODEL_FILE, SIGNATURES

EXPORT_SEED = (0, 0)


def _config_json(config: VAEConfig) -> tf.Variable:
    return tf.Variable(
        json.dumps(config.to_dict(), sort_keys=True), trainable=False, dtype=tf.string
    )


class ServingModule(tf.Module):
    """What a snapshot holds: the model's variables, its config and the signatures."""

    def __init__(self, model: VAE) -> None:
        super().__init__(name="aevb")
        self.model = model
        self.config_json = _config_json(model.config)
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
    """Writes snapshots of the models of one configuration, tracing their signatures once.

    Tracing six signatures costs seconds -- per model, were each exported on its own. The
    graph of a SavedModel does not depend on the values of its variables, so it is traced
    once, for a stand-in model of the configuration, and every snapshot is that graph
    (`saved_model.pb`, copied or hard-linked) plus the model's variables written under the
    names the graph restores them from: the files `tf.saved_model.save` would have written,
    in the time it takes to write the variables.
    """

    def __init__(self, config: VAEConfig) -> None:
        self.config = config
        module = ServingModule(VAE(config))
        with tempfile.TemporaryDirectory() as directory:
            tf.saved_model.save(module, directory, signatures=module.signatures())
            self._graph = (pathlib.Path(directory) / SAVED_MODEL_FILE).read_bytes()
        # Names the graph's file in a `graph_dir`: one name, one graph.
        self.graph_digest = hashlib.sha256(self._graph).hexdigest()[:16]

    def save(
        self, model: VAE, directory: str | os.PathLike, graph_dir: str | os.PathLike | None = None
    ) -> None:
        """Writes `model` (of this exporter's configuration) as a SavedModel into `directory`.

        With `graph_dir`, a directory on the same file system, the graph is written there
        once, as `saved_model-<digest>.pb`, and hard-linked into `directory`: a fleet's
        snapshots then share one copy of it (700 KB for 784-200-10, half the size of the
        model's variables). Where no link can be made (another file system, an object
        store) the graph is written into `directory`.
        """
        if dataclasses.replace(model.config, seed=0) != dataclasses.replace(self.config, seed=0):
            raise ValueError(f"this exporter writes models of {self.config}, not {model.config}")
        directory = pathlib.Path(directory)
        (directory / "variables").mkdir(parents=True, exist_ok=True)
        graph = directory / SAVED_MODEL_FILE
        if graph_dir is None or not self._link_graph(pathlib.Path(graph_dir), graph):
            graph.write_bytes(self._graph)
        # The object paths of `ServingModule`'s variables: the keys its graph restores.
        write_checkpoint(
            tf.train.Checkpoint(model=model, config_json=_config_json(model.config)),
            os.fspath(directory / "variables" / "variables"),
        )

    def _link_graph(self, graph_dir: pathlib.Path, target: pathlib.Path) -> bool:
        """Hard-links `target` to the graph's file in `graph_dir`, written there first
        (whole or not at all) if missing; False where that cannot be done."""
        shared = graph_dir / f"{GRAPH_FILE_PREFIX}{self.graph_digest}.pb"
        try:
            if not shared.exists():
                # Named by process and thread: two writers never share a staged file.
                staged = shared.with_name(
                    f"{shared.name}.{os.getpid()}.{threading.get_ident()}.tmp"
                )
                staged.write_bytes(self._graph)
                os.replace(staged, shared)
            os.link(shared, target)
        except OSError:  # another file system, one without links, a read-only directory
            return False
        return True


@functools.cache
def _exporter(config: VAEConfig) -> Exporter:
    return Exporter(config)


def exporter_for(config: VAEConfig) -> Exporter:
    """The `Exporter` of this process for `config` (whose seed does not enter the graph)."""
    return _exporter(dataclasses.replace(config, seed=0))


def save(
    model: VAE, directory: str | os.PathLike, graph_dir: str | os.PathLike | None = None
) -> None:
    """Writes `model` as a SavedModel with the signatures above into `directory`; with
    `graph_dir`, its graph is a hard link to one file there (see `Exporter.save`)."""
    exporter_for(model.config).save(model, directory, graph_dir)


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
