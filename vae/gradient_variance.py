"""The variance of two estimators of the bound's gradient with respect to the encoder.

The paper's case for the reparameterisation trick (section 2.2): the usual Monte Carlo
gradient of E_q[f(z)] with respect to the recognition model's parameters phi, the
score-function (REINFORCE) estimator f(z) * grad log q(z|x), "exhibits very high variance";
the reparameterised one differentiates f(g(eps, x; phi)) with the noise eps held fixed.

Both estimate the gradient of the same bound, for the model's estimator:

- analytic KL (B): the reconstruction term E_q[log p(x|z)] is estimated, the KL term's
  gradient is exact in both;
- Monte Carlo KL (A): f(z) = log p(x, z) - log q(z|x) is estimated whole (the score-function
  form drops f's own dependence on phi, whose expectation E_q[grad log q] is zero).

`gradient_moments` draws the minibatch gradient `draws` times, each with new noise on the
same minibatch, and returns each encoder tensor's mean and elementwise variance. The
score-function estimator here has no baseline or control variate: the estimator the paper
compares with.

>>> import numpy as np
>>> from vae.config import VAEConfig
>>> model = VAE(VAEConfig(input_dim=6, latent_dim=2, hidden_dim=4))
>>> x = np.random.default_rng(0).integers(0, 2, (8, 6)).astype(np.float32)
>>> moments = gradient_moments(model, x, "reparameterized", draws=50, seed=0)
>>> moments["encoder_hidden/kernel"].variance.shape, len(moments)
((6, 4), 4)
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from vae.model import VAE, reparameterized_sample

tfd = tfp.distributions

GRADIENT_ESTIMATORS = ("reparameterized", "score_function")
ENCODER_LAYERS = ("encoder_hidden", "encoder_output")


@dataclasses.dataclass(frozen=True)
class GradientMoments:
    """Over the draws of one estimator: the mean gradient of a tensor and the variance of
    each of its elements."""

    mean: np.ndarray
    variance: np.ndarray

    @property
    def total_variance(self) -> float:
        """The trace of the estimator's covariance: the summed variance of the elements."""
        return float(self.variance.sum())


def encoder_variables(model: VAE) -> dict[str, tf.Variable]:
    """The recognition model's parameters phi, by `layer/weight`."""
    return {
        f"{layer}/{weight}": getattr(getattr(model, layer), weight)
        for layer in ENCODER_LAYERS
        for weight in ("bias", "kernel")
    }


def surrogate_bound(model: VAE, x: tf.Tensor, estimator: str, seed: tf.Tensor) -> tf.Tensor:
    """A scalar whose gradient with respect to phi is `estimator`'s estimate of the gradient
    of the minibatch's mean bound (one draw of z per example)."""
    q = model.posterior(x)
    z = reparameterized_sample(q, 1, seed)[0]
    if estimator == "score_function":
        z = tf.stop_gradient(z)
    log_px = model.likelihood(z).log_prob(x)
    if model.config.estimator == "analytic_kl":
        estimated, exact = log_px, -tfd.kl_divergence(q, model.prior())
    else:
        estimated = log_px + model.prior().log_prob(z) - q.log_prob(z)
        exact = tf.zeros_like(log_px)
    if estimator == "score_function":
        estimated = tf.stop_gradient(estimated) * q.log_prob(z)
    elif estimator != "reparameterized":
        raise ValueError(f"estimator must be one of {GRADIENT_ESTIMATORS}, got {estimator!r}")
    return tf.reduce_mean(estimated + exact)


def gradient_moments(
    model: VAE, x: np.ndarray, estimator: str, draws: int = 100, seed: int = 0
) -> dict[str, GradientMoments]:
    """Mean and elementwise variance, over `draws` independent draws of the noise, of
    `estimator`'s gradient of the bound of minibatch `x` with respect to each encoder tensor."""
    if estimator not in GRADIENT_ESTIMATORS:
        raise ValueError(f"estimator must be one of {GRADIENT_ESTIMATORS}, got {estimator!r}")
    if draws < 2:
        raise ValueError(f"a variance needs at least 2 draws, got {draws}")
    variables = encoder_variables(model)
    moments = _compiled_moments(model, estimator)
    x = tf.convert_to_tensor(x, tf.float32)
    sums, squares = moments(x, tf.constant(seed, tf.int32), tf.constant(draws, tf.int32))
    result = {}
    for name, total, square in zip(variables, sums, squares, strict=True):
        mean = total.numpy() / draws
        # The unbiased sample variance; clipped at 0 against rounding.
        variance = np.maximum(square.numpy() - draws * mean * mean, 0.0) / (draws - 1)
        result[name] = GradientMoments(mean, variance)
    return result


# One traced function per model and estimator, reused at every point of a benchmark
# (a trace of the draw loop costs seconds); weak keys, so the cache keeps no model alive.
_compiled: weakref.WeakKeyDictionary[VAE, dict[str, Any]] = weakref.WeakKeyDictionary()


def _compiled_moments(model: VAE, estimator: str) -> Any:
    functions = _compiled.setdefault(model, {})
    if estimator not in functions:
        model_ref = weakref.ref(model)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, model.config.input_dim], tf.float32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ]
        )
        def moments(
            x: tf.Tensor, seed: tf.Tensor, draws: tf.Tensor
        ) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
            variables = list(encoder_variables(model_ref()).values())
            sums = [tf.zeros(v.shape, tf.float64) for v in variables]
            squares = [tf.zeros(v.shape, tf.float64) for v in variables]
            for draw in tf.range(draws):
                with tf.GradientTape() as tape:
                    objective = surrogate_bound(model_ref(), x, estimator, tf.stack([seed, draw]))
                gradients = [tf.cast(g, tf.float64) for g in tape.gradient(objective, variables)]
                sums = [s + g for s, g in zip(sums, gradients, strict=True)]
                squares = [s + g * g for s, g in zip(squares, gradients, strict=True)]
            return sums, squares

        functions[estimator] = moments
    return functions[estimator]


__all__ = [
    "GRADIENT_ESTIMATORS",
    "GradientMoments",
    "encoder_variables",
    "gradient_moments",
    "surrogate_bound",
]
