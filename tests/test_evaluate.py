"""Tests for vae.evaluation: the average bound and the importance-sampled log-likelihood."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from prototypes import prototype_data, true_log_likelihood

from vae.config import VAEConfig
from vae.evaluation import (
    Evaluation,
    bound_per_example,
    bound_with_parameters,
    evaluate,
    importance_sampled_log_likelihood,
)
from vae.model import VAE
from vae.train import Trainer


def _standard_error(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


@pytest.fixture(scope="module")
def trained() -> VAE:
    """A small VAE after a little training, whose posterior is not exact: the bound is loose."""
    config = VAEConfig(input_dim=20, latent_dim=2, hidden_dim=16, batch_size=20, learning_rate=0.1)
    trainer = Trainer(config)
    data = prototype_data(300 * 20, seed=1)
    for start in range(0, len(data), 20):
        trainer.train_step(data[start : start + 20])
    return trainer.model


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return prototype_data(500, seed=2)


@pytest.fixture(scope="module")
def precise_bound(trained: VAE, held_out: np.ndarray) -> np.ndarray:
    """Each row's bound averaged over L = 200 samples: its Monte Carlo noise is negligible."""
    config = dataclasses.replace(trained.config, samples_per_example=200)
    copy = VAE(config)
    for target, source in zip(copy.trainable_variables, trained.trainable_variables, strict=True):
        target.assign(source)
    return bound_per_example(copy, held_out, seed=5)["elbo"].astype(np.float64)


@pytest.fixture(scope="module")
def estimates(trained: VAE, held_out: np.ndarray) -> dict[int, np.ndarray]:
    return {
        k: importance_sampled_log_likelihood(trained, held_out, samples=k, seed=3)
        for k in (1, 10, 1000)
    }


def _z_free_model() -> tuple[VAE, np.ndarray, np.ndarray]:
    """q(z|x) = p(z) and a decoder that ignores z: every importance weight equals p(x).

    Returns the model and log p(x) in closed form for a few binary rows.
    """
    model = VAE(VAEConfig(input_dim=20, latent_dim=2, hidden_dim=16, init_stddev=0.5))
    for variable in (
        model.encoder_output.kernel,
        model.encoder_output.bias,
        model.decoder_hidden.kernel,
    ):
        variable.assign(tf.zeros_like(variable))
    x = prototype_data(5, seed=4)
    hidden = np.tanh(model.decoder_hidden.bias.numpy().astype(np.float64))
    logits = hidden @ model.decoder_output.kernel.numpy() + model.decoder_output.bias.numpy()
    log_p = np.sum(x * -np.logaddexp(0, -logits) + (1 - x) * -np.logaddexp(0, logits), axis=1)
    return model, x, log_p


# --------------------------------------------------------------------------- the IS estimate


def test_importance_sampled_estimate_is_above_the_bound(
    precise_bound: np.ndarray, estimates: dict[int, np.ndarray]
) -> None:
    bound = precise_bound
    assert bound.mean() > -10  # trained: well above -20 log 2 = -13.86
    gap = estimates[1000] - bound
    # Jensen: E[log mean_k w_k] >= E[log w] = bound. Allow 4 standard errors of noise...
    assert gap.mean() > -4 * _standard_error(gap)
    # ... but in fact the gap KL(q(z|x) || p(z|x)) of a small trained model is clearly positive.
    assert gap.mean() > 4 * _standard_error(gap)


def test_one_importance_sample_is_the_bound_in_expectation(
    precise_bound: np.ndarray, estimates: dict[int, np.ndarray]
) -> None:
    difference = estimates[1] - precise_bound  # both unbiased for the ELBO of each row
    assert abs(difference.mean()) < 4 * _standard_error(difference)


def test_estimate_tightens_as_samples_grow(estimates: dict[int, np.ndarray]) -> None:
    means = {k: v.mean() for k, v in estimates.items()}
    for small, large in ((1, 10), (10, 1000), (1, 1000)):
        difference = estimates[large] - estimates[small]
        assert difference.mean() > -4 * _standard_error(difference), (small, large, means)
    clear = estimates[1000] - estimates[1]
    assert clear.mean() > 4 * _standard_error(clear), means
    # The K = 1000 estimate is much less noisy than a single importance weight.
    assert np.std(estimates[1000]) < np.std(estimates[1])


def test_estimate_cannot_beat_the_data_entropy(
    held_out: np.ndarray, estimates: dict[int, np.ndarray]
) -> None:
    # E[IS] <= E log p_model(x) <= E log p_data(x) (Gibbs' inequality on held-out data).
    excess = estimates[1000] - true_log_likelihood(held_out)
    assert excess.mean() < 4 * _standard_error(excess)


