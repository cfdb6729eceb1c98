"""Tests for vae.optimizers and vae.train: Adagrad, test-then-train steps, checkpoints, learning."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from prototypes import FLIP, prototype_data, true_log_likelihood

from vae.config import VAEConfig
from vae.optimizers import EPSILON, Adagrad
from vae.train import StepResult, Trainer, step_program

TINY = VAEConfig(input_dim=6, latent_dim=2, hidden_dim=8, batch_size=4, learning_rate=0.05)


def _batch(rows: int = 4, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (rows, dim)).astype(np.float32)


def _state(trainer: Trainer) -> list[np.ndarray]:
    """Every variable of the run: parameters, accumulators, counters and generator state."""
    # tf.Module does not look inside the tf.random.Generator (not a Module): add its state.
    return [v.numpy().copy() for v in trainer.variables] + [trainer.rng.state.numpy().copy()]


def _parameters(trainer: Trainer) -> list[np.ndarray]:
    return [v.numpy().copy() for v in trainer.model.trainable_variables]


def _accumulators(trainer: Trainer) -> list[np.ndarray]:
    return [v.numpy().copy() for v in trainer.optimizer.accumulators]


def _assert_same_results(a: StepResult, b: StepResult) -> None:
    np.testing.assert_array_equal(a.elbo, b.elbo)
    np.testing.assert_array_equal(a.reconstruction_log_likelihood, b.reconstruction_log_likelihood)
    np.testing.assert_array_equal(a.kl, b.kl)
    assert a.applied == b.applied


# --------------------------------------------------------------------------- Adagrad


def test_adagrad_matches_the_numpy_reference_and_resets() -> None:
    w = tf.Variable([1.0, -2.0, 0.5])
    b = tf.Variable([[0.25, 0.0], [3.0, -1.0]])
    lr = 0.1
    adagrad = Adagrad([w, b], learning_rate=lr, reset_updates=1)
    assert [a.shape for a in adagrad.accumulators] == [w.shape, b.shape]
    grads = [
        [np.array([2.0, -4.0, 0.1]), np.array([[1.0, 0.0], [-3.0, 0.5]])],
        [np.array([-1.0, 3.0, 0.3]), np.array([[2.0, 0.0], [1.0, 0.5]])],
    ]
    theta = [w.numpy().astype(np.float64), b.numpy().astype(np.float64)]
    accum = [np.zeros(3), np.zeros((2, 2))]
    for step in grads:
        adagrad.apply_gradients([tf.constant(g, tf.float32) for g in step])
        for i, g in enumerate(step):
            accum[i] = accum[i] + g**2
            theta[i] = theta[i] - lr * g / (np.sqrt(accum[i]) + 1e-10)
    np.testing.assert_allclose(w.numpy(), theta[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b.numpy(), theta[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(adagrad.accumulators[0].numpy(), accum[0], rtol=1e-6)
    np.testing.assert_allclose(adagrad.accumulators[1].numpy(), accum[1], rtol=1e-6)
    # A zero gradient leaves its weight alone (eps keeps 0 / 0 away).
    assert b.numpy()[0, 1] == 0.0
    assert EPSILON == 1e-10

    # Two updates summed; a reset to one update's worth keeps half of every accumulator,
    # or the next update's square where that is larger.
    adagrad.reset()
    before = w.numpy().copy()
    g = np.array([5.0, -0.01, 0.2])
    adagrad.apply_gradients([tf.constant(g, tf.float32), tf.zeros([2, 2])])
    restarted = np.maximum(accum[0] / 2, g**2) + g**2
    np.testing.assert_allclose(adagrad.accumulators[0].numpy(), restarted, rtol=1e-6)
    np.testing.assert_allclose(adagrad.accumulators[1].numpy(), accum[1] / 2, rtol=1e-6)
    expected_step = -lr * g / (np.sqrt(restarted) + 1e-10)
    np.testing.assert_allclose(w.numpy() - before, expected_step, rtol=1e-5, atol=1e-6)


def test_trainers_of_a_configuration_share_one_compiled_step_and_keep_their_own_state() -> None:
    config = dataclasses.replace(TINY, hidden_dim=7)  # a program no other test has traced
    batches = [_batch(seed=seed) for seed in range(6)]
    # The first trainer of the configuration runs its own step (its variables captured),
    # every other the shared one: trainer 0 alone against trainer 0 interleaved compares
    # the two programs too.
    alone = []
    for seed in (0, 1):
        trainer = Trainer(dataclasses.replace(config, seed=seed))
        alone.append(([trainer.train_step(b) for b in batches], _state(trainer), trainer))
    interleaved = [Trainer(dataclasses.replace(config, seed=seed)) for seed in (0, 1)]
    results = [[], []]
    for batch in batches:
        for index, trainer in enumerate(interleaved):
            results[index].append(trainer.train_step(batch))
    assert alone[0][2]._dedicated_step is not None and interleaved[0]._dedicated_step is None
    assert step_program(config).tracing_count == 1
    for index, trainer in enumerate(interleaved):
        for a, b in zip(alone[index][0], results[index], strict=True):
            _assert_same_results(a, b)
        for a, b in zip(alone[index][1], _state(trainer), strict=True):
            np.testing.assert_array_equal(a, b)
    # Not vacuous: the two seeds gave two different models.
    assert not np.array_equal(_parameters(alone[0][2])[0], _parameters(alone[1][2])[0])


def test_parameters_keep_the_order_optimisers_made_their_slots_in() -> None:
    trainer = Trainer(TINY)
    assert [v.name for v in trainer.model.parameters()] == [
        v.name for v in trainer.model.trainable_variables
    ]


def test_trainer_optimizer_covers_every_parameter() -> None:
    trainer = Trainer(TINY)
    params = trainer.model.trainable_variables
    assert len(trainer.optimizer.accumulators) == len(params) == 8
    for variable, accumulator in zip(params, trainer.optimizer.accumulators, strict=True):
        assert accumulator.shape == variable.shape
        assert not accumulator.trainable
    assert trainer.optimizer.learning_rate == TINY.learning_rate


# --------------------------------------------------------------------------- one step


def test_train_step_reports_and_counts() -> None:
    trainer = Trainer(TINY)
    assert (trainer.step, trainer.examples_seen, trainer.skipped_steps) == (0, 0, 0)
    # Not config.batch_size rows, and float64: the step takes any [B, D] batch.
    result = trainer.train_step(_batch(3).astype(np.float64))
    assert isinstance(result, StepResult) and result.applied is True
    shapes = {result.elbo.shape, result.kl.shape, result.reconstruction_log_likelihood.shape}
    assert shapes == {(3,)}
    assert result.elbo.dtype == np.float32
    np.testing.assert_allclose(
        result.elbo, result.reconstruction_log_likelihood - result.kl, rtol=1e-6
    )
    assert np.all(result.kl >= 0)  # analytic KL
    trainer.train_step(_batch(3, seed=1))
    assert (trainer.step, trainer.examples_seen, trainer.skipped_steps) == (2, 6, 0)
    assert isinstance(trainer.checkpoint(), tf.train.Checkpoint)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((0, 6), np.float32), "got (0, 6)"),
        (np.zeros((4, 5), np.float32), "got (4, 5)"),
        (np.zeros(6, np.float32), "got (6,)"),
    ],
)
def test_train_step_rejects_malformed_batches(batch: np.ndarray, message: str) -> None:
    trainer = Trainer(TINY)
    with pytest.raises(ValueError, match="expected a non-empty batch of shape") as raised:
        trainer.train_step(batch)
    assert message in str(raised.value)
    assert (trainer.step, trainer.examples_seen, trainer.skipped_steps) == (0, 0, 0)


def test_partial_batch_is_padded_and_masked_out_of_the_loss() -> None:
    """A 3-row batch padded to M = 4 must update exactly as a trainer with M = 3 does."""
    base = dataclasses.replace(TINY, init_stddev=0.3)
    trainers = [Trainer(base), Trainer(dataclasses.replace(base, batch_size=3))]
    for trainer in trainers:
        # Zero decoder kernels make the bound and every gradient independent of z, so the
        # random numbers (drawn for 4 rows in one run and 3 in the other) cannot matter.
        for layer in (trainer.model.decoder_hidden, trainer.model.decoder_output):
            layer.kernel.assign(tf.zeros_like(layer.kernel))
    x = _batch(3, seed=6)
    padded, exact = (trainer.train_step(x) for trainer in trainers)
    assert padded.elbo.shape == exact.elbo.shape == (3,)
    np.testing.assert_allclose(padded.elbo, exact.elbo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded.kl, exact.kl, rtol=1e-5, atol=1e-6)
    assert [t.examples_seen for t in trainers] == [3, 3]
    # Equal squared gradients: the loss is the mean over the 3 real rows, not over 4.
    for a, b in zip(*(_accumulators(t) for t in trainers), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
    for a, b in zip(*(_parameters(t) for t in trainers), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    model = trainers[0].model
    index = [v.ref() for v in model.trainable_variables].index(model.decoder_output.bias.ref())
    assert np.min(trainers[0].optimizer.accumulators[index].numpy()) > 1e-4  # not vacuous


def test_step_reports_the_bound_before_the_update_with_its_seed() -> None:
    trainer = Trainer(dataclasses.replace(TINY, init_stddev=0.5))  # z matters to the decoder
    x = _batch(4)
    for seed in (1, 2):
        trainer.train_step(_batch(4, seed=seed))
    # Copy the generator's state by value (from_state on the variable itself would alias it)
    # and draw the step's seed exactly as the compiled step does.
    clone = tf.random.Generator.from_state(trainer.rng.state.numpy(), trainer.rng.algorithm)
    # The step is XLA-compiled, and XLA's stateless normal sampler is not the TF kernel's, so
    # the reproduction is compiled too.
    seed = tf.function(lambda: clone.uniform_full_int([2], tf.int32), jit_compile=True)()
    bound = tf.function(trainer.model.bound, jit_compile=True)
    before = bound(tf.constant(x), seed)
    result = trainer.train_step(x)
    assert result.applied
    np.testing.assert_array_equal(trainer.rng.state.numpy(), clone.state.numpy())
    # Equal up to float32 rounding: XLA fuses the bound alone and the whole step differently.
    np.testing.assert_allclose(result.elbo, before.elbo.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        result.reconstruction_log_likelihood,
        before.reconstruction_log_likelihood.numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(result.kl, before.kl.numpy(), rtol=1e-5, atol=1e-6)
    # Controls: another seed, or the same seed under the updated parameters, differ clearly.
    other_seed = bound(tf.constant(x), seed + tf.constant([0, 1]))
    assert np.max(np.abs(other_seed.elbo.numpy() - result.elbo)) > 1e-2
    after = bound(tf.constant(x), seed)
    assert np.max(np.abs(after.elbo.numpy() - result.elbo)) > 1e-2


def test_step_reports_the_bound_before_the_update_deterministic_decoder() -> None:
    """With a decoder that ignores z the bound is noise-free, so eager mode must agree too."""
    trainer = Trainer(dataclasses.replace(TINY, init_stddev=0.3))
    trainer.model.decoder_hidden.kernel.assign(tf.zeros_like(trainer.model.decoder_hidden.kernel))
    x = _batch(4, seed=3)
    before = trainer.model.bound(x, seed=[1, 2])
    np.testing.assert_allclose(before.elbo, trainer.model.bound(x, seed=[8, 9]).elbo, rtol=1e-6)
    result = trainer.train_step(x)
    np.testing.assert_allclose(result.elbo, before.elbo.numpy(), rtol=1e-5)
    np.testing.assert_allclose(result.kl, before.kl.numpy(), rtol=1e-5, atol=1e-7)
    after = trainer.model.bound(x, seed=[1, 2]).elbo.numpy()
    assert np.max(np.abs(after - result.elbo)) > 1e-2


# --------------------------------------------------------------------------- non-finite batches


def _assert_skipped_then_trains(trainer: Trainer, bad: np.ndarray, finite: np.ndarray) -> None:
    step, seen, skipped = trainer.step, trainer.examples_seen, trainer.skipped_steps
    parameters, accumulators = _parameters(trainer), _accumulators(trainer)

    result = trainer.train_step(bad)
    assert result.applied is False
    assert not np.all(np.isfinite(result.elbo))  # what it measured is still reported
    assert (trainer.step, trainer.examples_seen, trainer.skipped_steps) == (
        step,
        seen + len(bad),
        skipped + 1,
    )
    for before, after in zip(parameters, _parameters(trainer), strict=True):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(accumulators, _accumulators(trainer), strict=True):
        np.testing.assert_array_equal(before, after)

    result = trainer.train_step(finite)  # the next finite batch trains normally
    assert result.applied is True and np.all(np.isfinite(result.elbo))
    assert (trainer.step, trainer.skipped_steps) == (step + 1, skipped + 1)
    for before, after in zip(parameters, _parameters(trainer), strict=True):
        assert np.all(np.isfinite(after)) and not np.array_equal(before, after)
    for before, after in zip(accumulators, _accumulators(trainer), strict=True):
        assert np.all(np.isfinite(after))
        assert np.all(after >= before) and np.any(after > before)


def test_nan_and_inf_batches_are_skipped_and_counted() -> None:
    trainer = Trainer(TINY)
    finite = _batch(4, seed=1)
    trainer.train_step(finite)
    nan = _batch(4)
    nan[2, 3] = np.nan
    _assert_skipped_then_trains(trainer, nan, finite)
    inf = _batch(4)
    inf[0, 0] = np.inf
    _assert_skipped_then_trains(trainer, inf, finite)
    assert (trainer.step, trainer.examples_seen, trainer.skipped_steps) == (3, 20, 2)


def test_overflowing_batch_is_skipped_and_counted() -> None:
    trainer = Trainer(dataclasses.replace(TINY, likelihood="gaussian"))
    finite = np.random.default_rng(0).random((4, 6)).astype(np.float32)
    trainer.train_step(finite)
    # Finite input whose squared error (1e20)^2 overflows float32 in the Gaussian log-density.
    bad = finite.copy()
    bad[1] = 1e20
    assert np.all(np.isfinite(bad))
    _assert_skipped_then_trains(trainer, bad, finite)
    assert (trainer.step, trainer.examples_seen, trainer.skipped_steps) == (2, 12, 1)


# --------------------------------------------------------------------------- weight decay


def test_weight_decay_adds_weight_decay_times_theta_to_the_gradient() -> None:
    base = dataclasses.replace(TINY, init_stddev=0.2, learning_rate=0.1)
    decay = 0.5
    plain, decayed = Trainer(base), Trainer(dataclasses.replace(base, weight_decay=decay))
    theta = _parameters(plain)
    for a, b in zip(theta, _parameters(decayed), strict=True):
        np.testing.assert_array_equal(a, b)
    x = _batch(4, seed=5)
    result_plain, result_decayed = plain.train_step(x), decayed.train_step(x)
    # The reported bound is the data term only, with the same seed for both runs.
    np.testing.assert_allclose(result_plain.elbo, result_decayed.elbo, rtol=1e-5, atol=1e-6)

    def first_gradients(trainer: Trainer) -> list[np.ndarray]:
        # After one Adagrad step accum = g^2 and theta moved by -lr * sign(g).
        moved = [after - before for before, after in zip(theta, _parameters(trainer), strict=True)]
        return [
            -np.sign(d) * np.sqrt(a.astype(np.float64))
            for d, a in zip(moved, _accumulators(trainer), strict=True)
        ]

    for t, g0, g1 in zip(theta, first_gradients(plain), first_gradients(decayed), strict=True):
        np.testing.assert_allclose(g1 - g0, decay * t, rtol=1e-3, atol=1e-5)
    assert max(float(np.max(np.abs(decay * t))) for t in theta) > 0.1  # a visible difference


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_restore_continues_bit_identically(tmp_path) -> None:
    config = dataclasses.replace(TINY, estimator="monte_carlo_kl", samples_per_example=2)
    batches = [_batch(4, seed=s) for s in range(6)]
    nan_batch = np.full((4, 6), np.nan, np.float32)
    trainer = Trainer(config)
    for x in (batches[0], nan_batch, batches[1]):
        trainer.train_step(x)
    trainer.reset_optimizer()  # pending: the restart comes with the next update, after restore
    path = trainer.checkpoint().write(str(tmp_path / "ckpt"))
    counters = (trainer.step, trainer.examples_seen, trainer.skipped_steps)
    assert counters == (2, 12, 1)
    generator_state = trainer.rng.state.numpy().copy()

    expected = [trainer.train_step(x) for x in batches[2:5]]
    expected_state = _state(trainer)

    restored = Trainer(config)
    # Control: before the restore, the same batch gives other numbers.
    assert not np.array_equal(restored.train_step(batches[2]).elbo, expected[0].elbo)
    restored.checkpoint().read(path).assert_consumed()
    assert (restored.step, restored.examples_seen, restored.skipped_steps) == counters
    np.testing.assert_array_equal(restored.rng.state.numpy(), generator_state)
    results = [restored.train_step(x) for x in batches[2:5]]
    for a, b in zip(expected, results, strict=True):
        _assert_same_results(a, b)
    # parameters, accumulators, the updates they hold, a pending restart and the step boost,
    # counters, rng
    assert len(expected_state) == 8 + 8 + 1 + 1 + 1 + 3 + 1
    for a, b in zip(expected_state, _state(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (restored.step, restored.examples_seen, restored.skipped_steps) == (5, 24, 1)


# --------------------------------------------------------------------------- learning


def test_training_on_structured_data_raises_the_bound() -> None:
    config = VAEConfig(input_dim=20, latent_dim=2, hidden_dim=16, batch_size=20, learning_rate=0.1)
    trainer = Trainer(config)
    steps = 400
    train = prototype_data(steps * config.batch_size, seed=1)
    held_out = prototype_data(1000, seed=2)
    # -E log p(x) of the generating mixture: about log 4 + 20 H(0.05) = 5.36 nats.
    exact = true_log_likelihood(held_out)
    entropy = math.log(4) - 20 * (FLIP * math.log(FLIP) + (1 - FLIP) * math.log1p(-FLIP))
    assert -exact.mean() == pytest.approx(entropy, abs=0.3)
    independent_bits = -20 * math.log(2)  # -13.86: the best the decoder can do ignoring z
    # The midpoint between "learned nothing about the prototypes" and "learned everything".
    threshold = 0.5 * (independent_bits - entropy)

    def held_out_bound() -> np.ndarray:
        return trainer.model.bound(held_out, seed=[0, 1]).elbo.numpy().astype(np.float64)

    # Weights of scale 0.01 give logits near 0, i.e. p = 1/2 per bit and a KL near 0.
    assert held_out_bound().mean() == pytest.approx(independent_bits, abs=0.1)
    online = [trainer.train_step(train[i * 20 : (i + 1) * 20]).elbo.mean() for i in range(steps)]
    assert trainer.step == steps and trainer.skipped_steps == 0
    # The first estimate is measured before any update, so it is the initial model's bound.
    assert online[0] == pytest.approx(independent_bits, abs=0.1)

    final = held_out_bound()
    assert final.mean() > threshold
    assert np.mean(online[-50:]) > threshold  # the honest test-then-train estimate agrees
    # A lower bound on the model's log-likelihood cannot beat the data's own entropy (Gibbs).
    gap = final - exact
    assert gap.mean() < 4 * gap.std(ddof=1) / math.sqrt(len(gap))
