"""Drift scenarios: schedules, determinism, and that each phase draws what it says."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ingest import scenarios

SIDE = 6


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = rng.random((100, SIDE * SIDE)).astype(np.float32)
    return rows, np.repeat(np.arange(10), 10)


def test_any_stretch_of_the_stream_is_the_same_however_it_is_cut(images) -> None:
    rows, labels = images
    scenario = scenarios.class_incremental(rows, labels, "0-4,5-9", phase_examples=70, seed=3)
    whole = scenario.examples(0, 200)
    pieces = np.concatenate([scenario.examples(start, 40) for start in range(0, 200, 40)])
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(whole[65:75], scenario.examples(65, 10))


def test_phases_draw_only_their_classes_in_reshuffled_passes(images) -> None:
    rows, labels = images
    scenario = scenarios.class_incremental(rows, labels, "0-4,5-9", phase_examples=120)
    first, second = scenario.examples(0, 120), scenario.examples(120, 120)
    lower, upper = rows[labels < 5], rows[labels >= 5]
    assert np.isin(first, lower).all() and np.isin(second, upper).all()
    # The first 50 examples of a phase are one pass: each of its 50 images exactly once.
    first_pass = {row.tobytes() for row in first[:50]}
    assert first_pass == {row.tobytes() for row in lower}
    assert not np.array_equal(first[:50], first[50:100])  # the next pass is reshuffled


def test_a_seed_fixes_the_stream_and_another_seed_changes_it(images) -> None:
    rows, labels = images
    make = lambda seed: scenarios.class_incremental(rows, labels, "0-9", 500, seed)  # noqa: E731
    np.testing.assert_array_equal(make(1).examples(0, 50), make(1).examples(0, 50))
    assert not np.array_equal(make(1).examples(0, 50), make(2).examples(0, 50))


def test_class_groups_parse_and_reject_bad_specs() -> None:
    assert scenarios.parse_classes("0-4,5-9") == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert scenarios.parse_classes("3,7") == [[3], [7]]
    with pytest.raises(ValueError, match="classes are 0-9"):
        scenarios.parse_classes("5-12")
    with pytest.raises(ValueError, match="use digits"):
        scenarios.parse_classes("a-b")


def test_abrupt_switch_and_recurring_cycle(images) -> None:
    rows, _ = images
    pools = {"plain": rows, "inverted": scenarios.invert(rows)}
    abrupt = scenarios.abrupt(pools, phase_examples=30)
    assert [(p.start, p.end, p.name) for p in abrupt.phases(100)] == [
        (0, 30, "plain"),
        (30, None, "inverted"),
    ]
    after = abrupt.examples(30, 100)  # the last phase goes on for ever
    assert np.isin(after, pools["inverted"]).all()
    recurring = scenarios.abrupt(pools, phase_examples=30, cycle=True)
    names = [p.name for p in recurring.phases(120)]
    assert names == ["plain", "inverted", "plain", "inverted"]
    assert np.isin(recurring.examples(60, 30), rows).all()
    np.testing.assert_allclose(scenarios.invert(rows) + rows, 1.0)


def test_gradual_rotation_turns_images_by_the_scheduled_angle() -> None:
    image = np.zeros((SIDE, SIDE), np.float32)
    image[0, 1:5] = 1.0  # a bar along the top edge
    rows = image.reshape(1, -1)
    scenario = scenarios.gradual_rotation(rows, (SIDE, SIDE), start=10, span=20, max_angle=90)
    assert [(p.start, p.end) for p in scenario.phases(100)] == [(0, 10), (10, 30), (30, None)]
    np.testing.assert_array_equal(scenario.examples(0, 10), np.repeat(rows, 10, axis=0))
    turned = scenario.examples(30, 1).reshape(SIDE, SIDE)
    # 90 degrees counter-clockwise in image coordinates moves the top bar to a side column.
    np.testing.assert_allclose(turned, np.rot90(image), atol=1e-5)
    halfway = scenario.examples(20, 1).reshape(SIDE, SIDE)
    assert np.abs(halfway - image).sum() > 0 and np.abs(halfway - turned).sum() > 0


def test_phase_test_data_is_the_phases_own(images) -> None:
    rows, labels = images
    scenario = scenarios.class_incremental(
        rows, labels, "0-4,5-9", 50, test_images=rows, test_labels=labels
    )
    np.testing.assert_array_equal(scenario.test_data(0), rows[labels < 5])
    np.testing.assert_array_equal(scenario.test_data(1), rows[labels >= 5])
