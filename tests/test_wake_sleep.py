"""Wake-sleep (`--method wake-sleep`), the paper's baseline: the decoder learns from z drawn
by the encoder, the encoder from the decoder's dreams; the bound is reported as for AEVB."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import vae
from vae.model import reparameterized_sample

SMALL = vae.VAEConfig(input_dim=64, latent_dim=4, hidden_dim=32, batch_size=50)


def _images(count: int, seed: int) -> np.ndarray:
    """Binary images with structure: five fixed prototypes, 5% of their pixels flipped."""
    prototypes = np.random.default_rng(0).random((5, 64)) > 0.6
    rng = np.random.default_rng(seed)
    rows = prototypes[rng.integers(0, 5, count)] ^ (rng.random((count, 64)) < 0.05)
    return rows.astype(np.float32)


def _gradients(model: vae.VAE, objective) -> dict[str, np.ndarray]:
    variables = {v.name: v for v in model.trainable_variables}
    with tf.GradientTape() as tape:
        value = objective()
    return {
        name: gradient.numpy()
        for name, gradient in zip(
            variables, tape.gradient(value, list(variables.values())), strict=True
        )
        if gradient is not None
    }


def test_the_wake_phase_moves_the_decoder_and_the_sleep_phase_the_encoder() -> None:
    model = vae.VAE(SMALL)
    rng = np.random.default_rng(1)
    for variable in model.trainable_variables:  # large enough weights that z matters
        variable.assign(rng.normal(0.0, 0.3, variable.shape).astype(np.float32))
    seed = tf.constant([5, 6])
    x, other_x = _images(20, seed=1), _images(20, seed=2)
    both = _gradients(model, lambda: model.wake_sleep_objective(x, seed))
    encoder = {name: g for name, g in both.items() if "encoder" in name}
    decoder = {name: g for name, g in both.items() if "decoder" in name}
    assert len(encoder) == 4 and len(decoder) == 4
    # The encoder learns from dreams only: other data, the same dreams, the same gradient.
    elsewhere = _gradients(model, lambda: model.wake_sleep_objective(other_x, seed))
    for name, gradient in encoder.items():
        np.testing.assert_array_equal(elsewhere[name], gradient)
    # The decoder's gradient is that of log p(x|z) for z drawn from q(z|x) and held fixed.
    wake_seed = tf.random.experimental.stateless_split(seed, 3)[0]
    z = tf.stop_gradient(reparameterized_sample(model.posterior(x), 1, wake_seed)[0])
    wake = _gradients(model, lambda: tf.reduce_mean(model.likelihood(z).log_prob(x)))
    assert set(wake) == set(decoder)
    for name, gradient in decoder.items():
        np.testing.assert_allclose(gradient, wake[name], rtol=1e-5, atol=1e-6)


def test_dreams_follow_the_decoder() -> None:
    model = vae.VAE(SMALL)
    model.decoder_output.bias.assign(np.linspace(-3, 3, 64).astype(np.float32))
    z = tf.zeros([20_000, 4])
    dreams = model.sample_observations(z, tf.constant([1, 2])).numpy()
    assert set(np.unique(dreams)) <= {0.0, 1.0}
    expected = model.decoder_mean(z[:1]).numpy()[0]
    # 20,000 Bernoulli draws per pixel: the frequency within 5 standard errors of p.
    np.testing.assert_allclose(dreams.mean(axis=0), expected, atol=5 * 0.5 / np.sqrt(20_000))


def test_wake_sleep_learns_and_aevb_learns_more_from_the_same_examples() -> None:
    """The paper's Figure 2 ordering, in small: at equal examples seen, AEVB's bound is
    above wake-sleep's, and wake-sleep's above the untrained model's."""
    train, test = _images(3000, seed=1), _images(1000, seed=2)
    bounds = {}
    for method in ("aevb", "wake_sleep"):
        trainer = vae.Trainer(dataclasses.replace(SMALL, method=method))
        for _ in range(5):
            for batch in np.split(train, 60):
                trainer.train_step(batch)
        assert trainer.step == 300 and trainer.skipped_steps == 0
        bounds[method] = float(np.mean(vae.evaluate(trainer.model, test).elbo))
    untrained = float(np.mean(vae.evaluate(vae.VAE(SMALL), test).elbo))
    # Measured: -44.4, -38.7 and -22.8 nats.
    assert untrained + 2 < bounds["wake_sleep"] < bounds["aevb"] - 10, (untrained, bounds)


def test_a_wake_sleep_step_reports_the_bound_before_it_updates_and_masks_padding() -> None:
    config = dataclasses.replace(SMALL, method="wake_sleep")
    trainer = vae.Trainer(config)
    batch = _images(30, seed=3)  # 30 of M = 50: padded
    before = vae.VAE(config)
    result = trainer.train_step(batch)
    assert result.elbo.shape == (30,) and result.applied and trainer.examples_seen == 30
    # Test-then-train: the reported bound is the untrained model's (XLA draws its own z,
    # so compared on average: the bound's spread over z is a few nats here).
    untrained = before.bound(batch, [0, 0]).elbo.numpy()
    assert abs(result.elbo.mean() - untrained.mean()) < 2.0
    moved = [
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(trainer.model.parameters(), before.parameters(), strict=True)
    ]
    assert all(moved)


def test_an_unknown_method_is_named() -> None:
    with pytest.raises(ValueError, match=r"method must be one of \('aevb', 'wake_sleep'\)"):
        vae.VAEConfig(method="reinforce")


def test_aevb_train_method_wake_sleep_trains_and_records_the_method(tmp_path) -> None:
    from pipeline.cli import main as cli
    from pipeline.train.progress import read_progress

    run = tmp_path / "run"
    argv = ["train", "--dataset=mnist-5k", "--hidden=16", "--latent-dim=2"]
    argv += ["--max-examples=2000", "--log-every-steps=1", "--method=wake-sleep", f"--output={run}"]
    assert cli.main(argv) == 0
    newest = vae.resolve_version(run / "snapshots" / "default")
    assert vae.read_metadata(newest)["config"]["method"] == "wake_sleep"
    assert vae.load_model(newest).config.method == "wake_sleep"
    progress = [entry for entry in read_progress(run / "progress.jsonl") if "elbo" in entry]
    assert progress[-1]["examples"] == 2000
    # The reported bound is the SGVB estimate, as for AEVB: it rises while wake-sleep learns.
    assert np.mean([e["elbo"] for e in progress[-5:]]) > np.mean([e["elbo"] for e in progress[:5]])
