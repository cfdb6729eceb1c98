"""`aevb bench drift` in a shortened form: the metrics' definitions and the goals that a short
stream can show (detection within 2,000 examples of an abrupt shift, no false alarm)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import vae
from benchmarks.drift import (
    LEVEL_WINDOW,
    MEMORY_SUFFIX,
    POLICIES,
    RECOVERY_NATS,
    RECOVERY_WINDOW,
    StreamRun,
    _add_recovery_to_reference_level,
    _level_at_end,
    drift_benchmark,
    examples_to_level,
    policy_config,
    self_recovery_examples,
)
from pipeline.ingest.datasets import load_dataset
from pipeline.jobs.options import AEVBOptions, model_config


def synthetic_run(level_before: float, dip: float, recover_after: int, change: int) -> StreamRun:
    """A bound that drops by `dip` at `change` and climbs back linearly in `recover_after`."""
    positions = np.arange(100, 60_001, 100)
    since = positions - change
    bounds = np.where(
        since <= 0,
        level_before,
        level_before - dip * np.clip(1 - since / recover_after, 0, 1),
    )
    return StreamRun(positions, bounds.astype(float), [], None, None)


def test_recovery_is_measured_against_the_level_reached_at_the_end_of_the_phase() -> None:
    change = 20_000
    run = synthetic_run(-100.0, dip=50.0, recover_after=10_000, change=change)
    measured = self_recovery_examples(run, change, phase_end=60_000)
    # Within RECOVERY_NATS of the final level once the dip has shrunk to 5 nats: after
    # 9,000 of the 10,000 examples; the centred 2,000-example window places it within a
    # window of that.
    assert abs(measured - 9_000) <= RECOVERY_WINDOW // 2 + 100
    slower = self_recovery_examples(
        synthetic_run(-100.0, 50.0, 30_000, change), change, phase_end=60_000
    )
    assert slower > 2.5 * measured
    assert RECOVERY_NATS == 5.0


def test_a_dip_at_the_end_of_the_phase_barely_moves_the_level_recovery_is_measured_to() -> None:
    change = 20_000
    steady = synthetic_run(-100.0, dip=50.0, recover_after=10_000, change=change)
    # Five minibatches 20 nats down at the very end: a 2,000-example level would sink by
    # 5 nats and call the recovery 1,000 examples early; the LEVEL_WINDOW mean sinks by 1.
    bounds = steady.bounds.copy()
    bounds[-5:] -= 20.0
    dipped = dataclasses.replace(steady, bounds=bounds)
    assert LEVEL_WINDOW == 10_000
    without = self_recovery_examples(steady, change, phase_end=60_000)
    with_dip = self_recovery_examples(dipped, change, phase_end=60_000)
    assert without - 300 <= with_dip < without


def test_recovery_from_a_gradual_change_counts_from_its_worst_point() -> None:
    change = 20_000
    positions = np.arange(100, 80_001, 100)
    since = (positions - change).astype(float)
    # Flat at -100, sinking linearly to -140 over 20,000 examples, then back to -110 over
    # 10,000: at the change itself the bound is still far above the final level.
    bounds = np.select(
        [since <= 0, since <= 20_000, since <= 30_000],
        [-100.0, -100.0 - 40.0 * since / 20_000, -140.0 + 30.0 * (since - 20_000) / 10_000],
        -110.0,
    )
    run = StreamRun(positions, bounds, [], None, None)
    measured = self_recovery_examples(run, change, phase_end=80_000)
    # Within 5 nats of -110 once the climb (3 nats per 1,000) has passed -115: 20,000 + 8,333
    # examples after the change; -120 is passed at 20,000 + 6,667.
    assert abs(measured - 28_333) <= 200
    reference = examples_to_level(run, change, 80_000, level=-120.0)
    assert abs(reference - 26_667) <= 200


def test_recovery_is_counted_to_nones_end_level_and_for_gradual_from_the_rotations_end() -> None:
    change, phase = 20_000, 40_000
    none = synthetic_run(-100.0, dip=50.0, recover_after=30_000, change=change)
    faster = synthetic_run(-100.0, dip=50.0, recover_after=10_000, change=change)
    curves, rows = {}, []
    for scenario in ("abrupt", "gradual"):
        for policy, run in (("none", none), ("decay", faster)):
            curves[(scenario, policy)] = run
            level = _level_at_end(run, change, change + phase)
            rows.append(
                {
                    "scenario": scenario,
                    "policy": policy,
                    "change_examples": change,
                    "level_at_end_of_phase": level,
                }
            )
    _add_recovery_to_reference_level(rows, curves, phase)
    recovery = {(r["scenario"], r["policy"]): r["recovery_examples"] for r in rows}
    # none ends the phase back at -100 (its last 10,000 examples): the faster policy gets
    # there after its 10,000-example climb, none after its 30,000 -- one common level.
    assert abs(recovery["abrupt", "decay"] - 10_000) <= RECOVERY_WINDOW // 2 + 100
    assert abs(recovery["abrupt", "none"] - 30_000) <= RECOVERY_WINDOW // 2 + 100
    # A gradual change counts from the end of its rotation, half a phase in.
    assert recovery["gradual", "none"] == recovery["abrupt", "none"] - phase // 2
    # Already there when the rotation ended: the first window wholly after it, at its middle.
    assert recovery["gradual", "decay"] == RECOVERY_WINDOW // 2


def test_policies_map_to_their_optimisers_as_the_jobs_flags_do() -> None:
    base = vae.VAEConfig()
    assert policy_config("none", base) == base
    reset, decay = policy_config("reset", base), policy_config("decay", base, half_life=1234)
    assert reset == dataclasses.replace(base, update_clip_threshold=vae.UPDATE_CLIP_THRESHOLD)
    assert decay.accumulator_half_life_examples == 1234
    assert decay.update_clip_threshold == vae.UPDATE_CLIP_THRESHOLD
    assert policy_config("adam", base).optimizer == "adam"
    for policy in POLICIES:
        flags = AEVBOptions([f"--adaptation={policy}", "--half-life-examples=1234"])
        assert model_config(flags) == policy_config(policy, base, half_life=1234), policy
    with pytest.raises(ValueError, match="unknown policy"):
        policy_config("sgd", base)
    assert policy_config("decay" + MEMORY_SUFFIX, base) == policy_config("decay", base)


@pytest.mark.slow
def test_abrupt_shift_is_detected_quickly_and_a_stationary_stream_raises_no_alarm() -> None:
    mnist = load_dataset("mnist", fallback="mnist-5k")
    stationary = 40_000
    result = drift_benchmark(
        mnist,
        vae.VAEConfig(),
        phase_examples=20_000,
        stationary_examples=stationary,
        policies=["none", "reset", "reset+memory"],
        scenario_names=["abrupt", "recurring"],
    )
    rows = {(row["scenario"], row["policy"]): row for row in result["results"]}
    policies = ("none", "reset", "reset+memory")
    assert set(rows) == {(s, p) for s in ("abrupt", "recurring") for p in policies}
    for policy in ("none", "reset"):
        abrupt = rows["abrupt", policy]
        assert abrupt["change_examples"] == stationary
        assert abrupt["detection_delay_examples"] is not None
        assert 0 < abrupt["detection_delay_examples"] <= 2_000
        assert abrupt["false_alarms_per_million"] == 0
        assert result["stationary_detections"][policy] == []
        assert abrupt["recovery_examples"] is not None
        # Inverted digits are new to a model of plain ones: its bound on the plain test
        # digits gets worse while it learns them.
        assert abrupt["forgetting_nats"] > 0
        # Plain digits come back: the change is the return, and they are remembered better.
        recurring = rows["recurring", policy]
        assert recurring["change_examples"] == stationary + 20_000
        assert recurring["forgetting_nats"] < abrupt["forgetting_nats"]
    # Every scenario continues the policy's stationary run: the same model up to the change,
    # and on to the return for `recurring`, which continues `abrupt`.
    curves = result["_curves"]
    for policy in ("none", "reset"):
        first = curves["stationary", policy]
        abrupt, recurring = curves["abrupt", policy], curves["recurring", policy]
        assert first.positions[-1] == stationary
        np.testing.assert_array_equal(abrupt.bounds[: len(first.bounds)], first.bounds)
        np.testing.assert_array_equal(recurring.bounds[: len(abrupt.bounds)], abrupt.bounds)
        assert recurring.positions[-1] == stationary + 40_000
    # A regime memory changes nothing where the new regime is new, and switches back when
    # plain digits return: within three minibatches, back at once to the level before.
    with_memory, without = rows["recurring", "reset+memory"], rows["recurring", "reset"]
    np.testing.assert_array_equal(
        curves["abrupt", "reset+memory"].bounds, curves["abrupt", "reset"].bounds
    )
    assert rows["abrupt", "reset+memory"]["regime_switches"] == []
    [switch] = with_memory["regime_switches"]
    assert 0 < switch - with_memory["change_examples"] <= 300
    assert with_memory["return_examples"] <= 2_000
    returned = curves["recurring", "reset+memory"]
    after = (returned.positions > switch) & (returned.positions <= switch + 1000)
    assert returned.bounds[after].mean() > with_memory["level_before_first_change"] - 10
    assert without["regime_switches"] == []
