"""How a model's optimiser follows a drifting stream: the `--adaptation` policies.

The paper's Adagrad sums squared gradients for ever, so its steps shrink and a model
adapts ever more slowly the later a change comes. A policy names the optimiser fields of a
`vae.VAEConfig`: ``none`` (the paper's Adagrad), ``reset`` (Adagrad whose accumulators the
session restarts after a drift detection), ``decay`` (Adagrad forgetting its accumulators
with a half-life, its steps boosted at a drift detection), both with their steps clipped as
Adafactor clips its updates, and ``rmsprop`` or ``adam`` as baselines.

>>> adaptation_fields("decay", half_life_examples=50_000)["accumulator_half_life_examples"]
50000
>>> adaptation_fields("decay", half_life_examples=50_000)["drift_step_boost"]
3.0
>>> DEFAULT_LEARNING_RATES[adaptation_fields("adam", DEFAULT_HALF_LIFE_EXAMPLES)["optimizer"]]
0.001
"""

from __future__ import annotations

from typing import Any

from vae.config import UPDATE_CLIP_THRESHOLD

__all__ = [
    "ADAPTATIONS",
    "DEFAULT_HALF_LIFE_EXAMPLES",
    "DEFAULT_LEARNING_RATES",
    "DRIFT_STEP_BOOST",
    "adaptation_fields",
]

ADAPTATIONS: tuple[str, ...] = ("none", "reset", "decay", "rmsprop", "adam")
# Measured over 4*10^6 stationary MNIST examples at the paper's learning rate (docs/benchmarks.md,
# "Non-stationary streams"): with half-lives of 20,000 and 50,000 the bound had 10-30-nat dips
# that the drift detector reported 37 and 6 times; with 100,000, none.
DEFAULT_HALF_LIFE_EXAMPLES = 100_000.0
# `decay`'s steps at a detection, relaxing back with vae.optimizers' half-life of 25,000
# examples: measured on inverted digits after 4*10^6 MNIST examples (docs/benchmarks.md,
# "Non-stationary streams, part three"), 3 reached the paper's Adagrad's end-of-phase level
# in 0.21 of its examples, 2 in 0.25 and 4 in 0.25; without a boost, 0.31.
DRIFT_STEP_BOOST = 3.0
# Adaptive-moment methods want smaller steps than Adagrad (their usual defaults).
DEFAULT_LEARNING_RATES = {"adagrad": 0.02, "rmsprop": 1e-3, "adam": 1e-3}


def adaptation_fields(adaptation: str, half_life_examples: float) -> dict[str, Any]:
    """The optimiser fields of a `VAEConfig` for an `--adaptation`, the learning rate aside:
    `reset` and `decay` are Adagrad with its steps clipped, `decay` forgetting as well and
    boosting its steps at a detection."""
    adapting_adagrad = adaptation in ("reset", "decay")
    return {
        "optimizer": adaptation if adaptation in ("rmsprop", "adam") else "adagrad",
        "accumulator_half_life_examples": half_life_examples if adaptation == "decay" else None,
        "update_clip_threshold": UPDATE_CLIP_THRESHOLD if adapting_adagrad else None,
        "drift_step_boost": DRIFT_STEP_BOOST if adaptation == "decay" else None,
    }
