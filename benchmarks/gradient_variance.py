"""`aevb bench gradient-variance`: the encoder gradient's variance under the reparameterised
and the score-function estimator, at several points of training (the paper's section 2.2).

The model trains on the data set's training split in reshuffled passes, as `aevb train`
replays it; at each point both estimators draw the gradient of one fixed minibatch of
training examples `draws` times, and each encoder tensor's summed variance is compared.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import vae
from benchmarks.machine import machine
from pipeline.ingest.datasets import Dataset
from vae.gradient_variance import gradient_moments

__all__ = ["DEFAULT_POINTS", "gradient_variance"]

DEFAULT_POINTS = (0, 10_000, 100_000, 1_000_000)


def gradient_variance(
    dataset: Dataset,
    config: vae.VAEConfig,
    points: Sequence[int] = DEFAULT_POINTS,
    draws: int = 100,
) -> dict[str, Any]:
    """Per point and encoder tensor: both estimators' summed variance and their ratio."""
    rng = np.random.default_rng(config.seed)
    minibatch = dataset.train[rng.choice(len(dataset.train), config.batch_size, replace=False)]
    trainer = vae.Trainer(config)
    order = np.empty(0, np.int64)
    rows, started = [], time.perf_counter()
    for point in sorted(points):
        while trainer.examples_seen < point:
            if len(order) < config.batch_size:
                order = np.concatenate([order, rng.permutation(len(dataset.train))])
            batch, order = order[: config.batch_size], order[config.batch_size :]
            trainer.train_step(dataset.train[batch])
        moments = {
            estimator: gradient_moments(trainer.model, minibatch, estimator, draws, seed=point)
            for estimator in ("reparameterized", "score_function")
        }
        for tensor, reparameterized in moments["reparameterized"].items():
            score = moments["score_function"][tensor]
            rows.append(
                {
                    "examples_seen": trainer.examples_seen,
                    "tensor": tensor,
                    "reparameterized_variance": reparameterized.total_variance,
                    "score_function_variance": score.total_variance,
                    "ratio": score.total_variance / reparameterized.total_variance,
                    # The signal the noise is measured against: the squared mean gradient.
                    "mean_gradient_squared_norm": float(np.sum(reparameterized.mean**2)),
                }
            )
    return {
        "benchmark": "gradient-variance",
        "dataset": dataset.name,
        "config": config.to_dict(),
        "draws": draws,
        "minibatch": config.batch_size,
        "rows": rows,
        "min_ratio": min(row["ratio"] for row in rows),
        "seconds": time.perf_counter() - started,
        "machine": machine(),
    }
