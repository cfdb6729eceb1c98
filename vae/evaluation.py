"""Evaluation on a data set held in memory: the average bound and an estimate of log p(x).

The importance-sampled estimate uses the recognition model as proposal (the paper's
appendix D): log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x). By Jensen's
inequality its expectation lies between the bound and log p(x), and it tightens as K grows.

>>> import numpy as np
>>> from vae.config import VAEConfig
>>> model = VAE(VAEConfig(input_dim=6, latent_dim=2, hidden_dim=4))
>>> data = np.random.default_rng(0).integers(0, 2, (10, 6)).astype(np.float32)
>>> result = evaluate(model, data, importance_samples=100)
>>> result.examples, result.log_likelihood >= result.elbo - 1.0
(10, True)
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from vae.config import VAEConfig
from vae.model import VAE

DEFAULT_IMPORTANCE_SAMPLES = 5000
# Bounds the [samples, batch, D] tensors of the importance sampler to ~64 MB of float32.
MAX_ELEMENTS_PER_CHUNK = 16_000_000


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Averages over a data set, in nats per example."""

    elbo: float
    reconstruction_log_likelihood: float
    kl: float
    examples: int
    log_likelihood: float | None = None
    importance_samples: int = 0

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if self.log_likelihood is None:
            del values["log_likelihood"], values["importance_samples"]
        return values


def bound_per_example(
    model: VAE, data: np.ndarray, batch_size: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """The SGVB bound and its parts for every row of `data` (stateless seeds per batch)."""
    compiled = _compiled_bound(model)
    parts: dict[str, list[np.ndarray]] = {"elbo": [], "reconstruction_log_likelihood": [], "kl": []}
    for index, start in enumerate(range(0, len(data), batch_size)):
        batch = tf.convert_to_tensor(data[start : start + batch_size], tf.float32)
        result = compiled(batch, tf.constant([seed, index], tf.int32))
        for name in parts:
            parts[name].append(getattr(result, name).numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def importance_sampled_log_likelihood(
    model: VAE,
    data: np.ndarray,
    samples: int = DEFAULT_IMPORTANCE_SAMPLES,
    seed: int = 0,
    max_elements_per_chunk: int = MAX_ELEMENTS_PER_CHUNK,
) -> np.ndarray:
    """log p(x) estimated with `samples` importance samples, for every row of `data`.

    Samples are drawn in chunks and combined with a running log-sum-exp, so memory stays
    bounded by `max_elements_per_chunk` whatever K and the data size are.
    """
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    if len(data) == 0:
        raise ValueError("cannot estimate the log-likelihood of an empty data set")
    # The widest per-sample tensor is the decoder's output or its hidden layer.
    dim = max(model.config.input_dim, model.config.hidden_dim)
    examples_per_batch = max(1, min(len(data), max_elements_per_chunk // (dim * min(samples, 500))))
    samples_per_chunk = max(1, min(samples, max_elements_per_chunk // (dim * examples_per_batch)))
    compiled = _compiled_log_weights(model)
    results = []
    for batch_index, start in enumerate(range(0, len(data), examples_per_batch)):
        batch = tf.convert_to_tensor(data[start : start + examples_per_batch], tf.float32)
        running = np.full(len(batch), -np.inf)
        for chunk_index, first in enumerate(range(0, samples, samples_per_chunk)):
            count = min(samples_per_chunk, samples - first)
            seed_tensor = tf.constant([seed * 7919 + batch_index, chunk_index], tf.int32)
            log_weights = compiled(batch, count, seed_tensor).numpy().astype(np.float64)
            running = np.logaddexp(running, _logsumexp(log_weights))
        results.append(running - np.log(samples))
    return np.concatenate(results)


def evaluate(
    model: VAE,
    data: np.ndarray,
    importance_samples: int = 0,
    batch_size: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Average bound (and log-likelihood when importance_samples > 0) over `data`."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    parts = bound_per_example(model, data, batch_size=batch_size, seed=seed)
    log_likelihood = None
    if importance_samples > 0:
        log_likelihood = float(
            importance_sampled_log_likelihood(model, data, importance_samples, seed).mean()
        )
    return Evaluation(
        elbo=float(parts["elbo"].mean()),
        reconstruction_log_likelihood=float(parts["reconstruction_log_likelihood"].mean()),
        kl=float(parts["kl"].mean()),
        examples=len(data),
        log_likelihood=log_likelihood,
        importance_samples=importance_samples,
    )


def _logsumexp(values: np.ndarray) -> np.ndarray:
    peak = values.max(axis=0)
    return peak + np.log(np.exp(values - peak).sum(axis=0))


# Compiled once per model: a new tf.function per call would retrace at every evaluation,
# which periodic evaluation during training does thousands of times.
def bound_with_parameters(
    config: VAEConfig,
    parameters: Sequence[np.ndarray | tf.Variable],
    data: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """The SGVB bound of every row of `data` under a model of `config` whose parameters are
    `parameters` (in `VAE.parameters()` order).

    One scratch model, and so one compiled function, per config in a process: scoring the
    models of many keys (a fleet, each after its drift detection) compiles once, where
    `bound_per_example` on each key's own model would trace a function per model (~0.2 s).
    """
    with _scorers_lock:
        if config not in _scorers:
            _scorers[config] = (VAE(config, name="scorer"), threading.Lock())
        model, lock = _scorers[config]
    with lock:  # the scratch model's parameters are shared by every caller's threads
        for variable, value in zip(model.parameters(), parameters, strict=True):
            variable.assign(value)
        return bound_per_example(model, data, seed=seed)["elbo"]


_scorers: dict[VAEConfig, tuple[VAE, threading.Lock]] = {}
_scorers_lock = threading.Lock()


_compiled: weakref.WeakKeyDictionary[VAE, dict[str, tf.types.experimental.GenericFunction]] = (
    weakref.WeakKeyDictionary()
)


def _compiled_bound(model: VAE):
    functions = _compiled.setdefault(model, {})
    if "bound" not in functions:
        # Through a weak reference: the cache must not keep its own key alive.
        model_ref = weakref.ref(model)
        functions["bound"] = tf.function(
            lambda x, seed: model_ref().bound(x, seed),
            input_signature=[
                tf.TensorSpec([None, model.config.input_dim], tf.float32),
                tf.TensorSpec([2], tf.int32),
            ],
        )
    return functions["bound"]


def _compiled_log_weights(model: VAE):
    functions = _compiled.setdefault(model, {})
    if "log_weights" not in functions:
        model_ref = weakref.ref(model)
        functions["log_weights"] = tf.function(
            lambda x, samples, seed: model_ref().log_importance_weights(x, samples, seed),
            input_signature=[
                tf.TensorSpec([None, model.config.input_dim], tf.float32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([2], tf.int32),
            ],
        )
    return functions["log_weights"]


__all__ = [
    "DEFAULT_IMPORTANCE_SAMPLES",
    "Evaluation",
    "bound_per_example",
    "evaluate",
    "importance_sampled_log_likelihood",
]
