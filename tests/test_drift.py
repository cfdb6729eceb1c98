"""Tests for pipeline.train.drift and the drift hooks of pipeline.train.session."""

import io
import itertools
import json
import pathlib

import numpy as np
import pytest

import vae
from pipeline.train.drift import (
    ADWIN_CONFIRM_MINIBATCHES,
    DriftDetection,
    DriftMonitor,
    DriftSettings,
    NoiseScale,
    PageHinkley,
)
from pipeline.train.observers import SessionObserver
from pipeline.train.progress import ProgressLog, read_progress
from pipeline.train.session import Cadence, TrainingSession
from vae.snapshot_format import read_metadata, version_directories

MINIBATCH = 100
NOISE = 3.3  # nats: sd of a 784-500-20 MNIST model's minibatch mean negative bound


def _learning_curve(minibatches: int, seed: int) -> np.ndarray:
    """Mean negative bounds of a healthy run: a falling curve plus minibatch noise."""
    t = np.arange(minibatches)
    rng = np.random.default_rng(seed)
    return 120 + 400 * np.exp(-t / 30) + 80 * np.exp(-t / 2000) + rng.normal(0, NOISE, len(t))


def _feed(monitor: DriftMonitor, values) -> list[DriftDetection]:
    found = []
    for i, value in enumerate(values):
        detection = monitor.update(float(value), examples_seen=MINIBATCH * (i + 1))
        if detection is not None:
            found.append(detection)
    return found


@pytest.mark.parametrize("detector", ["both", "page-hinkley", "adwin"])
def test_a_learning_curve_raises_no_alarm(detector: str) -> None:
    # 5,000 minibatches: half a million examples of a model that only gets better.
    assert _feed(DriftMonitor(DriftSettings(detector)), _learning_curve(5000, seed=1)) == []


@pytest.mark.parametrize("detector", ["both", "page-hinkley", "adwin"])
def test_an_abrupt_rise_is_detected_within_2000_examples(detector: str) -> None:
    values = _learning_curve(3000, seed=2)
    shift_at = 2000  # minibatches
    values[shift_at:] += 40.0  # as digits 0-4 -> 5-9 measured (README, "Drift detection")
    found = _feed(DriftMonitor(DriftSettings(detector)), values)
    assert found, "no detection"
    first = found[0]
    shift_examples = shift_at * MINIBATCH
    assert shift_examples < first.examples_seen <= shift_examples + 2000
    assert first.detector == detector or detector == "both"
    assert first.statistic > first.threshold
    assert first.value > first.baseline


def test_both_detectors_report_one_change_once() -> None:
    monitor = DriftMonitor(DriftSettings("both"))
    assert monitor.detectors == ("page-hinkley", "adwin")
    assert monitor.thresholds == {"page-hinkley": 15.0, "adwin": 1.75}  # noise units
    values = _learning_curve(3000, seed=5)
    values[2000:] += 40.0
    found = _feed(monitor, values)
    assert len(found) == 1, found  # the first to fire restarts both
    assert set(monitor.statistics) == {"page-hinkley", "adwin"}


def test_a_short_spike_early_in_training_is_caught() -> None:
    # The bound of a fast-adapting model: a few terrible minibatches, then nearly back.
    # Page-Hinkley in `both` catches it even when ADWIN is restarting (its warm-up).
    values = _learning_curve(400, seed=6)
    values[200:] += 40 + 560 * np.exp(-np.arange(200) / 3)
    found = _feed(DriftMonitor(DriftSettings("both")), values)
    assert found and 200 * MINIBATCH < found[0].examples_seen <= 202 * MINIBATCH


def test_page_hinkley_statistic_rises_with_the_bound_and_resets_after_detection() -> None:
    settings = DriftSettings("page-hinkley", threshold=50, delta=2, min_minibatches=5, units="nats")
    monitor = DriftMonitor(settings)
    _feed(monitor, [100.0] * 50)
    assert monitor.statistics["page-hinkley"] == pytest.approx(0.0, abs=1e-9)
    monitor.update(130.0, examples_seen=5100)
    rising = monitor.statistics["page-hinkley"]
    assert 10 < rising < 50
    detection = monitor.update(130.0, examples_seen=5200)
    assert detection is not None and detection.statistic > 50
    assert detection.examples_seen == 5200
    assert monitor.statistics["page-hinkley"] == 0.0


