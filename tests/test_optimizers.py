"""The optimisers against NumPy references of their update rules, and their checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import vae
from vae.config import UPDATE_CLIP_THRESHOLD
from vae.optimizers import (
    EPSILON,
    STEP_BOOST_HALF_LIFE_EXAMPLES,
    Adagrad,
    Adam,
    RMSProp,
    make_optimizer,
)

GRADIENTS = [np.array([2.0, -4.0, 0.5]), np.array([-1.0, 3.0, 0.25]), np.array([0.5, 0.5, -2.0])]


def run(optimizer_type, **kwargs) -> tuple[np.ndarray, tf.Module]:
    """Weights after the three GRADIENTS from [1, -1, 0], and the optimiser."""
    weights = tf.Variable([1.0, -1.0, 0.0])
    optimizer = optimizer_type([weights], **kwargs)
    for gradient in GRADIENTS:
        optimizer.apply_gradients([tf.constant(gradient, tf.float32)], batch_size=10)
    return weights.numpy(), optimizer


def test_adagrad_sums_squared_gradients_for_ever() -> None:
    theta, accumulator = np.array([1.0, -1.0, 0.0]), np.zeros(3)
    for g in GRADIENTS:
        accumulator += g**2
        theta -= 0.1 * g / (np.sqrt(accumulator) + EPSILON)
    weights, _ = run(Adagrad, learning_rate=0.1)
    np.testing.assert_allclose(weights, theta, rtol=1e-6)


def test_adagrad_half_life_halves_a_gradients_weight_every_half_life() -> None:
    half_life, batch = 20.0, 10
    decay = 0.5 ** (batch / half_life)
    theta, accumulator = np.array([1.0, -1.0, 0.0]), np.zeros(3)
    for g in GRADIENTS:
        accumulator = decay * accumulator + g**2
        theta -= 0.1 * g / (np.sqrt(accumulator) + EPSILON)
    weights, optimizer = run(Adagrad, learning_rate=0.1, half_life_examples=half_life)
    np.testing.assert_allclose(weights, theta, rtol=1e-6)
    np.testing.assert_allclose(optimizer.accumulators[0].numpy(), accumulator, rtol=1e-6)


def test_forgetting_adagrad_clips_the_steps_of_a_burst_as_adafactor_does() -> None:
    half_life, batch, lr = 1_000.0, 10, 0.1
    decay = 0.5 ** (batch / half_life)
    calm = np.array([0.01, -0.02, 0.015, 0.01])
    burst = np.array([1.0, -0.5, 2.0, 0.0])
    theta, accumulator, summed = np.zeros(4), np.zeros(4), 0.0
    weights = tf.Variable(np.zeros(4, np.float32))
    adagrad = Adagrad(
        [weights],
        learning_rate=lr,
        half_life_examples=half_life,
        update_clip_threshold=UPDATE_CLIP_THRESHOLD,
    )
    relative_rms = {}
    for t, g in enumerate([calm] * 200 + [burst, calm]):
        accumulator, summed = decay * accumulator + g**2, decay * summed + 1.0
        # The step's RMS in units of lr / sqrt(updates summed), capped at 1.
        relative_rms[t] = np.sqrt(np.mean(g**2 / accumulator) * summed)
        step = lr / max(1.0, relative_rms[t]) * g / (np.sqrt(accumulator) + EPSILON)
        theta -= step
        adagrad.apply_gradients([tf.constant(g, tf.float32)], batch_size=batch)
        np.testing.assert_allclose(weights.numpy(), theta, rtol=1e-4, atol=1e-7)
        if t == 200:
            burst_step = np.sqrt(np.mean(step**2)) * np.sqrt(summed) / lr
    # Steady gradients are not clipped; the burst would step ~9x further without the clip.
    assert max(relative_rms[t] for t in range(200)) == pytest.approx(1.0, abs=1e-9)
    assert relative_rms[200] > 8 and relative_rms[201] < 1
    assert burst_step == pytest.approx(UPDATE_CLIP_THRESHOLD)


def test_a_step_boost_multiplies_the_steps_and_relaxes_with_its_half_life() -> None:
    """Boosted by 3, the next step is 3x Adagrad's; the excess halves every
    STEP_BOOST_HALF_LIFE_EXAMPLES examples (here one minibatch of that many)."""
    plain_weights, boosted_weights = tf.Variable([0.0, 0.0]), tf.Variable([0.0, 0.0])
    plain = Adagrad([plain_weights], learning_rate=0.1, half_life_examples=1e5)
    boosted = Adagrad([boosted_weights], learning_rate=0.1, half_life_examples=1e5, step_boost=3)
    batch = int(STEP_BOOST_HALF_LIFE_EXAMPLES)
    ratios = []
    for t, g in enumerate(GRADIENTS * 2):
        if t == 2:
            boosted.boost()
        before = plain_weights.numpy(), boosted_weights.numpy()
        for optimizer in (plain, boosted):
            optimizer.apply_gradients([tf.constant(g[:2], tf.float32)], batch_size=batch)
        plain_step = plain_weights.numpy() - before[0]
        ratios.append((boosted_weights.numpy() - before[1]) / plain_step)
        # The accumulators are the same whether boosted or not.
        np.testing.assert_allclose(boosted.accumulators[0].numpy(), plain.accumulators[0].numpy())
        plain_weights.assign(boosted_weights)  # both take the next step from the same point
    expected = [1, 1, 3, 2, 1.5, 1.25]
    np.testing.assert_allclose(np.asarray(ratios), np.repeat([expected], 2, axis=0).T, rtol=1e-5)


def test_a_boost_needs_a_configured_step_boost() -> None:
    adagrad = Adagrad([tf.Variable([1.0])], learning_rate=0.1)
    with pytest.raises(ValueError, match="no step_boost"):
        adagrad.boost()
    with pytest.raises(ValueError, match="step_boost must be above 1"):
        Adagrad([tf.Variable([1.0])], learning_rate=0.1, step_boost=0.5)
    with pytest.raises(ValueError, match="apply to Adagrad only"):
        make_optimizer("adam", [tf.Variable([1.0])], 0.001, step_boost=3.0)
    with pytest.raises(ValueError, match="drift_step_boost must be above 1"):
        vae.VAEConfig(drift_step_boost=1.0)


def test_rmsprop_follows_its_moving_average() -> None:
    theta, mean_square = np.array([1.0, -1.0, 0.0]), np.zeros(3)
    for g in GRADIENTS:
        mean_square = 0.9 * mean_square + 0.1 * g**2
        theta -= 0.01 * g / np.sqrt(mean_square + 1e-8)
    weights, _ = run(RMSProp, learning_rate=0.01)
    np.testing.assert_allclose(weights, theta, rtol=1e-5)


def test_adam_corrects_the_bias_of_its_moments() -> None:
    theta, m, v = np.array([1.0, -1.0, 0.0]), np.zeros(3), np.zeros(3)
    for t, g in enumerate(GRADIENTS, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        step = 0.01 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        theta -= step * m / (np.sqrt(v) + 1e-8)
    weights, _ = run(Adam, learning_rate=0.01)
    np.testing.assert_allclose(weights, theta, rtol=1e-5)


@pytest.mark.parametrize("optimizer_type", [RMSProp, Adam])
def test_reset_makes_the_next_step_a_first_step(optimizer_type) -> None:
    weights = tf.Variable([1.0, -1.0, 0.0])
    optimizer = optimizer_type([weights], learning_rate=0.1)
    for gradient in GRADIENTS:
        optimizer.apply_gradients([tf.constant(gradient, tf.float32)], batch_size=10)
    optimizer.reset()
    start = weights.numpy().copy()
    gradient = [tf.constant([1.0, -2.0, 3.0])]
    optimizer.apply_gradients(gradient, batch_size=10)
    fresh_weights = tf.Variable(start)
    optimizer_type([fresh_weights], learning_rate=0.1).apply_gradients(gradient, batch_size=10)
    np.testing.assert_allclose(weights.numpy(), fresh_weights.numpy(), rtol=1e-6)


def test_adagrad_reset_restarts_at_the_next_update_as_if_fewer_updates_were_summed() -> None:
    weights = tf.Variable([1.0, -1.0, 0.0])
    adagrad = Adagrad([weights], learning_rate=0.1, reset_updates=2)
    for gradient in GRADIENTS:
        adagrad.apply_gradients([tf.constant(gradient, tf.float32)], batch_size=10)
    summed = np.sum(np.square(GRADIENTS), axis=0)
    assert adagrad.updates_summed.numpy() == len(GRADIENTS)
    adagrad.reset()
    # Nothing moves until the next update brings a gradient of the new data.
    np.testing.assert_allclose(adagrad.accumulators[0].numpy(), summed, rtol=1e-6)
    start, gradient = weights.numpy().copy(), np.array([0.1, 30.0, -1.5])
    adagrad.apply_gradients([tf.constant(gradient, tf.float32)], batch_size=10)
    # Two updates at each parameter's larger scale: its mean square or the new square.
    restarted = 2 * np.maximum(summed / len(GRADIENTS), gradient**2)
    assert gradient[0] ** 2 < summed[0] / 3 and gradient[1] ** 2 > summed[1] / 3  # both sides
    np.testing.assert_allclose(adagrad.accumulators[0].numpy(), restarted + gradient**2, rtol=1e-6)
    np.testing.assert_allclose(
        weights.numpy() - start,
        -0.1 * gradient / (np.sqrt(restarted + gradient**2) + EPSILON),
        rtol=1e-5,
    )
    assert adagrad.updates_summed.numpy() == 3
    with pytest.raises(ValueError, match="reset_updates must be at least 1"):
        Adagrad([weights], learning_rate=0.1, reset_updates=0)


def test_adagrad_reset_bounds_the_step_when_the_new_gradients_are_far_larger() -> None:
    """Inverted digits after plain ones: shrinking the old sums alone would step by ~lr."""
    weights = tf.Variable(np.zeros(4, np.float32))
    adagrad = Adagrad([weights], learning_rate=0.1, reset_updates=100)
    old = tf.constant([0.01, -0.02, 0.01, 0.03])
    for _ in range(10_000 // 10):
        adagrad.apply_gradients([old], batch_size=10)
    adagrad.reset()
    new = tf.constant([5.0, -3.0, 8.0, 1.0])
    for _ in range(2):
        before = weights.numpy().copy()
        adagrad.apply_gradients([new], batch_size=10)
    # The second update's accumulator: 100 updates of the new square, plus two of them.
    np.testing.assert_allclose(np.abs(weights.numpy() - before), 0.1 / np.sqrt(102), rtol=1e-4)


def test_a_clipping_adagrad_after_a_restart_clips_growing_gradients_not_the_restart() -> None:
    """`reset` makes the steps ~sqrt(N / n) times larger; when the new data's gradients then
    grow, the clip keeps each tensor's step at d * lr / sqrt(updates summed)."""
    lr, n = 0.1, 100
    weights = tf.Variable(np.zeros(4, np.float32))
    adagrad = Adagrad(
        [weights], learning_rate=lr, update_clip_threshold=UPDATE_CLIP_THRESHOLD, reset_updates=n
    )
    old = np.array([0.01, -0.02, 0.01, 0.03])
    for _ in range(1_000):
        adagrad.apply_gradients([tf.constant(old, tf.float32)], batch_size=10)
    adagrad.reset()
    first = np.array([0.5, -0.3, 0.8, 0.1])
    accumulator = n * np.maximum(np.square(old), np.square(first)) + first**2
    before = weights.numpy().copy()
    adagrad.apply_gradients([tf.constant(first, tf.float32)], batch_size=10)
    # The restart's own step: its gradient is part of the scale, so it is never clipped.
    np.testing.assert_allclose(
        weights.numpy() - before, -lr * first / np.sqrt(accumulator), rtol=1e-4
    )
    grown = 20 * first
    accumulator += grown**2
    unclipped = lr * grown / np.sqrt(accumulator)
    before = weights.numpy().copy()
    adagrad.apply_gradients([tf.constant(grown, tf.float32)], batch_size=10)
    step = before - weights.numpy()
    relative_rms = np.sqrt(np.mean(step**2) * (n + 2)) / lr
    assert np.sqrt(np.mean(unclipped**2) * (n + 2)) / lr > 5  # what the clip prevents
    assert relative_rms == pytest.approx(UPDATE_CLIP_THRESHOLD, rel=1e-4)
    # One factor for the whole tensor: the clipped step points where Adagrad's step would.
    np.testing.assert_allclose(
        step / np.linalg.norm(step), unclipped / np.linalg.norm(unclipped), rtol=1e-4
    )


