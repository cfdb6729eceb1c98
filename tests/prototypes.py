"""A data set whose log-likelihood is known exactly, for tests of learning and evaluation.

Four 20-bit prototypes with 5% bit flips; every bit is 1 in exactly two prototypes, so each
bit's marginal is 1/2 and the best model that ignores the latent variable scores exactly
-20 log 2 nats.
"""

import math

import numpy as np

PROTOTYPES = np.array(
    [[1] * 10 + [0] * 10, [0] * 10 + [1] * 10, [1, 0] * 10, [0, 1] * 10], dtype=np.float32
)
FLIP = 0.05


def prototype_data(rows: int, seed: int) -> np.ndarray:
    """`rows` draws: a uniformly chosen prototype with each bit flipped with probability FLIP."""
    rng = np.random.default_rng(seed)
    x = PROTOTYPES[rng.integers(0, len(PROTOTYPES), rows)]
    return np.where(rng.random(x.shape) < FLIP, 1 - x, x).astype(np.float32)


def true_log_likelihood(x: np.ndarray) -> np.ndarray:
    """log p(x) under the generating mixture: uniform prototype, independent bit flips."""
    flips = np.abs(x[:, None, :] - PROTOTYPES[None, :, :]).sum(axis=2)  # [N, 4]
    d = x.shape[1]
    log_terms = (
        -math.log(len(PROTOTYPES)) + flips * math.log(FLIP) + (d - flips) * math.log1p(-FLIP)
    )
    peak = log_terms.max(axis=1)
    return peak + np.log(np.exp(log_terms - peak[:, None]).sum(axis=1))