def _shifting_stream(length: int, seed: int, noise: float, shift: float) -> np.ndarray:
    """Noise around a mean that jumps up or down every few hundred values."""
    rng = np.random.default_rng(seed)
    jumps = np.zeros(length)
    jumps[rng.integers(1, length, length // 300)] = rng.choice([-1.0, 1.0, 2.0], length // 300)
    return 100 + shift * np.cumsum(jumps) + rng.normal(0, noise, length)


# (min_instances, delta, threshold, noise, shift): the defaults on minibatch-like noise, and
# settings that detect often, so the resets after detections and the warm-ups are exercised.
PH_CASES = [
    (30, 2.0, 50.0, NOISE, 40.0),
    (5, 0.5, 10.0, 1.0, 5.0),
    (1, 0.0, 5.0, 1.0, 2.0),
    (50, 0.005, 20.0, 2.0, 3.0),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("min_instances", "delta", "threshold", "noise", "shift"), PH_CASES)
def test_page_hinkley_detects_where_rivers_does(
    seed: int, min_instances: int, delta: float, threshold: float, noise: float, shift: float
) -> None:
    from river import drift

    # Ours replaces river's so that its statistic can be exported (module docstring); the
    # detections must stay those of the river settings it replaced.
    theirs = drift.PageHinkley(
        min_instances=min_instances, delta=delta, threshold=threshold, alpha=1.0, mode="up"
    )
    ours = PageHinkley(min_instances=min_instances, delta=delta, threshold=threshold)
    stream = _shifting_stream(20_000, seed, noise, shift)
    stream[:3000] += 500 * np.exp(-np.arange(3000) / 300)  # and a learning curve's descent
    found_theirs, found_ours = [], []
    for i, value in enumerate(stream.tolist()):
        theirs.update(value)
        ours.update(value)
        if theirs.drift_detected:
            found_theirs.append(i)
        if ours.drift_detected:
            found_ours.append(i)
    assert len(found_theirs) >= 10  # enough detections, and resets, to compare
    assert found_ours == found_theirs


@pytest.mark.parametrize(("min_instances", "delta", "threshold", "noise", "shift"), PH_CASES)
def test_page_hinkley_statistic_is_the_cumulative_sum_against_its_minimum(
    min_instances: int, delta: float, threshold: float, noise: float, shift: float
) -> None:
    detector = PageHinkley(min_instances=min_instances, delta=delta, threshold=threshold)
    stream = _shifting_stream(5000, 7, noise, shift)
    statistic, baseline, detected = [], [], []
    for value in stream.tolist():
        detector.update(value)
        statistic.append(detector.statistic)
        baseline.append(detector.baseline)
        detected.append(detector.drift_detected)
    assert sum(detected) >= 3
    # The detector starts afresh on the value after each detection: recompute each segment
    # between resets directly.
    resets = (np.flatnonzero(detected) + 1).tolist()
    for start, end in itertools.pairwise([0, *resets, len(stream)]):
        x = stream[start:end]
        if len(x) == 0:
            continue
        count = np.arange(1, len(x) + 1)
        mean = np.cumsum(x) / count
        sums = np.cumsum(x - mean - delta)
        expected = sums - np.minimum.accumulate(sums)
        np.testing.assert_allclose(statistic[start:end], expected, rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(
            baseline[start:end], np.concatenate([x[:1], mean[:-1]]), rtol=1e-12
        )
        np.testing.assert_array_equal(
            detected[start:end], (count >= min_instances) & (expected > threshold)
        )


def test_adwin_ignores_an_improvement_and_a_single_outlier() -> None:
    monitor = DriftMonitor(DriftSettings("adwin"))
    rng = np.random.default_rng(3)
    better = np.concatenate([150 + rng.normal(0, NOISE, 500), 120 + rng.normal(0, NOISE, 500)])
    assert _feed(monitor, better) == []
    # One wild minibatch makes ADWIN cut its window, but the next ones are normal again.
    spike = 120 + rng.normal(0, NOISE, 200)
    spike[100] = 700.0
    assert _feed(monitor, spike) == []


def test_adwin_waits_for_confirmation_and_reports_the_rise() -> None:
    monitor = DriftMonitor(DriftSettings("adwin", adwin_min_increase=5, units="nats"))
    rng = np.random.default_rng(4)
    _feed(monitor, 120 + rng.normal(0, NOISE, 300))
    found = []
    for i in range(20):
        detection = monitor.update(200.0, examples_seen=30_000 + MINIBATCH * (i + 1))
        if detection:
            found.append((i, detection))
    index, detection = found[0]
    assert index >= ADWIN_CONFIRM_MINIBATCHES  # the cut, then the confirming minibatches
    assert detection.statistic == pytest.approx(detection.value - detection.baseline)
    assert detection.statistic == pytest.approx(80, abs=3)


@pytest.mark.parametrize("noise", [1.0, 3.3, 20.0])
def test_the_noise_scale_is_learned_from_a_learning_curve(noise: float) -> None:
    t = np.arange(5000)
    curve = 120 + 400 * np.exp(-t / 30) + 80 * np.exp(-t / 2000)
    values = curve + np.random.default_rng(7).normal(0, noise, len(t))
    scale = NoiseScale(warmup=29)
    estimates = []
    for value in values:
        scale.update(float(value))
        estimates.append(scale.value)
    assert estimates[28] is None and estimates[29] is not None  # after its warm-up
    assert np.mean(estimates[1000:]) == pytest.approx(noise, rel=0.05)
    assert noise * 0.7 < min(estimates[1000:]) < max(estimates[1000:]) < noise * 1.3
    # One jump of 100 noise units moves the estimate by little (clipped at 5).
    scale.update(float(values[-1] + 100 * noise))
    assert estimates[-1] < scale.value < 1.1 * estimates[-1]


@pytest.mark.parametrize("detector", ["both", "page-hinkley", "adwin"])
def test_in_noise_units_a_stream_detects_the_same_at_any_scale(detector: str) -> None:
    # Frey Face's Gaussian bound is ~6 times noisier than MNIST's and of another sign.
    values = _learning_curve(3000, seed=8)
    values[2000:] += 40.0
    found = {}
    for scale, offset in [(1.0, 0.0), (6.0, -1000.0), (0.1, 5.0)]:
        monitor = DriftMonitor(DriftSettings(detector))
        found[scale] = [d.examples_seen for d in _feed(monitor, scale * values + offset)]
    assert found[1.0] and found[1.0] == found[6.0] == found[0.1]
    # MNIST's Page-Hinkley thresholds in nats fire again and again on a stationary stream as
    # noisy as Frey Face's; in noise units, no detector ever does.
    noisy = -900 + np.random.default_rng(9).normal(0, 20.0, 5000)
    if detector != "adwin":  # ADWIN's own cut test scales with the noise already
        in_nats = DriftSettings(detector, threshold=50, delta=2, units="nats")
        assert len(_feed(DriftMonitor(in_nats), noisy)) > 10
    assert _feed(DriftMonitor(DriftSettings(detector)), noisy) == []


@pytest.mark.parametrize("detector", ["both", "page-hinkley", "adwin"])
@pytest.mark.parametrize("pause_at", [20, 1000, 2003])
def test_a_monitor_taken_up_from_its_state_detects_as_one_that_never_stopped(
    detector: str, pause_at: int
) -> None:
    values = _learning_curve(3000, seed=10)
    values[2000:] += 40.0
    values[2600:] += 60.0
    uninterrupted = DriftMonitor(DriftSettings(detector))
    expected = [(d.examples_seen, d.statistic) for d in _feed(uninterrupted, values)]
    assert len(expected) >= 2

    first = DriftMonitor(DriftSettings(detector))
    found = [(d.examples_seen, d.statistic) for d in _feed(first, values[:pause_at])]
    state = json.loads(json.dumps(first.state()))  # as a checkpoint keeps it
    resumed = DriftMonitor(DriftSettings(detector))
    assert resumed.load_state(state)
    for i, value in enumerate(values[pause_at:], start=pause_at):
        detection = resumed.update(float(value), examples_seen=MINIBATCH * (i + 1))
        if detection:
            found.append((detection.examples_seen, detection.statistic))
    assert found == expected
    assert resumed.statistics == uninterrupted.statistics


def test_a_state_saved_with_other_settings_is_not_taken_up() -> None:
    monitor = DriftMonitor(DriftSettings("both"))
    _feed(monitor, _learning_curve(100, seed=11))
    state = monitor.state()
    for other in [DriftSettings("both", threshold=20.0), DriftSettings("page-hinkley")]:
        fresh = DriftMonitor(other)
        assert not fresh.load_state(state)
        assert fresh.noise.value is None  # untouched
    wrong_river = json.loads(json.dumps(state))
    wrong_river["detectors"]["adwin"]["river"] = "0.0.1"
    assert not DriftMonitor(DriftSettings("both")).load_state(wrong_river)


def test_non_finite_values_are_ignored() -> None:
    monitor = DriftMonitor(DriftSettings("page-hinkley", min_minibatches=1))
    assert monitor.update(float("nan"), 100) is None
    assert monitor.update(float("inf"), 200) is None
    assert monitor.statistics["page-hinkley"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"detector": "cusum"}, "unknown drift detector"),
        ({"threshold": 0}, "threshold must be positive"),
        ({"delta": -1}, "delta must not be negative"),
        ({"adwin_delta": 1.5}, "adwin_delta must be in"),
        ({"min_minibatches": 0}, "min_minibatches"),
        ({"units": "sigma"}, "unknown drift units"),
    ],
)
def test_settings_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DriftSettings(**kwargs)


