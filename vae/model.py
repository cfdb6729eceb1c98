"""The AEVB model: prior p(z), recognition model q(z|x) and generative model p(x|z).

Both networks are the paper's one-hidden-layer tanh MLPs (appendix C). The distributions are
TensorFlow Probability objects over plain `tf.Variable`s held by `tf.Module`s, so the model
checkpoints with `tf.train.Checkpoint` and exports to a SavedModel whose graph holds only core
TensorFlow ops (no `tfp.layers`, no Keras).

>>> import numpy as np
>>> model = VAE(VAEConfig(input_dim=6, latent_dim=2, hidden_dim=4))
>>> x = np.array([[0, 1, 1, 0, 1, 0]], np.float32)
>>> parts = model.bound(x, seed=[1, 2])
>>> bool(parts.elbo.numpy()[0] < 0)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from vae.config import VAEConfig

tfd = tfp.distributions


class BoundParts(NamedTuple):
    """Per-example estimates, in nats: elbo = reconstruction_log_likelihood - kl."""

    elbo: tf.Tensor
    reconstruction_log_likelihood: tf.Tensor
    kl: tf.Tensor


LAYERS = ("encoder_hidden", "encoder_output", "decoder_hidden", "decoder_output")
# The order of `VAE.parameters()`: that of `tf.Module.trainable_variables` (by attribute
# name), in which optimisers have always created their slots, so checkpoints written before
# models shared their compiled step still restore.
PARAMETER_ORDER = tuple(
    (layer, weight) for layer in sorted(LAYERS) for weight in ("bias", "kernel")
)


class Dense(tf.Module):
    """An affine map x @ kernel + bias; the product computed in `matmul_dtype`, the
    result float32."""

    def __init__(
        self,
        kernel: tf.Variable,
        bias: tf.Variable,
        name: str,
        matmul_dtype: tf.DType = tf.float32,
    ) -> None:
        super().__init__(name=name)
        self.kernel = kernel
        self.bias = bias
        self.matmul_dtype = matmul_dtype

    @classmethod
    def initialized(
        cls, in_dim: int, out_dim: int, stddev: float, rng: np.random.Generator, name: str
    ) -> Dense:
        """A layer with new variables drawn from N(0, stddev^2)."""
        with tf.name_scope(name):
            kernel = tf.Variable(
                rng.normal(0.0, stddev, (in_dim, out_dim)).astype(np.float32), name="kernel"
            )
            bias = tf.Variable(rng.normal(0.0, stddev, (out_dim,)).astype(np.float32), name="bias")
        return cls(kernel, bias, name)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        if self.matmul_dtype == tf.float32:
            return tf.matmul(x, self.kernel) + self.bias
        # Mixed precision: the product's inputs rounded, its gradients cast back to float32.
        product = tf.matmul(tf.cast(x, self.matmul_dtype), tf.cast(self.kernel, self.matmul_dtype))
        return tf.cast(product, tf.float32) + self.bias


class VAE(tf.Module):
    """Gaussian-latent VAE with a Bernoulli or Gaussian decoder.

    Encoder: h = tanh(W1 x + b1); [mu, log sigma^2] = W2 h + b2 (the paper's eq. 9-10).
    Decoder, Bernoulli: logits = W4 tanh(W3 z + b3) + b4.
    Decoder, Gaussian: [m, log sigma^2] = W4 tanh(W3 z + b3) + b4, mean = sigmoid(m), which
    keeps the means in (0, 1) as the paper does for Frey Face.
    """

    def __init__(
        self,
        config: VAEConfig,
        name: str = "vae",
        parameters: Sequence[tf.Variable] | None = None,
        matmul_dtype: tf.DType = tf.float32,
    ) -> None:
        """A model with new parameters drawn for `config.seed`, or on given `parameters`
        (in the order of `parameters()`): how one compiled training step serves the
        variables of every model of a configuration (see `vae.train`). The training step
        passes `config.precision` as `matmul_dtype`; everything else computes in float32."""
        super().__init__(name=name)
        self.config = config
        if parameters is not None:
            given = dict(zip(PARAMETER_ORDER, parameters, strict=True))
            for layer in LAYERS:
                kernel, bias = given[layer, "kernel"], given[layer, "bias"]
                setattr(self, layer, Dense(kernel, bias, layer, matmul_dtype))
            return
        # NumPy's generator makes initialisation identical on every platform for a seed.
        rng = np.random.default_rng(config.seed)
        d, h, j, s = config.input_dim, config.hidden_dim, config.latent_dim, config.init_stddev
        decoder_outputs = d if config.likelihood == "bernoulli" else 2 * d
        with self.name_scope:
            self.encoder_hidden = Dense.initialized(d, h, s, rng, "encoder_hidden")
            self.encoder_output = Dense.initialized(h, 2 * j, s, rng, "encoder_output")
            self.decoder_hidden = Dense.initialized(j, h, s, rng, "decoder_hidden")
            self.decoder_output = Dense.initialized(h, decoder_outputs, s, rng, "decoder_output")

    def parameters(self) -> list[tf.Variable]:
        """The weights in `PARAMETER_ORDER`, whether variables of this model or given ones."""
        return [getattr(getattr(self, layer), weight) for layer, weight in PARAMETER_ORDER]

    def prior(self) -> tfd.Distribution:
        """p(z) = N(0, I)."""
        return tfd.MultivariateNormalDiag(loc=tf.zeros([self.config.latent_dim]))

    def posterior(self, x: tf.Tensor) -> tfd.Distribution:
        """q(z|x): a diagonal Gaussian whose moments the encoder computes from x."""
        hidden = tf.tanh(self.encoder_hidden(x))
        mean, log_variance = tf.split(self.encoder_output(hidden), 2, axis=-1)
        return tfd.MultivariateNormalDiag(loc=mean, scale_diag=tf.exp(0.5 * log_variance))

    def likelihood(self, z: tf.Tensor) -> tfd.Distribution:
        """p(x|z), factorised over the D observed variables."""
        outputs = self.decoder_output(tf.tanh(self.decoder_hidden(z)))
        if self.config.likelihood == "bernoulli":
            return tfd.Independent(tfd.Bernoulli(logits=outputs, dtype=tf.float32), 1)
        mean_logits, log_variance = tf.split(outputs, 2, axis=-1)
        return tfd.Independent(
            tfd.Normal(loc=tf.sigmoid(mean_logits), scale=tf.exp(0.5 * log_variance)), 1
        )

    def decoder_mean(self, z: tf.Tensor) -> tf.Tensor:
        """E[x|z]: pixel probabilities (Bernoulli) or the squashed means (Gaussian)."""
        return self.likelihood(z).mean()

    def bound(self, x: tf.Tensor, seed: tf.Tensor | list[int]) -> BoundParts:
        """The SGVB estimate of the variational lower bound for each example of x.

        `seed` is a stateless seed (shape [2]): the same seed gives the same estimate within
        one execution mode, which is what makes checkpoint/restore and export round trips
        exact. (XLA's stateless sampler draws other numbers than TensorFlow's kernel for the
        same seed, so the compiled training step and an eager call differ in their z.)
        """
        x = tf.convert_to_tensor(x, tf.float32)
        samples = self.config.samples_per_example
        q = self.posterior(x)
        z = reparameterized_sample(q, samples, seed)  # [L, B, J]
        batch = tf.shape(x)[0]
        # One [L*B, J] matmul is faster than a batched one and the same for L = 1.
        flat_z = tf.reshape(z, [-1, self.config.latent_dim])
        flat_x = tf.tile(x, [samples, 1]) if samples > 1 else x
        log_px = tf.reshape(self.likelihood(flat_z).log_prob(flat_x), [samples, batch])
        reconstruction = tf.reduce_mean(log_px, axis=0)
        if self.config.estimator == "analytic_kl":
            kl = tfd.kl_divergence(q, self.prior())
        else:
            kl = tf.reduce_mean(q.log_prob(z) - self.prior().log_prob(z), axis=0)
        return BoundParts(reconstruction - kl, reconstruction, kl)

    def log_importance_weights(self, x: tf.Tensor, samples: int, seed: tf.Tensor) -> tf.Tensor:
        """log p(x, z_k) - log q(z_k|x) for z_k ~ q(z|x), shape [samples, B].

        Their log-mean-exp is the importance-sampled estimate of log p(x) (the paper's
        appendix D uses the same proposal q for its marginal-likelihood figures).
        """
        x = tf.convert_to_tensor(x, tf.float32)
        q = self.posterior(x)
        z = reparameterized_sample(q, samples, seed)  # [K, B, J]
        batch = tf.shape(x)[0]
        flat_z = tf.reshape(z, [-1, self.config.latent_dim])
        log_px = tf.reshape(
            self.likelihood(flat_z).log_prob(tf.tile(x, [samples, 1])), [samples, batch]
        )
        return log_px + self.prior().log_prob(z) - q.log_prob(z)

    def wake_sleep_objective(
        self, x: tf.Tensor, seed: tf.Tensor | list[int], real: tf.Tensor | None = None
    ) -> tf.Tensor:
        """What wake-sleep ascends (Hinton et al. 1995; the paper's baseline), as one scalar.

        Wake: log p(x, z) for z ~ q(z|x) held fixed, which moves only the decoder. Sleep:
        log q(z|x) for dreams z ~ p(z), x ~ p(x|z), as many as x has rows, held fixed, which
        moves only the encoder. Each is a mean: the wake term over the rows of x where `real`
        (all when None; False marks padding), the sleep term over the dreams.
        """
        x = tf.convert_to_tensor(x, tf.float32)
        wake_seed, dream_seed, observation_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3)
        )
        z = tf.stop_gradient(reparameterized_sample(self.posterior(x), 1, wake_seed)[0])
        wake = self.likelihood(z).log_prob(x) + self.prior().log_prob(z)
        if real is None:
            real = tf.ones_like(wake, tf.bool)
        # tf.where, not a product with the mask: a padded row must not turn inf into nan.
        wake = tf.reduce_sum(tf.where(real, wake, 0.0)) / tf.reduce_sum(tf.cast(real, tf.float32))
        dream_z = tf.random.stateless_normal(
            [tf.shape(x)[0], self.config.latent_dim], dream_seed, alg="philox"
        )
        dream_x = tf.stop_gradient(self.sample_observations(dream_z, observation_seed))
        sleep = tf.reduce_mean(self.posterior(dream_x).log_prob(dream_z))
        return wake + sleep

    def sample_observations(self, z: tf.Tensor, seed: tf.Tensor | list[int]) -> tf.Tensor:
        """x ~ p(x|z), drawn statelessly from `seed` (0/1 pixels from a Bernoulli decoder)."""
        likelihood = self.likelihood(z).distribution
        if self.config.likelihood == "bernoulli":
            probabilities = likelihood.probs_parameter()
            uniform = tf.random.stateless_uniform(tf.shape(probabilities), seed, alg="philox")
            return tf.cast(uniform < probabilities, tf.float32)
        noise = tf.random.stateless_normal(tf.shape(likelihood.loc), seed, alg="philox")
        return likelihood.loc + likelihood.scale * noise

    def prior_log_density(self) -> tf.Tensor:
        """log p(theta) under the MAP prior N(0, I), without its constant."""
        return -0.5 * tf.add_n([tf.reduce_sum(tf.square(v)) for v in self.parameters()])


def reparameterized_sample(
    q: tfd.MultivariateNormalDiag, samples: int, seed: tf.Tensor | list[int]
) -> tf.Tensor:
    """z = mean + stddev * eps with eps ~ N(0, I): `samples` draws from q, [samples, B, J].

    Distributed as `q.sample(samples, seed)`, but with the Philox generator named: left to
    choose, XLA on CPU takes one whose compiled code spent ~0.25 ms of a ~4 ms training step
    drawing the 2,000 numbers of a minibatch.
    """
    mean = q.mean()
    shape = tf.concat([[samples], tf.shape(mean)], axis=0)
    noise = tf.random.stateless_normal(shape, seed, alg="philox")
    return mean + q.stddev() * noise


def parameter_count(config: VAEConfig) -> int:
    """Number of scalar parameters of `VAE(config)`."""
    d, h, j = config.input_dim, config.hidden_dim, config.latent_dim
    decoder_outputs = d if config.likelihood == "bernoulli" else 2 * d
    return (d + 1) * h + (h + 1) * 2 * j + (j + 1) * h + (h + 1) * decoder_outputs


def train_flops_per_example(config: VAEConfig) -> float:
    """Multiply-add FLOPs (x2) of one example's forward and backward pass, matmuls only.

    Forward costs one multiply-add per weight and sample; backward costs two (weight gradient
    and input gradient) except for the first layer, whose input gradient is not needed.
    """
    d, h, j, samples = (
        config.input_dim,
        config.hidden_dim,
        config.latent_dim,
        config.samples_per_example,
    )
    decoder_outputs = d if config.likelihood == "bernoulli" else 2 * d
    encoder = d * h * 2 + h * 2 * j * 3
    decoder = samples * (j * h * 3 + h * decoder_outputs * 3)
    return 2.0 * (encoder + decoder)


__all__ = [
    "LAYERS",
    "VAE",
    "BoundParts",
    "parameter_count",
    "reparameterized_sample",
    "train_flops_per_example",
]
