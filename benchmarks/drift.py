"""`aevb bench drift`: detection, recovery and forgetting on non-stationary streams.

Every adaptation policy first learns a stationary MNIST stream of `stationary_examples`
(test-then-train, the paper's model and minibatches, the job's drift detector watching the
bound): its detections are the false alarms. Each MNIST scenario then continues a copy of
that learner -- model, optimiser state and detector -- where the stationary stream ends, so
its change comes late (after 4*10^6 examples by default), when the paper's Adagrad has
already slowed down; `class-incremental` learns digits 0-4 for as long, then 5-9:

- `abrupt`: inverted MNIST for `phase_examples` after the change;
- `recurring`: the same, then plain MNIST again for `phase_examples`; its change is the
  return, which the model has seen before;
- `gradual`: images rotated by an angle growing from 0 to 90 degrees over half a phase,
  then staying there for the other half.

Per scenario x policy:

- `detection_delay_examples`: from the true change to the first detection after it (None
  when nothing was detected before the stream ended);
- `false_alarms_per_million`: the policy's detections on the stationary stream, per 10^6;
- `recovery_examples`: examples after the change until the test-then-train bound, as a
  moving average over RECOVERY_WINDOW examples (placed at the window's middle, and only
  windows wholly after the change), reaches the level `none` (the paper's Adagrad) ends the
  post-change phase at (its mean bound over the phase's last LEVEL_WINDOW examples): one
  common level for every policy; for `gradual` counted from the end of the rotation, when
  the new distribution is in place (None without a `none` run);
- `self_recovery_examples`: the same until within RECOVERY_NATS of the level the policy
  itself ends the phase at (a curve's shape: a policy that stops learning meets it soonest);
- `return_examples` (`recurring`): examples after the return until the moving average is
  back within RECOVERY_NATS of the policy's own level before the first change;
- `forgetting_nats`: the bound on the first phase's held-out data at the end of that
  phase minus the same at the end of the run (positive: the model forgot).

Policies: `none` (the paper's Adagrad), `reset` (Adagrad's accumulators restarted at 500
updates' worth after each detection, at the new data's scale where that is larger), `decay`
(Adagrad forgetting its accumulators with a half-life), both with their steps clipped when
the gradients outgrow the accumulators, and RMSProp and Adam as baselines. `P+memory` is
policy P with a memory of regimes (`--regime-memory`, `pipeline.train.regimes`); its
switches are in `regime_switches`. A memory acts only on detections: where P had none
before the change, P+memory continues a copy of P's learner from there (the same run: P's
learner keeps a passive memory, which copies the state as an active one would).

`PROFILES` name the benchmark's settings: `full` (the default above) and `quick` (changes
after 10^6 examples, phases of 300,000, three scenarios, the policies that matter).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import vae
from pipeline.ingest import scenarios
from pipeline.ingest.datasets import Dataset
from pipeline.train.adaptation import (
    ADAPTATIONS,
    DEFAULT_HALF_LIFE_EXAMPLES,
    DEFAULT_LEARNING_RATES,
    adaptation_fields,
)
from pipeline.train.drift import DriftDetection, DriftMonitor, DriftSettings
from pipeline.train.instability import SHARE, InstabilityCheck
from pipeline.train.regimes import RegimeMemory

POLICIES: tuple[str, ...] = ADAPTATIONS  # every --adaptation of the job
MEMORY_SUFFIX = "+memory"
DEFAULT_REGIME_MEMORY = 4
RECOVERY_NATS = 5.0
RECOVERY_WINDOW = 2_000
# The level a policy reaches at the end of a phase: over 2,000 examples, one 20-nat dip of
# a few minibatches moved it by 3 nats and a recovery figure from 46,000 to 7,100 examples.
LEVEL_WINDOW = 10_000
HELD_OUT_EXAMPLES = 2_000
# The change comes after 4*10^4 updates, within the range of the toy run: at 10^4 the
# paper's Adagrad had not slowed enough to matter (docs/benchmarks.md, both runs).
STATIONARY_EXAMPLES = 4_000_000
CHUNK_EXAMPLES = 1_000
PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "stationary_examples": STATIONARY_EXAMPLES,
        "phase_examples": 500_000,
        "scenarios": scenarios.SCENARIOS,
        "policies": POLICIES,
    },
    # Within 10 minutes on 2 cores: the changes after 10^6 examples, the scenarios that tell
    # the policies apart (a new regime, a returning one, new classes), the Adagrad policies.
    "quick": {
        "stationary_examples": 1_000_000,
        "phase_examples": 300_000,
        "scenarios": ("abrupt", "recurring", "class-incremental"),
        "policies": ("none", "reset", "decay", "reset+memory", "decay+memory"),
    },
}


@dataclasses.dataclass(frozen=True)
class StreamRun:
    """The test-then-train bound of every minibatch of one run, and what happened."""

    positions: np.ndarray  # examples seen after each minibatch
    bounds: np.ndarray  # its mean bound (nats), measured before its update
    detections: list[int]
    first_phase_bound_at_change: float | None
    first_phase_bound_at_end: float | None
    detectors: tuple[str, ...] = ()  # which detector made each detection
    switches: list[int] = dataclasses.field(default_factory=list)  # back to a stored regime
    instabilities: list[int] = dataclasses.field(default_factory=list)  # the model's own

    def since(self, position: int) -> StreamRun:
        """The same run from `position` on (for plotting around a late change)."""
        keep = self.positions > position
        return dataclasses.replace(self, positions=self.positions[keep], bounds=self.bounds[keep])


class _Learner:
    """A trainer and the drift monitor watching it, with everything it has measured."""

    def __init__(
        self,
        config: vae.VAEConfig,
        drift: DriftSettings,
        reset_on_drift: bool,
        regime_memory: int = 0,
        switching: bool = True,
    ):
        self.trainer = vae.Trainer(config)
        self.monitor = DriftMonitor(drift)
        self.reset_on_drift = reset_on_drift
        self.memory = RegimeMemory(self.trainer, regime_memory) if regime_memory else None
        self.instability = InstabilityCheck()
        self.instabilities: list[int] = []  # detections the model caused: not drift
        # A passive memory (not `switching`) only keeps its copies of the state, for the
        # active ones its forks will have.
        self.switching = switching
        self.positions: list[int] = []
        self.bounds: list[float] = []
        self.detections: list[tuple[int, str]] = []
        self.switches: list[int] = []

    def learn(self, stream: scenarios.Scenario, stop: int) -> None:
        """Trains on `stream` from where this learner is up to example `stop`."""
        batch = self.trainer.config.batch_size
        for start in range(self.trainer.examples_seen, stop, CHUNK_EXAMPLES):
            rows = stream.examples(start, min(CHUNK_EXAMPLES, stop - start))
            for first in range(0, len(rows), batch):
                result = self.trainer.train_step(rows[first : first + batch])
                bound = float(result.elbo.mean())
                seen = self.trainer.examples_seen
                self.positions.append(seen)
                self.bounds.append(bound)
                detection = result.applied and self.monitor.update(-bound, seen)
                if detection:
                    self._detected(detection, rows[first : first + batch], seen)
                if result.applied:
                    self.instability.observe(rows[first : first + batch], result.elbo)
                if self.memory is not None and result.applied:
                    self._consider_regimes(rows[first : first + batch], bound, seen)

    def _detected(self, detection: DriftDetection, rows: np.ndarray, seen: int) -> None:
        """As the session: the model's own instability is not drift (with a memory, the
        model goes back to its copy from before); drift opens the memory's window, then
        `reset` resets."""
        rise = detection.value - detection.baseline
        seed = self.trainer.config.seed
        noise = self.monitor.noise.value
        model = self.trainer.model
        unstable, earlier_rise = self.instability.is_instability(model, rows, rise, noise, seed)
        if unstable:
            self.instabilities.append(seen)
            memory = self.memory if self.switching else None
            if memory is not None and memory.roll_back(seen, earlier_rise, rise * SHARE):
                self.switches.append(seen)
            return
        self.detections.append((seen, detection.detector))
        if self.memory is not None and self.switching:  # before the reset
            self.memory.open_window(seen)
        if self.reset_on_drift:
            self.trainer.reset_optimizer()
        if self.trainer.config.drift_step_boost is not None:
            self.trainer.boost_steps()

    def _consider_regimes(self, batch: np.ndarray, bound: float, seen: int) -> None:
        self.memory.observe(bound)
        if self.memory.scoring:
            noise = self.monitor.noise.value
            if self.memory.consider(batch, bound, noise, seen) is not None:
                self.switches.append(seen)

    def fork(self, regime_memory: int | None = None) -> _Learner:
        """An independent copy that continues exactly as this one would; with
        `regime_memory`, one that switches with a memory of that many regimes from here on
        (starting from this one's, passive or not)."""
        twin = copy.copy(self)
        config = self.trainer.config
        with tempfile.TemporaryDirectory() as folder:
            path = self.trainer.checkpoint().write(f"{folder}/state")
            twin.trainer = vae.Trainer(config)
            twin.trainer.checkpoint().read(path).assert_consumed()
        twin.monitor = copy.deepcopy(self.monitor)
        twin.positions, twin.bounds = list(self.positions), list(self.bounds)
        twin.detections, twin.switches = list(self.detections), list(self.switches)
        twin.instabilities = list(self.instabilities)
        twin.instability = copy.deepcopy(self.instability)
        capacity = regime_memory or (self.memory.capacity if self.memory else 0)
        twin.memory = RegimeMemory(twin.trainer, capacity) if capacity else None
        if self.memory is not None and twin.memory is not None:
            twin.memory.load(self.memory.state(), self.memory.arrays())
        twin.switching = self.switching or regime_memory is not None
        return twin

    def held_out_bound(self, data: np.ndarray) -> float:
        return vae.evaluate(self.trainer.model, data).elbo

    def run(self, bound_at_change: float | None, held_out: np.ndarray | None) -> StreamRun:
        return StreamRun(
            np.asarray(self.positions),
            np.asarray(self.bounds),
            [seen for seen, _ in self.detections],
            bound_at_change,
            self.held_out_bound(held_out) if held_out is not None else None,
            tuple(detector for _, detector in self.detections),
            list(self.switches),
            list(self.instabilities),
        )


def policy_config(
    policy: str, base: vae.VAEConfig, half_life: float = DEFAULT_HALF_LIFE_EXAMPLES
) -> vae.VAEConfig:
    """`base` with the optimiser `aevb train --adaptation policy` would use (a
    `P+memory` policy: P's)."""
    policy = policy.removesuffix(MEMORY_SUFFIX)
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")
    config = dataclasses.replace(base, **adaptation_fields(policy, half_life))
    if config.optimizer != "adagrad":
        learning_rate = DEFAULT_LEARNING_RATES[config.optimizer]
        config = dataclasses.replace(config, learning_rate=learning_rate)
    return config


def self_recovery_examples(run: StreamRun, change: int, phase_end: int) -> int | None:
    """Examples after `change` until the windowed bound, past its worst level in the phase
    [change, phase_end), is within RECOVERY_NATS of the level at the end of that phase."""
    level = _level_at_end(run, change, phase_end)
    if level is None:
        return None
    return examples_to_level(run, change, phase_end, level - RECOVERY_NATS)


def examples_to_level(run: StreamRun, change: int, phase_end: int, level: float) -> int | None:
    """Examples after `change` until the windowed bound, past its worst level in the phase,
    reaches `level` (None if it never does before `phase_end`)."""
    smoothed, middles, in_phase = _phase_windows(run, change, phase_end)
    if not in_phase.any():
        return None
    # "Back" only after the worst point: a gradual change starts at the old level, which a
    # rule without it would count as reached at once.
    worst = np.flatnonzero(in_phase)[np.argmin(smoothed[in_phase])]
    reached = in_phase & (np.arange(len(smoothed)) >= worst) & (smoothed >= level)
    return int(middles[np.argmax(reached)] - change) if reached.any() else None


def _phase_windows(
    run: StreamRun, change: int, phase_end: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The RECOVERY_WINDOW moving average, the example each window stands for (its
    middle), and which windows lie in the phase."""
    batch = int(run.positions[1] - run.positions[0])
    window = max(1, RECOVERY_WINDOW // batch)
    smoothed = np.convolve(run.bounds, np.ones(window) / window, mode="valid")
    ends = run.positions[window - 1 :]
    # Only windows wholly after the change: one straddling it still averages the old level.
    in_phase = (ends - window * batch >= change) & (ends <= phase_end)
    return smoothed, ends - window * batch // 2, in_phase


def _level_at_end(run: StreamRun, change: int, phase_end: int) -> float | None:
    """The mean bound over the last LEVEL_WINDOW examples of the phase (after the change)."""
    last = (run.positions > max(change, phase_end - LEVEL_WINDOW)) & (run.positions <= phase_end)
    return float(run.bounds[last].mean()) if last.any() else None


def drift_benchmark(
    mnist: Dataset,
    base: vae.VAEConfig,
    phase_examples: int = 500_000,
    stationary_examples: int = STATIONARY_EXAMPLES,
    policies: Sequence[str] = POLICIES,
    scenario_names: Sequence[str] | None = None,
    drift: DriftSettings = DriftSettings(),
    half_life: float = DEFAULT_HALF_LIFE_EXAMPLES,
    regime_memory: int = DEFAULT_REGIME_MEMORY,
) -> dict[str, Any]:
    """Runs every policy on the stationary stream and every scenario; one row per pair.
    `regime_memory` is the library size of the `P+memory` policies."""
    names = [n for n in scenarios.SCENARIOS if not scenario_names or n in scenario_names]
    seed, change, p = base.seed, stationary_examples, phase_examples
    held_out = mnist.test[:HELD_OUT_EXAMPLES]
    pools = {"mnist": mnist.train, "inverted-mnist": scenarios.invert(mnist.train)}
    # The first phase of every MNIST scenario is this stream's [0, change): one draw order.
    stationary = scenarios.abrupt({"mnist": mnist.train}, change, seed)
    inverted_after = scenarios.abrupt(pools, change, seed)
    rotating_after = scenarios.gradual_rotation(
        mnist.train, mnist.image_shape, start=change, span=p // 2, seed=seed
    )
    test_labels = mnist.test_labels[:HELD_OUT_EXAMPLES]
    classes = scenarios.class_incremental(
        mnist.train, mnist.train_labels, "0-4,5-9", change, seed, held_out, test_labels
    )
    rows, curves, stationary_detections = [], {}, {}
    # Each policy's learners where the changes come: the stationary one (plain digits) and
    # the class-incremental one (digits 0-4), with their held-out bounds there.
    at_change: dict[str, tuple[_Learner, _Learner | None, float, float | None]] = {}

    def learners_at_change(policy: str) -> tuple[_Learner, _Learner | None, float, float | None]:
        if policy in at_change:
            return at_change[policy]
        base_policy = policy.removesuffix(MEMORY_SUFFIX)
        memory = regime_memory if policy.endswith(MEMORY_SUFFIX) else 0
        if memory:
            # A memory acts only on detections (a drift or the model's instability): without
            # any before the change, the policy's own learners there are this one's too.
            plain, digits, bound, digits_bound = learners_at_change(base_policy)
            learners = [plain, *([digits] if digits is not None else [])]
            if not any(learner.detections or learner.instabilities for learner in learners):
                twin = digits.fork(memory) if digits is not None else None
                at_change[policy] = (plain.fork(memory), twin, bound, digits_bound)
                return at_change[policy]
        config = policy_config(policy, base, half_life)
        reset = base_policy == "reset"
        # P's learners keep a passive memory when P+memory is asked for too.
        passive = not memory and f"{policy}{MEMORY_SUFFIX}" in policies
        learner_memory = {"regime_memory": memory or (regime_memory if passive else 0)}
        learner_memory["switching"] = not passive
        learner = _Learner(config, drift, reset_on_drift=reset, **learner_memory)
        learner.learn(stationary, change)
        digits, digits_bound = None, None
        if "class-incremental" in names:
            digits = _Learner(config, drift, reset_on_drift=reset, **learner_memory)
            digits.learn(classes, change)
            digits_bound = digits.held_out_bound(classes.test_data(0))
        at_change[policy] = (learner, digits, learner.held_out_bound(held_out), digits_bound)
        return at_change[policy]

    started = time.perf_counter()
    for policy in policies:
        learner, digits_learner, at_change_bound, digits_at_change = learners_at_change(policy)
        stationary_detections[policy] = [
            {"examples": seen, "detector": detector} for seen, detector in learner.detections
        ]
        false_alarms = len(learner.detections) * 1e6 / change
        runs: dict[str, tuple[_Learner, int, int, float | None, np.ndarray | None]] = {}
        if "class-incremental" in names:
            digits = digits_learner.fork()
            digits.learn(classes, change + p)
            first_digits = classes.test_data(0)
            runs["class-incremental"] = (digits, change, change + p, digits_at_change, first_digits)
        if "gradual" in names:
            rotated = learner.fork()
            rotated.learn(rotating_after, change + p)
            runs["gradual"] = (rotated, change, change + p, at_change_bound, held_out)
        if "abrupt" in names or "recurring" in names:
            inverted = learner.fork()
            inverted.learn(inverted_after, change + p)
            if "recurring" in names:
                returned = inverted.fork()
                # Plain MNIST again: the stationary stream goes on past its first phase.
                returned.learn(stationary, change + 2 * p)
                runs["recurring"] = (
                    returned,
                    change + p,
                    change + 2 * p,
                    at_change_bound,
                    held_out,
                )
            if "abrupt" in names:
                runs["abrupt"] = (inverted, change, change + p, at_change_bound, held_out)
        for name in names:
            run_learner, true_change, end, bound_at_change, first_phase = runs[name]
            run = run_learner.run(bound_at_change, first_phase)
            after = [d for d in run.detections if d > true_change]
            forgetting = None
            if run.first_phase_bound_at_change is not None:
                forgetting = run.first_phase_bound_at_change - run.first_phase_bound_at_end
            row = {
                "scenario": name,
                "policy": policy,
                "change_examples": true_change,
                "detection_delay_examples": after[0] - true_change if after else None,
                "detections": run.detections,
                "detectors": list(run.detectors),
                "false_alarms_per_million": false_alarms,
                # The first phase is stationary too (digits 0-4 for class-incremental).
                "detections_before_change": sum(d <= change for d in run.detections),
                "regime_switches": run.switches,
                "instabilities": run.instabilities,
                "regime_switches_before_change": sum(w <= change for w in run.switches),
                "self_recovery_examples": self_recovery_examples(run, true_change, end),
                "level_at_end_of_phase": _level_at_end(run, true_change, end),
                "forgetting_nats": forgetting,
                "final_bound": float(run.bounds[-RECOVERY_WINDOW // base.batch_size :].mean()),
            }
            if name == "recurring":
                before = _level_at_end(run, 0, change)
                row["level_before_first_change"] = before
                row["return_examples"] = examples_to_level(
                    run, true_change, end, before - RECOVERY_NATS
                )
            rows.append(row)
            curves[(name, policy)] = run
        curves[("stationary", policy)] = learner.run(None, None)
    _add_recovery_to_reference_level(rows, curves, phase_examples)
    return {
        "benchmark": "drift",
        "phase_examples": phase_examples,
        "stationary_examples": stationary_examples,
        "recovery_nats": RECOVERY_NATS,
        "recovery_window_examples": RECOVERY_WINDOW,
        "level_window_examples": LEVEL_WINDOW,
        "half_life_examples": half_life,
        "regime_memory": regime_memory,
        "baseline_learning_rate": DEFAULT_LEARNING_RATES["rmsprop"],
        "drift": dataclasses.asdict(drift),
        "config": base.to_dict(),
        "seconds": time.perf_counter() - started,
        "stationary_detections": stationary_detections,
        "results": rows,
        "_curves": curves,
    }


def _add_recovery_to_reference_level(
    rows: list[dict[str, Any]],
    curves: dict[tuple[str, str], StreamRun],
    phase_examples: int,
) -> None:
    """`recovery_examples`: examples after the change until a policy's bound reaches the
    level the paper's Adagrad (`none`) ends the phase at -- how soon it is as good as the
    reference will ever be in that phase (None without a `none` run). For `gradual`,
    counted from the end of the rotation (half a phase after its start)."""
    reference = {r["scenario"]: r["level_at_end_of_phase"] for r in rows if r["policy"] == "none"}
    for row in rows:
        level = reference.get(row["scenario"])
        run = curves[(row["scenario"], row["policy"])]
        change = row["change_examples"]
        end = change + phase_examples
        if row["scenario"] == "gradual":
            change += phase_examples // 2
        row["recovery_examples"] = (
            None if level is None else examples_to_level(run, change, end, level)
        )


def drift_benchmark_figure(
    runs: dict[str, Any], change: int, path: str | os.PathLike, scenario: str
) -> pathlib.Path:
    """The test-then-train bound of each adaptation policy around a scenario's change.

    `runs` maps policy -> `StreamRun`; curves are moving averages over
    2,000 examples, detections are ticks on each policy's curve.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    values = []
    for policy, run in runs.items():
        batch = int(run.positions[1] - run.positions[0])
        window = max(1, 2_000 // batch)
        smoothed = np.convolve(run.bounds, np.ones(window) / window, mode="valid")
        positions = run.positions[window - 1 :]
        (line,) = axes.plot(positions, smoothed, lw=1.2, label=policy)
        values.append(smoothed)
        detected = [d for d in run.detections if positions[0] <= d <= positions[-1]]
        if detected:
            at = np.searchsorted(positions, detected).clip(0, len(positions) - 1)
            axes.scatter(detected, smoothed[at], marker="v", s=30, color=line.get_color())
    axes.axvline(change, color="black", ls=":", lw=1.0, label="true change")
    everything = np.concatenate(values)
    axes.set_ylim(np.percentile(everything, 2) - 5, everything.max() + 5)
    axes.set_xlabel("training examples seen")
    axes.set_ylabel("test-then-train bound (nats, 2,000-example average)")
    axes.set_title(f"{scenario}: adaptation policies (triangles: drift detections)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