def test_monitor_needs_a_detector() -> None:
    assert not DriftSettings("none").enabled
    with pytest.raises(ValueError):
        DriftMonitor(DriftSettings("none"))


# --- session hooks -------------------------------------------------------------------------


class Recorder(SessionObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_open(self, key, last_snapshot_unix, drift_thresholds=None, resumed=False):
        self.events.append(("open", key, drift_thresholds))

    def on_record(self, record):
        self.events.append(("record", record.examples_seen))

    def on_drift(self, detection):
        self.events.append(("drift", detection.examples_seen))

    def on_snapshot(self, key, path, reason, created_unix):
        self.events.append(("snapshot", reason))


class Broken(SessionObserver):
    def on_record(self, record):
        raise RuntimeError("observer bug")


@pytest.fixture
def stand_in_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SavedModel export takes seconds; these tests are about when snapshots happen."""

    def save(model, directory, graph_dir=None) -> None:
        (pathlib.Path(directory) / "saved_model.pb").write_bytes(b"stand-in")

    monkeypatch.setattr(vae, "save", save)


def test_session_logs_snapshots_and_tells_observers_on_drift(
    tmp_path: pathlib.Path, stand_in_export: None
) -> None:
    d = 64
    config = vae.VAEConfig(input_dim=d, latent_dim=2, hidden_dim=16, batch_size=10, seed=3)
    recorder = Recorder()
    progress = ProgressLog(tmp_path / "progress.jsonl", stream=io.StringIO())
    session = TrainingSession(
        tmp_path,
        "sensor-1",
        config,
        Cadence(log_every_steps=1000),
        progress,
        observers=[Broken(), recorder],
        drift=DriftSettings("page-hinkley", min_minibatches=10),
    )
    rng = np.random.default_rng(0)
    prototypes = (rng.random((4, d)) > 0.5).astype(np.float32)
    for step in range(300):
        batch = prototypes[rng.integers(0, 4, 10)]
        session.train(batch if step < 200 else 1 - batch)  # inverted after 2,000 examples

    assert recorder.events[0] == ("open", "sensor-1", {"page-hinkley": 15.0})
    drifts = [e for e in recorder.events if e[0] == "drift"]
    assert len(drifts) >= 1
    first = drifts[0][1]
    assert 2000 < first <= 4000
    assert session.drift_detections[0].examples_seen == first
    # The detection was followed by a snapshot taken for it.
    after = recorder.events[recorder.events.index(("drift", first)) + 1]
    assert after == ("snapshot", "drift")
    newest = version_directories(tmp_path / "snapshots" / "sensor-1")[0]
    assert read_metadata(newest)["reason"] == "drift"
    # progress.jsonl marks it for `aevb report`.
    lines = [e for e in read_progress(tmp_path / "progress.jsonl") if "drift" in e]
    assert lines[0]["examples"] == first
    assert lines[0]["drift"]["detector"] == "page-hinkley"
    assert lines[0]["drift"]["statistic"] > 15
    assert lines[0]["drift"]["noise_scale"] > 0
    json.dumps(lines[0])  # plain JSON
    # The broken observer did not stop training: every record reached the recorder.
    assert len([e for e in recorder.events if e[0] == "record"]) == 300


def test_flags_make_the_settings(tmp_path: pathlib.Path, capsys) -> None:
    from pipeline.cli import main as cli
    from pipeline.jobs.options import AEVBOptions, drift_settings, exports_metrics

    options = AEVBOptions(["--drift-detector", "adwin", "--adwin-min-increase", "8"])
    assert drift_settings(options) == DriftSettings("adwin", adwin_min_increase=8.0)
    assert drift_settings(AEVBOptions([])).detector == "both"
    assert drift_settings(AEVBOptions(["--drift-detector", "none"])) is None
    assert not exports_metrics(AEVBOptions([]))
    assert exports_metrics(AEVBOptions(["--metrics-port", "0"]))
    assert exports_metrics(AEVBOptions(["--pushgateway", "http://gw:9091"]))
    # A value the flag parser lets through but the detector cannot use: one usage line.
    status = cli.main(["train", "--adwin-delta", "1.5", "--output", str(tmp_path / "run")])
    assert status == 2
    assert "adwin_delta must be in (0, 1)" in capsys.readouterr().err