def test_estimate_is_deterministic_per_seed(trained: VAE, held_out: np.ndarray) -> None:
    data = held_out[:20]
    a = importance_sampled_log_likelihood(trained, data, samples=50, seed=7)
    b = importance_sampled_log_likelihood(trained, data, samples=50, seed=7)
    c = importance_sampled_log_likelihood(trained, data, samples=50, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (20,) and a.dtype == np.float64


@pytest.mark.parametrize(
    ("samples", "max_elements"),
    [
        (1000, 16_000_000),  # everything in one chunk
        (1000, 25_000),  # batches of 2 examples, chunks of 625 + 375 samples
        (7, 1),  # one example and one sample per chunk
    ],
)
def test_chunking_is_exact_when_every_weight_is_the_likelihood(
    samples: int, max_elements: int
) -> None:
    model, x, log_p = _z_free_model()
    estimate = importance_sampled_log_likelihood(
        model, x, samples=samples, max_elements_per_chunk=max_elements
    )
    # A lost or double-counted sample would shift this by log(count / samples).
    np.testing.assert_allclose(estimate, log_p, rtol=1e-5)


def test_chunking_does_not_change_the_estimate_beyond_sampling_error(
    trained: VAE, held_out: np.ndarray, estimates: dict[int, np.ndarray]
) -> None:
    data = held_out[:60]
    # 25_000 elements at D = 20: batches of 2 examples, chunks of 625 + 375 samples.
    chunked = importance_sampled_log_likelihood(
        trained, data, samples=1000, seed=3, max_elements_per_chunk=25_000
    )
    unchunked = estimates[1000][:60]
    assert np.all(np.isfinite(chunked))
    assert not np.array_equal(chunked, unchunked)  # other random streams...
    difference = chunked - unchunked  # ... but the same quantity
    assert abs(difference.mean()) < 4 * _standard_error(difference)


def test_samples_must_be_positive(trained: VAE, held_out: np.ndarray) -> None:
    with pytest.raises(ValueError, match="samples must be positive, got 0"):
        importance_sampled_log_likelihood(trained, held_out, samples=0)


# --------------------------------------------------------------------------- bound and evaluate


def test_bound_per_example_kl_is_exact_and_independent_of_batching(
    trained: VAE, held_out: np.ndarray
) -> None:
    data = held_out[:25]
    whole = bound_per_example(trained, data, batch_size=1000, seed=0)
    pieces = bound_per_example(trained, data, batch_size=7, seed=0)
    assert {name: v.shape for name, v in pieces.items()} == {
        "elbo": (25,),
        "reconstruction_log_likelihood": (25,),
        "kl": (25,),
    }
    q = trained.posterior(data)
    mu, sigma = q.mean().numpy().astype(np.float64), q.stddev().numpy().astype(np.float64)
    closed_form = 0.5 * np.sum(mu**2 + sigma**2 - 1 - np.log(sigma**2), axis=1)
    for parts in (whole, pieces):
        np.testing.assert_allclose(parts["kl"], closed_form, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            parts["elbo"], parts["reconstruction_log_likelihood"] - parts["kl"], rtol=1e-6
        )
    again = bound_per_example(trained, data, batch_size=7, seed=0)
    np.testing.assert_array_equal(again["elbo"], pieces["elbo"])
    other = bound_per_example(trained, data, batch_size=7, seed=1)
    assert not np.array_equal(other["elbo"], pieces["elbo"])


def test_evaluate_averages_the_per_example_numbers(trained: VAE, held_out: np.ndarray) -> None:
    data = held_out[:40]
    result = evaluate(trained, data, batch_size=16, seed=2)
    parts = bound_per_example(trained, data, batch_size=16, seed=2)
    assert isinstance(result, Evaluation)
    assert result.examples == 40
    assert result.elbo == pytest.approx(float(parts["elbo"].mean()), rel=1e-6)
    assert result.kl == pytest.approx(float(parts["kl"].mean()), rel=1e-6)
    assert result.reconstruction_log_likelihood == pytest.approx(
        float(parts["reconstruction_log_likelihood"].mean()), rel=1e-6
    )
    assert result.log_likelihood is None and result.importance_samples == 0
    assert set(result.to_dict()) == {"elbo", "reconstruction_log_likelihood", "kl", "examples"}

    with_ll = evaluate(trained, data, importance_samples=50, batch_size=16, seed=2)
    expected = importance_sampled_log_likelihood(trained, data, 50, seed=2).mean()
    assert with_ll.log_likelihood == pytest.approx(float(expected), rel=1e-9)
    assert with_ll.importance_samples == 50
    assert with_ll.to_dict()["log_likelihood"] == with_ll.log_likelihood
    assert with_ll.elbo == result.elbo


def test_evaluate_rejects_an_empty_data_set(trained: VAE) -> None:
    with pytest.raises(ValueError, match="cannot evaluate on an empty data set"):
        evaluate(trained, np.zeros((0, 20), np.float32))


def test_a_bound_under_given_parameters_is_the_models_own_and_compiles_once() -> None:
    config = VAEConfig(input_dim=6, latent_dim=2, hidden_dim=4, seed=11)
    data = np.random.default_rng(1).integers(0, 2, (9, 6)).astype(np.float32)
    models = [VAE(dataclasses.replace(config, seed=seed)) for seed in (1, 2, 3)]
    config_models = [VAE(config, parameters=m.parameters()) for m in models]  # same config
    for model in config_models:
        expected = bound_per_example(model, data, seed=4)["elbo"]
        measured = bound_with_parameters(config, model.parameters(), data, seed=4)
        np.testing.assert_allclose(measured, expected, rtol=1e-6)
    # NumPy arrays do as well; and one scratch model, so one compiled function, served all.
    arrays = [p.numpy() for p in config_models[0].parameters()]
    np.testing.assert_allclose(
        bound_with_parameters(config, arrays, data, seed=4),
        bound_per_example(config_models[0], data, seed=4)["elbo"],
        rtol=1e-6,
    )
    from vae import evaluation

    scratch = evaluation._scorers[config][0]
    assert evaluation._compiled_bound(scratch).experimental_get_tracing_count() == 1
