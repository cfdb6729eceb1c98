"""Tests for vae.config and vae.model: validation, initialisation, the bound and its gradients."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from vae.config import VAEConfig
from vae.model import VAE, parameter_count, train_flops_per_example


def _binary(rows: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (rows, dim)).astype(np.float32)


def _weights(model: VAE) -> dict[str, np.ndarray]:
    return {
        f"{layer}.{name}": getattr(getattr(model, layer), name).numpy().astype(np.float64)
        for layer in ("encoder_hidden", "encoder_output", "decoder_hidden", "decoder_output")
        for name in ("kernel", "bias")
    }


def _numpy_posterior(model: VAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's eq. 9-10 in NumPy: mean and log-variance of q(z|x)."""
    w = _weights(model)
    hidden = np.tanh(x @ w["encoder_hidden.kernel"] + w["encoder_hidden.bias"])
    out = hidden @ w["encoder_output.kernel"] + w["encoder_output.bias"]
    j = model.config.latent_dim
    return out[:, :j], out[:, j:]


def _numpy_decoder(model: VAE, z: np.ndarray) -> np.ndarray:
    w = _weights(model)
    hidden = np.tanh(z @ w["decoder_hidden.kernel"] + w["decoder_hidden.bias"])
    return hidden @ w["decoder_output.kernel"] + w["decoder_output.bias"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"input_dim": -3}, "input_dim must be a positive integer, got -3"),
        ({"input_dim": 0}, "input_dim must be a positive integer, got 0"),
        ({"latent_dim": -1}, "latent_dim must be a positive integer, got -1"),
        ({"hidden_dim": 2.5}, "hidden_dim must be a positive integer, got 2.5"),
        ({"samples_per_example": 0}, "samples_per_example must be a positive integer, got 0"),
        ({"batch_size": -100}, "batch_size must be a positive integer, got -100"),
        ({"likelihood": "poisson"}, "likelihood must be one of ('bernoulli', 'gaussian')"),
        ({"estimator": "C"}, "estimator must be one of ('analytic_kl', 'monte_carlo_kl')"),
        ({"estimator": "analytic"}, "got 'analytic'"),
        ({"learning_rate": 0.0}, "learning_rate must be positive, got 0.0"),
        ({"learning_rate": float("nan")}, "learning_rate must be positive, got nan"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0, got -0.0001"),
        ({"weight_decay": float("nan")}, "weight_decay must be >= 0, got nan"),
        ({"init_stddev": 0.0}, "init_stddev must be positive, got 0.0"),
    ],
)
def test_config_rejects_invalid_values_with_a_message(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        VAEConfig(**overrides)
    assert message in str(raised.value)


def test_config_defaults_are_the_papers_mnist_setting() -> None:
    config = VAEConfig()
    assert (config.input_dim, config.hidden_dim, config.latent_dim) == (784, 500, 20)
    assert (config.batch_size, config.samples_per_example) == (100, 1)
    assert (config.estimator, config.likelihood, config.learning_rate) == (
        "analytic_kl",
        "bernoulli",
        0.02,
    )


@pytest.mark.parametrize(("alias", "name"), [("A", "monte_carlo_kl"), ("B", "analytic_kl")])
def test_estimator_aliases_map_to_the_papers_estimators(alias: str, name: str) -> None:
    config = VAEConfig(input_dim=6, estimator=alias)
    assert config.estimator == name
    assert config == VAEConfig(input_dim=6, estimator=name)
    assert config.to_dict()["estimator"] == name


def test_config_round_trips_through_dict_and_json() -> None:
    config = VAEConfig(
        input_dim=560,
        latent_dim=3,
        hidden_dim=200,
        likelihood="gaussian",
        estimator="A",
        samples_per_example=2,
        batch_size=7,
        learning_rate=0.1,
        weight_decay=1e-3,
        init_stddev=0.05,
        seed=11,
    )
    values = config.to_dict()
    assert set(values) == {field.name for field in dataclasses.fields(VAEConfig)}
    assert VAEConfig.from_dict(values) == config
    assert VAEConfig.from_dict(json.loads(json.dumps(values))) == config
    # Keys written by a newer version are ignored, not an error.
    assert VAEConfig.from_dict({**values, "future_option": 1}) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.latent_dim = 4  # type: ignore[misc]


def test_config_module_does_not_import_tensorflow() -> None:
    # vae/__init__ loads its names lazily so that flag parsing stays light.
    code = (
        "import sys, vae.config, vae; "
        "c = vae.VAEConfig(input_dim=3); "
        "print(c.input_dim, 'tensorflow' in sys.modules, 'vae.model' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert completed.stdout.split() == ["3", "False", "False"]


# --------------------------------------------------------------------------- parameters


def test_initialisation_statistics_of_the_papers_mnist_model() -> None:
    config = VAEConfig()  # 784-500-20, init N(0, 0.01^2)
    model = VAE(config)
    kernels = [
        model.encoder_hidden.kernel,
        model.encoder_output.kernel,
        model.decoder_hidden.kernel,
        model.decoder_output.kernel,
    ]
    assert [tuple(k.shape) for k in kernels] == [(784, 500), (500, 40), (20, 500), (500, 784)]
    values = np.concatenate([k.numpy().ravel() for k in kernels]).astype(np.float64)
    n = values.size
    # Standard errors of the sample mean (s / sqrt n) and sample std (s / sqrt(2n)).
    assert abs(values.mean()) < 5 * config.init_stddev / math.sqrt(n)
    assert abs(values.std() - config.init_stddev) < 5 * config.init_stddev / math.sqrt(2 * n)
    for kernel in kernels:  # every layer separately, not just on aggregate
        layer = kernel.numpy().astype(np.float64)
        se = config.init_stddev / math.sqrt(2 * layer.size)
        assert abs(layer.std() - config.init_stddev) < 5 * se
    biases = np.concatenate(
        [getattr(model, name).bias.numpy() for name in ("encoder_hidden", "decoder_output")]
    )
    assert 0.005 < biases.std() < 0.015  # biases are drawn from the same N(0, 0.01^2)
    # Same seed => same parameters; another seed => different ones.
    again = VAE(config)
    assert all(
        np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(model.trainable_variables, again.trainable_variables, strict=True)
    )
    other = VAE(dataclasses.replace(config, seed=1))
    assert not np.array_equal(model.encoder_hidden.kernel.numpy(), other.encoder_hidden.kernel)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_parameter_count_matches_the_variables(likelihood: str) -> None:
    config = VAEConfig(input_dim=13, latent_dim=3, hidden_dim=9, likelihood=likelihood)
    model = VAE(config)
    sizes = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert parameter_count(config) == sizes
    assert len(model.trainable_variables) == 8
    outputs = 13 if likelihood == "bernoulli" else 26
    assert model.decoder_output.kernel.shape == (9, outputs)


def test_parameter_count_of_the_papers_mnist_model() -> None:
    # (784+1)*500 + (500+1)*40 + (20+1)*500 + (500+1)*784 by hand.
    assert parameter_count(VAEConfig()) == 392500 + 20040 + 10500 + 392784


def test_train_flops_follow_the_matmul_count() -> None:
    d, h, j = 12, 7, 3
    one = VAEConfig(input_dim=d, hidden_dim=h, latent_dim=j)
    # Forward: 1 multiply-add per weight; backward: 2, but only 1 for the first layer.
    encoder = 2 * d * h + 3 * (h * 2 * j)
    decoder = 3 * (j * h) + 3 * (h * d)
    assert train_flops_per_example(one) == 2.0 * (encoder + decoder)
    four = dataclasses.replace(one, samples_per_example=4)  # the decoder runs once per sample
    assert train_flops_per_example(four) == 2.0 * (encoder + 4 * decoder)
    gaussian = dataclasses.replace(one, likelihood="gaussian")
    assert train_flops_per_example(gaussian) - train_flops_per_example(one) == 2.0 * 3 * h * d


def test_prior_log_density_is_minus_half_the_squared_norm() -> None:
    model = VAE(VAEConfig(input_dim=6, latent_dim=2, hidden_dim=5, init_stddev=0.3))
    expected = -0.5 * sum(float(np.sum(w**2)) for w in _weights(model).values())
    assert model.prior_log_density().numpy() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- the distributions


def test_posterior_moments_follow_the_encoder_equations() -> None:
    model = VAE(VAEConfig(input_dim=7, latent_dim=3, hidden_dim=5, init_stddev=0.5))
    x = _binary(4, 7, seed=1)
    mean, log_variance = _numpy_posterior(model, x)
    q = model.posterior(x)
    np.testing.assert_allclose(q.mean().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.stddev().numpy(), np.exp(0.5 * log_variance), rtol=1e-5)
    prior = model.prior()
    np.testing.assert_array_equal(prior.mean().numpy(), np.zeros(3))
    np.testing.assert_array_equal(prior.stddev().numpy(), np.ones(3))


def test_bernoulli_likelihood_matches_numpy() -> None:
    model = VAE(VAEConfig(input_dim=7, latent_dim=3, hidden_dim=5, init_stddev=0.8))
    z = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
    x = _binary(5, 7, seed=3)
    logits = _numpy_decoder(model, z)
    p = 1 / (1 + np.exp(-logits))
    expected = np.sum(x * np.log(p) + (1 - x) * np.log1p(-p), axis=1)
    np.testing.assert_allclose(model.likelihood(z).log_prob(x).numpy(), expected, rtol=1e-5)
    mean = model.decoder_mean(z).numpy()
    np.testing.assert_allclose(mean, p, rtol=1e-5)
    assert mean.shape == (5, 7)


def test_gaussian_likelihood_matches_numpy() -> None:
    config = VAEConfig(input_dim=7, latent_dim=3, hidden_dim=5, likelihood="gaussian")
    model = VAE(dataclasses.replace(config, init_stddev=0.8))
    z = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
    x = np.random.default_rng(3).random((5, 7)).astype(np.float32)
    outputs = _numpy_decoder(model, z)
    mean = 1 / (1 + np.exp(-outputs[:, :7]))  # squashed into (0, 1) as for Frey Face
    log_variance = outputs[:, 7:]
    expected = np.sum(
        -0.5 * (np.log(2 * np.pi) + log_variance + (x - mean) ** 2 / np.exp(log_variance)),
        axis=1,
    )
    likelihood = model.likelihood(z)
    np.testing.assert_allclose(likelihood.log_prob(x).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(model.decoder_mean(z).numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(likelihood.stddev().numpy(), np.exp(0.5 * log_variance), rtol=1e-5)


# --------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("estimator", ["analytic_kl", "monte_carlo_kl"])
def test_bound_is_deterministic_per_seed_and_adds_up(likelihood: str, estimator: str) -> None:
    config = VAEConfig(
        input_dim=8,
        latent_dim=2,
        hidden_dim=6,
        likelihood=likelihood,
        estimator=estimator,
        samples_per_example=3,
        init_stddev=0.5,
    )
    model = VAE(config)
    x = _binary(5, 8, seed=4)
    parts = model.bound(x, seed=[3, 4])
    assert [tuple(p.shape) for p in parts] == [(5,)] * 3
    again = model.bound(x, seed=tf.constant([3, 4]))
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    other = model.bound(x, seed=[3, 5])
    assert not np.array_equal(
        parts.reconstruction_log_likelihood, other.reconstruction_log_likelihood
    )
    np.testing.assert_allclose(
        parts.elbo.numpy(),
        parts.reconstruction_log_likelihood.numpy() - parts.kl.numpy(),
        rtol=1e-6,
    )
    assert np.all(np.isfinite(parts.elbo.numpy()))
    if likelihood == "bernoulli":  # a probability mass: log p(x|z) <= 0
        assert np.all(parts.reconstruction_log_likelihood.numpy() < 0)


def test_analytic_kl_equals_the_closed_form() -> None:
    config = VAEConfig(input_dim=8, latent_dim=3, hidden_dim=6, init_stddev=0.7)
    model = VAE(config)
    x = _binary(6, 8, seed=5)
    q = model.posterior(x)
    mu = q.mean().numpy().astype(np.float64)
    sigma = q.stddev().numpy().astype(np.float64)
    closed_form = 0.5 * np.sum(mu**2 + sigma**2 - 1 - np.log(sigma**2), axis=1)
    assert np.all(closed_form > 0.05)  # a posterior far enough from the prior to matter
    kl = model.bound(x, seed=[0, 1]).kl.numpy()
    np.testing.assert_allclose(kl, closed_form, rtol=1e-5, atol=1e-6)
    # The KL term does not depend on the Monte Carlo seed.
    np.testing.assert_array_equal(model.bound(x, seed=[9, 9]).kl.numpy(), kl)


def test_monte_carlo_kl_agrees_with_analytic_kl_within_sampling_error() -> None:
    samples = 2000
    analytic = VAE(VAEConfig(input_dim=8, latent_dim=3, hidden_dim=6, init_stddev=0.7))
    monte_carlo = VAE(
        VAEConfig(
            input_dim=8,
            latent_dim=3,
            hidden_dim=6,
            init_stddev=0.7,
            estimator="monte_carlo_kl",
            samples_per_example=samples,
        )
    )
    for a, b in zip(analytic.trainable_variables, monte_carlo.trainable_variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # same seed, same weights
    x = _binary(6, 8, seed=5)
    exact = analytic.bound(x, seed=[0, 1]).kl.numpy()
    estimate = monte_carlo.bound(x, seed=[7, 8]).kl.numpy()
    # The standard error of the mean of log q(z|x) - log p(z) over `samples` draws of z.
    q = analytic.posterior(x)
    z = q.sample(samples, seed=[100, 200])
    log_ratios = (q.log_prob(z) - analytic.prior().log_prob(z)).numpy().astype(np.float64)
    standard_error = log_ratios.std(axis=0, ddof=1) / math.sqrt(samples)
    assert np.all(standard_error > 0)
    assert np.all(np.abs(estimate - exact) < 4 * standard_error)
    # A single sample is far noisier: the analytic estimator B has lower variance.
    one = VAE(VAEConfig(input_dim=8, latent_dim=3, hidden_dim=6, init_stddev=0.7, estimator="A"))
    assert not np.allclose(one.bound(x, seed=[7, 8]).kl.numpy(), exact, atol=1e-3)


def test_monte_carlo_kl_bound_with_one_sample_is_one_log_importance_weight() -> None:
    config = VAEConfig(
        input_dim=8, latent_dim=2, hidden_dim=6, init_stddev=0.5, estimator="monte_carlo_kl"
    )
    model = VAE(config)
    x = _binary(4, 8, seed=6)
    weights = model.log_importance_weights(x, 1, seed=tf.constant([5, 6]))
    assert weights.shape == (1, 4)
    # log p(x|z) - (log q(z|x) - log p(z)) at the same z: the two are one quantity.
    np.testing.assert_allclose(
        model.bound(x, seed=[5, 6]).elbo.numpy(), weights.numpy()[0], rtol=1e-5
    )
    assert model.log_importance_weights(x, 17, seed=tf.constant([5, 6])).shape == (17, 4)


# --------------------------------------------------------------------------- gradients


def _loss(model: VAE, x: np.ndarray, seed: list[int]) -> tf.Tensor:
    return -tf.reduce_mean(model.bound(x, seed).elbo)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("estimator", ["analytic_kl", "monte_carlo_kl"])
def test_gradients_agree_with_central_differences(likelihood: str, estimator: str) -> None:
    config = VAEConfig(
        input_dim=6,
        latent_dim=2,
        hidden_dim=5,
        likelihood=likelihood,
        estimator=estimator,
        samples_per_example=2,
        init_stddev=0.4,
    )
    model = VAE(config)
    rng = np.random.default_rng(7)
    x = (_binary(5, 6, seed=8) if likelihood == "bernoulli" else rng.random((5, 6))).astype(
        np.float32
    )
    seed = [11, 12]  # stateless: the noise eps is fixed, so the loss is a smooth function
    with tf.GradientTape() as tape:
        loss = _loss(model, x, seed)
    gradients = tape.gradient(loss, model.trainable_variables)
    eps = 1e-2
    checked = 0
    for variable, gradient in zip(model.trainable_variables, gradients, strict=True):
        gradient = gradient.numpy().ravel()
        original = variable.numpy()
        # The steepest coordinate (a clear signal) and one chosen at random.
        for index in {int(np.argmax(np.abs(gradient))), int(rng.integers(gradient.size))}:
            values = []
            for sign in (1, -1):
                moved = original.copy().ravel()
                moved[index] += sign * eps
                variable.assign(moved.reshape(original.shape))
                values.append(float(_loss(model, x, seed).numpy()))
            variable.assign(original)
            numeric = (values[0] - values[1]) / (2 * eps)
            # float32 loss rounding (~1e-6 * |loss| / eps) bounds the absolute tolerance.
            assert numeric == pytest.approx(gradient[index], rel=2e-2, abs=2e-3), (
                variable.name,
                index,
            )
            checked += 1
    assert checked >= 12
    assert max(np.max(np.abs(g.numpy())) for g in gradients) > 0.05  # not a vacuous check
