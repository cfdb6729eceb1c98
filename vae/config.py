"""Hyper-parameters of the model and of its learning algorithm.

The defaults are the paper's MNIST setting (Kingma & Welling 2014, section 5):
784-500-20 with tanh hidden units, minibatches of M = 100, L = 1 sample per datapoint,
the SGVB estimator B (analytic KL) and Adagrad with global step size 0.02.

>>> config = VAEConfig(input_dim=560, hidden_dim=200, likelihood="gaussian")
>>> config.latent_dim, config.estimator
(20, 'analytic_kl')
>>> VAEConfig.from_dict(config.to_dict()) == config
True
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Literal, get_args

Likelihood = Literal["bernoulli", "gaussian"]
Estimator = Literal["analytic_kl", "monte_carlo_kl"]
Precision = Literal["float32", "bfloat16"]
Method = Literal["aevb", "wake_sleep"]

LIKELIHOODS: tuple[str, ...] = get_args(Likelihood)
# The paper's SGVB estimator A (eq. 6) estimates the KL term by Monte Carlo too;
# estimator B (eq. 7) integrates it analytically and has lower variance.
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
ESTIMATOR_ALIASES = {"A": "monte_carlo_kl", "B": "analytic_kl"}
PRECISIONS: tuple[str, ...] = get_args(Precision)
# The paper's baseline (its Figure 2): wake-sleep (Hinton et al. 1995) trains the decoder on
# z drawn from the encoder and the encoder on the decoder's own dreams.
METHODS: tuple[str, ...] = get_args(Method)
# Spelled out here, not imported from vae.optimizers: this module must not import TensorFlow.
OPTIMIZERS: tuple[str, ...] = ("adagrad", "rmsprop", "adam")
# Adafactor's d (Shazeer & Stern 2018, section 6), for an Adagrad that adapts to drift
# (`reset` or `decay`). Measured after 4*10^6 MNIST examples: with a half-life of 100,000 on
# inverted digits, no dip (10 drift detections without it) and a bound 10 nats higher at
# the end; after `reset`'s restart, the worst minibatch -198 instead of -548 nats on new
# digits and -191 instead of -712 in a rotation (docs/benchmarks.md, "Non-stationary streams").
UPDATE_CLIP_THRESHOLD = 1.0


def check_likelihood(likelihood: str) -> str:
    """`likelihood` if it names one of the decoders, else ValueError saying which exist."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a model and its trainer.

    Attributes:
      input_dim: D, the number of observed variables per example.
      latent_dim: J, the size of z.
      hidden_dim: units of the one hidden tanh layer of encoder and of decoder.
      likelihood: "bernoulli" for data in [0, 1] (MNIST), "gaussian" for continuous
        data (Frey Face; sigmoid-squashed means, learned per-pixel variance).
      estimator: "analytic_kl" (SGVB estimator B, default) or "monte_carlo_kl" (A).
      samples_per_example: L, samples of z per datapoint in the bound estimate.
      batch_size: M, examples per minibatch.
      learning_rate: Adagrad's global step size (the paper picks from {0.01, 0.02, 0.1}).
      weight_decay: coefficient of the MAP prior p(theta) = N(0, I); 0 disables it. For a
        data set of N examples the paper's objective, divided by N, adds
        weight_decay = 1 / N times log p(theta) to the per-example bound.
      optimizer: "adagrad" (the paper's), or "rmsprop"/"adam" as baselines on drifting data.
      accumulator_half_life_examples: None for the paper's Adagrad, whose squared-gradient
        sums grow for ever; a number of examples makes them forget with that half-life, so
        the model keeps adapting to a drifting stream (see `vae.optimizers`).
      update_clip_threshold: None for the paper's Adagrad; a number d clips each tensor's
        step as Adafactor clips its updates, to a root mean square of d * lr / sqrt(N) for
        the N updates the accumulators hold, when the gradients outgrow the accumulators.
        An Adagrad whose accumulators forget or are reset needs it (UPDATE_CLIP_THRESHOLD).
      drift_step_boost: None for steps that ignore drift; a number B > 1 multiplies
        Adagrad's steps by B when a drift detector fires (`Trainer.boost_steps`), the
        boost relaxing back to 1 with a half-life of
        `vae.optimizers.STEP_BOOST_HALF_LIFE_EXAMPLES` examples.
      method: "aevb" (the paper's: both networks ascend the SGVB bound) or "wake_sleep" (the
        wake phase ascends log p(x, z) in the decoder's parameters for z ~ q(z|x), the sleep
        phase log q(z|x) in the encoder's for dreams z ~ p(z), x ~ p(x|z)); the bound is
        estimated and reported the same way for both.
      precision: the arithmetic of the training step's matrix products. "bfloat16" feeds
        them bfloat16 inputs (mixed precision: parameters, optimiser state, reductions and
        the reported bound stay float32); evaluation and exported snapshots compute in
        float32 whichever the model was trained with.
      init_stddev: parameters start from N(0, init_stddev^2). The paper's "N(0, 0.01)" is
        read as standard deviation 0.01, as in the authors' code and common replications.
      seed: seeds parameter initialisation and the trainer's random generator.
    """

    input_dim: int = 784
    latent_dim: int = 20
    hidden_dim: int = 500
    likelihood: Likelihood = "bernoulli"
    estimator: Estimator = "analytic_kl"
    samples_per_example: int = 1
    batch_size: int = 100
    learning_rate: float = 0.02
    weight_decay: float = 0.0
    optimizer: str = "adagrad"
    accumulator_half_life_examples: float | None = None
    update_clip_threshold: float | None = None
    drift_step_boost: float | None = None
    method: Method = "aevb"
    precision: Precision = "float32"
    init_stddev: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        estimator = ESTIMATOR_ALIASES.get(self.estimator, self.estimator)
        object.__setattr__(self, "estimator", estimator)
        for name in ("input_dim", "latent_dim", "hidden_dim", "samples_per_example", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        check_likelihood(self.likelihood)
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {ESTIMATORS} (or 'A'/'B'), got {self.estimator!r}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        half_life = self.accumulator_half_life_examples
        if half_life is not None and (self.optimizer != "adagrad" or not half_life > 0):
            raise ValueError(
                "accumulator_half_life_examples must be a positive number of examples and "
                f"applies to adagrad only, got {half_life!r} with {self.optimizer!r}"
            )
        clip = self.update_clip_threshold
        if clip is not None and (self.optimizer != "adagrad" or not clip > 0):
            raise ValueError(
                "update_clip_threshold must be positive and applies to adagrad only, "
                f"got {clip!r} with {self.optimizer!r}"
            )
        boost = self.drift_step_boost
        if boost is not None and (self.optimizer != "adagrad" or not boost > 1):
            raise ValueError(
                "drift_step_boost must be above 1 and applies to adagrad only, "
                f"got {boost!r} with {self.optimizer!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.init_stddev > 0:
            raise ValueError(f"init_stddev must be positive, got {self.init_stddev!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VAEConfig:
        """Builds a config from `to_dict` output, ignoring keys this version does not know."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})