def test_a_pending_reset_is_part_of_the_checkpoint(tmp_path) -> None:
    adagrad = Adagrad([tf.Variable([1.0])], learning_rate=0.1)
    adagrad.reset()
    path = tf.train.Checkpoint(optimizer=adagrad).write(str(tmp_path / "state"))
    restored = Adagrad([tf.Variable([1.0])], learning_rate=0.1)
    assert not restored.restart_pending.numpy()
    tf.train.Checkpoint(optimizer=restored).read(path).assert_consumed()
    assert restored.restart_pending.numpy()


def test_adagrad_counts_the_updates_its_accumulators_hold_as_they_forget() -> None:
    adagrad = Adagrad([tf.Variable([0.0])], learning_rate=0.1, half_life_examples=10.0)
    for _ in range(3):
        adagrad.apply_gradients([tf.constant([1.0])], batch_size=10)
    # Each update's weight halves every 10 examples: 1/4 + 1/2 + 1, like a gradient of 1.
    assert adagrad.updates_summed.numpy() == pytest.approx(1.75)
    np.testing.assert_allclose(adagrad.accumulators[0].numpy(), [1.75], rtol=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "half_life", "learning_rate"),
    [("adagrad", 500.0, 0.02), ("rmsprop", None, 0.001), ("adam", None, 0.001)],
)
def test_optimizer_state_is_part_of_the_checkpoint(tmp_path, optimizer, half_life, learning_rate):
    config = vae.VAEConfig(
        input_dim=12,
        hidden_dim=8,
        latent_dim=2,
        batch_size=10,
        optimizer=optimizer,
        accumulator_half_life_examples=half_life,
        learning_rate=learning_rate,
    )
    data = (np.random.default_rng(3).random((10, 12)) > 0.5).astype(np.float32)
    trainer = vae.Trainer(config)
    for _ in range(5):
        trainer.train_step(data)
    trainer.checkpoint().write(str(tmp_path / "state"))
    expected = [trainer.train_step(data).elbo for _ in range(3)]
    restored = vae.Trainer(config)
    restored.checkpoint().read(str(tmp_path / "state")).assert_consumed()
    for want in expected:
        np.testing.assert_array_equal(restored.train_step(data).elbo, want)


def test_config_rejects_a_half_life_or_clip_outside_adagrad_and_unknown_optimizers() -> None:
    with pytest.raises(ValueError, match="applies to adagrad only"):
        vae.VAEConfig(optimizer="adam", accumulator_half_life_examples=100)
    with pytest.raises(ValueError, match="positive number of examples"):
        vae.VAEConfig(accumulator_half_life_examples=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        vae.VAEConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="apply to Adagrad only"):
        make_optimizer("rmsprop", [tf.Variable([1.0])], 0.1, half_life_examples=10)
    with pytest.raises(ValueError, match="apply to Adagrad only"):
        make_optimizer("adam", [tf.Variable([1.0])], 0.1, update_clip_threshold=1.0)
    with pytest.raises(ValueError, match="update_clip_threshold must be positive"):
        vae.VAEConfig(update_clip_threshold=0.0)
    with pytest.raises(ValueError, match="applies to adagrad only"):
        vae.VAEConfig(optimizer="rmsprop", update_clip_threshold=1.0)
    with pytest.raises(ValueError, match="update_clip_threshold must be positive"):
        Adagrad([tf.Variable([1.0])], 0.1, update_clip_threshold=-1.0)
