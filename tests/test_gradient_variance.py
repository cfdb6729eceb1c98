"""vae.gradient_variance: the reparameterised and score-function gradients of the bound with
respect to the encoder estimate the same thing, the first with far less variance."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import vae
from vae.gradient_variance import encoder_variables, gradient_moments, surrogate_bound


@pytest.mark.parametrize("estimator", ["analytic_kl", "monte_carlo_kl"])
def test_both_estimators_are_unbiased_for_the_same_gradient(estimator: str) -> None:
    # A small model with weights large enough that z matters to the decoder.
    config = vae.VAEConfig(input_dim=6, latent_dim=2, hidden_dim=4, estimator=estimator)
    model = vae.VAE(config)
    rng = np.random.default_rng(1)
    for variable in model.trainable_variables:
        variable.assign(rng.normal(0.0, 0.5, variable.shape).astype(np.float32))
    x = rng.integers(0, 2, (8, 6)).astype(np.float32)
    draws = 4000
    reparameterized = gradient_moments(model, x, "reparameterized", draws=draws, seed=0)
    score = gradient_moments(model, x, "score_function", draws=draws, seed=1)
    for name, r in reparameterized.items():
        s = score[name]
        standard_error = np.sqrt((r.variance + s.variance) / draws)
        # Every element within 5 standard errors: ~40 elements, a false alarm ~1e-5.
        assert np.all(np.abs(r.mean - s.mean) <= 5 * standard_error + 1e-6), name
        assert np.all(s.variance > r.variance), name


def test_the_reparameterized_estimate_is_the_gradient_of_the_training_bound() -> None:
    """With estimator B, one reparameterised draw is the gradient the training step takes
    (`VAE.bound`'s, same seed), so the measured variance is that of our updates."""
    config = vae.VAEConfig(input_dim=6, latent_dim=2, hidden_dim=4)
    model = vae.VAE(config)
    x = tf.constant(np.random.default_rng(2).integers(0, 2, (5, 6)), tf.float32)
    variables = list(encoder_variables(model).values())
    seed = tf.constant([3, 4])
    with tf.GradientTape(persistent=True) as tape:
        surrogate = surrogate_bound(model, x, "reparameterized", seed)
        bound = tf.reduce_mean(model.bound(x, seed).elbo)
    np.testing.assert_allclose(float(surrogate), float(bound), rtol=1e-6)
    ours, training = tape.gradient(surrogate, variables), tape.gradient(bound, variables)
    for mine, theirs in zip(ours, training, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-7)


def test_the_score_function_estimator_varies_orders_of_magnitude_more_while_learning() -> None:
    """The paper's section 2.2 claim, on structured binary images before and after training."""
    prototypes = np.random.default_rng(0).random((5, 64)) > 0.6
    rng = np.random.default_rng(1)
    data = (prototypes[rng.integers(0, 5, 3000)] ^ (rng.random((3000, 64)) < 0.05)).astype(
        np.float32
    )
    trainer = vae.Trainer(vae.VAEConfig(input_dim=64, latent_dim=4, hidden_dim=32))
    for trained in (False, True):
        if trained:
            for batch in np.split(data, 30):
                trainer.train_step(batch)
        x = data[:100]
        reparameterized = gradient_moments(trainer.model, x, "reparameterized", draws=50)
        score = gradient_moments(trainer.model, x, "score_function", draws=50)
        for name, r in reparameterized.items():
            ratio = score[name].total_variance / r.total_variance
            assert ratio > 10, (trained, name, ratio)


def test_an_unknown_estimator_is_named_in_the_error() -> None:
    model = vae.VAE(vae.VAEConfig(input_dim=4, latent_dim=2, hidden_dim=4))
    with pytest.raises(ValueError, match=r"estimator must be one of .*'control_variate'"):
        gradient_moments(model, np.zeros((2, 4), np.float32), "control_variate")
    with pytest.raises(ValueError, match="at least 2 draws, got 1"):
        gradient_moments(model, np.zeros((2, 4), np.float32), "reparameterized", draws=1)
