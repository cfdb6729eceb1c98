"""`aevb bench drift`: detection, recovery and forgetting on non-stationary streams.

Every scenario x adaptation policy trains a fresh model on the same stream (test-then-train,
the paper's model and minibatches) with the job's drift detector watching the bound:

- `detection_delay_examples`: from the true change to the first detection after it (None
  when nothing was detected before the stream ended);
- `false_alarms_per_million`: detections on a stationary stream (MNIST replayed) of
  `stationary_examples`, scaled to 10^6 examples;
- `recovery_examples`: examples after the change until the test-then-train bound, as a
  moving average over RECOVERY_WINDOW examples (placed at the window's middle, and only
  windows wholly after the change), is back within RECOVERY_NATS of the level the same
  policy reaches at the end of the post-change phase (that average's last value);
- `forgetting_nats`: the bound on the first phase's held-out data at the end of that
  phase minus the same at the end of the run (positive: the model forgot).

Policies: `none` (the paper's Adagrad), `reset` (Adagrad's accumulators zeroed at each
detection), `decay` (Adagrad forgetting its accumulators with a half-life), and RMSProp and
Adam as baselines.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import vae
from pipeline import scenarios
from pipeline.datasets import Dataset
from pipeline.drift import DriftMonitor, DriftSettings

POLICIES: tuple[str, ...] = ("none", "reset", "decay", "rmsprop", "adam")
RECOVERY_NATS = 5.0
RECOVERY_WINDOW = 2_000
DEFAULT_HALF_LIFE_EXAMPLES = 50_000
# Adaptive-moment methods need smaller steps than Adagrad's 0.02 (their usual defaults).
BASELINE_LEARNING_RATE = 1e-3
HELD_OUT_EXAMPLES = 2_000


@dataclasses.dataclass(frozen=True)
class StreamRun:
    """The test-then-train bound of every minibatch of one run, and what happened."""

    positions: np.ndarray  # examples seen after each minibatch
    bounds: np.ndarray  # its mean bound (nats), measured before its update
    detections: list[int]
    first_phase_bound_at_change: float | None
    first_phase_bound_at_end: float | None


def policy_config(
    policy: str, base: vae.VAEConfig, half_life: float = DEFAULT_HALF_LIFE_EXAMPLES
) -> vae.VAEConfig:
    if policy in ("none", "reset"):
        return base
    if policy == "decay":
        return dataclasses.replace(base, accumulator_half_life_examples=half_life)
    if policy in ("rmsprop", "adam"):
        return dataclasses.replace(base, optimizer=policy, learning_rate=BASELINE_LEARNING_RATE)
    raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")


def build_scenarios(
    mnist: Dataset, phase_examples: int, seed: int = 0
) -> dict[str, tuple[scenarios.Scenario, int, int]]:
    """name -> (scenario, true change point, total examples), all from MNIST."""
    held_out = mnist.test[:HELD_OUT_EXAMPLES]
    labels_out = mnist.test_labels[:HELD_OUT_EXAMPLES]
    pools = {"mnist": mnist.train, "inverted-mnist": scenarios.invert(mnist.train)}
    test_pools = {"mnist": held_out, "inverted-mnist": scenarios.invert(held_out)}
    p = phase_examples
    return {
        "class-incremental": (
            scenarios.class_incremental(
                mnist.train, mnist.train_labels, "0-4,5-9", p, seed, held_out, labels_out
            ),
            p,
            2 * p,
        ),
        "gradual": (
            scenarios.gradual_rotation(
                mnist.train,
                mnist.image_shape,
                start=p,
                span=p // 2,
                seed=seed,
                test_images=held_out,
            ),
            p,
            2 * p,
        ),
        "abrupt": (scenarios.abrupt(pools, p, seed, test_pools), p, 2 * p),
        "recurring": (scenarios.abrupt(pools, p, seed, test_pools, cycle=True), p, 3 * p),
    }


def run_stream(
    scenario: scenarios.Scenario,
    total: int,
    change: int | None,
    config: vae.VAEConfig,
    drift: DriftSettings,
    reset_on_drift: bool,
) -> StreamRun:
    trainer = vae.Trainer(config)
    monitor = DriftMonitor(drift)
    held_out = scenario.test_data(0)
    positions, bounds, detections = [], [], []
    bound_at_change = None
    chunk = 10 * config.batch_size
    for start in range(0, total, chunk):
        rows = scenario.examples(start, min(chunk, total - start))
        for first in range(0, len(rows), config.batch_size):
            if change is not None and bound_at_change is None and trainer.examples_seen >= change:
                bound_at_change = _held_out_bound(trainer, held_out)
            result = trainer.train_step(rows[first : first + config.batch_size])
            bound = float(result.elbo.mean())
            positions.append(trainer.examples_seen)
            bounds.append(bound)
            if result.applied and monitor.update(-bound, trainer.examples_seen):
                detections.append(trainer.examples_seen)
                if reset_on_drift:
                    trainer.reset_optimizer()
    return StreamRun(
        np.asarray(positions),
        np.asarray(bounds),
        detections,
        bound_at_change,
        _held_out_bound(trainer, held_out) if change is not None else None,
    )


def recovery_examples(run: StreamRun, change: int, phase_end: int) -> int | None:
    """Examples after `change` until the windowed bound is within RECOVERY_NATS of the
    level at the end of the phase [change, phase_end)."""
    batch = int(run.positions[1] - run.positions[0])
    window = max(1, RECOVERY_WINDOW // batch)
    smoothed = np.convolve(run.bounds, np.ones(window) / window, mode="valid")
    ends = run.positions[window - 1 :]
    # Only windows wholly after the change: one straddling it still averages the old level.
    in_phase = (ends - window * batch >= change) & (ends <= phase_end)
    if not in_phase.any():
        return None
    level = smoothed[in_phase][-1]
    recovered = in_phase & (smoothed >= level - RECOVERY_NATS)
    if not recovered.any():
        return None
    # The moment a window stands for is its middle.
    return int(ends[np.argmax(recovered)] - window * batch // 2 - change)


def drift_benchmark(
    mnist: Dataset,
    base: vae.VAEConfig,
    phase_examples: int = 150_000,
    stationary_examples: int = 1_000_000,
    policies: Sequence[str] = POLICIES,
    scenario_names: Sequence[str] | None = None,
    drift: DriftSettings = DriftSettings(),
    half_life: float = DEFAULT_HALF_LIFE_EXAMPLES,
) -> dict[str, Any]:
    streams = build_scenarios(mnist, phase_examples, base.seed)
    stationary = scenarios.abrupt({"mnist": mnist.train}, stationary_examples, base.seed)
    rows, curves = [], {}
    started = time.perf_counter()
    for policy in policies:
        config = policy_config(policy, base, half_life)
        calm = run_stream(stationary, stationary_examples, None, config, drift, policy == "reset")
        false_alarms = len(calm.detections) * 1e6 / stationary_examples
        for name, (scenario, change, total) in streams.items():
            if scenario_names and name not in scenario_names:
                continue
            run = run_stream(scenario, total, change, config, drift, policy == "reset")
            after = [d for d in run.detections if d > change]
            forgetting = None
            if run.first_phase_bound_at_change is not None:
                forgetting = run.first_phase_bound_at_change - run.first_phase_bound_at_end
            rows.append(
                {
                    "scenario": name,
                    "policy": policy,
                    "change_examples": change,
                    "detection_delay_examples": after[0] - change if after else None,
                    "detections": run.detections,
                    "false_alarms_per_million": false_alarms,
                    "recovery_examples": recovery_examples(run, change, change + phase_examples),
                    "forgetting_nats": forgetting,
                    "final_bound": float(run.bounds[-RECOVERY_WINDOW // base.batch_size :].mean()),
                }
            )
            curves[(name, policy)] = run
    return {
        "benchmark": "drift",
        "phase_examples": phase_examples,
        "stationary_examples": stationary_examples,
        "recovery_nats": RECOVERY_NATS,
        "recovery_window_examples": RECOVERY_WINDOW,
        "half_life_examples": half_life,
        "baseline_learning_rate": BASELINE_LEARNING_RATE,
        "drift": dataclasses.asdict(drift),
        "config": base.to_dict(),
        "seconds": time.perf_counter() - started,
        "results": rows,
        "_curves": curves,
    }


def _held_out_bound(trainer: vae.Trainer, data: np.ndarray | None) -> float | None:
    if data is None:
        return None
    return vae.evaluate(trainer.model, data).elbo
