"""Drift detection on the stream of test-then-train negative bounds.

Every minibatch is scored before the model learns from it, so the negative bound of a
minibatch is an honest loss on unseen data. When the data change, that loss jumps up
before the model adapts: `DriftMonitor` watches it with a Page-Hinkley test and river's ADWIN.

- ``page-hinkley``: the Page-Hinkley test in "up" mode: the cumulative sum of
  (value - running mean - delta) against its minimum; a detection when the difference
  exceeds ``threshold``. Only increases of the negative bound count (the model getting
  worse); the learning curve's steady decrease is what a healthy job looks like.
  `PageHinkley` is implemented here, following river's `PageHinkley` step for step (the
  same detections: tests/test_drift.py compares the two), because its statistic is
  exported as a metric (``aevb_drift_statistic``) and its baseline goes into each
  detection, and river keeps both in private attributes.
  River's fading factor is off (alpha = 1): on a learning curve the faded sums drift
  upwards by themselves (measured: the statistic grew past 10,000 over 10^6 stationary
  examples), which fires on any threshold. Its reference is the mean since its last reset,
  which on a learning curve stays well above the current bound (30 nats at 10^5 examples,
  18 at 10^6 on MNIST): it catches abrupt jumps within a minibatch or two, but misses
  sustained rises smaller than that gap.
- ``adwin``: river's `ADWIN`, which cuts its adaptive window when two sub-windows have
  different means. ADWIN is two-sided and also cuts on single outlying minibatches, so a
  cut is confirmed on the next ``ADWIN_CONFIRM_MINIBATCHES`` minibatches: it counts as
  drift only if their mean exceeds the window's mean before the cut by at least
  ``adwin_min_increase`` nats (a cut on the improving learning curve is not a drift). It
  catches sustained rises of 10-20 nats, but river restarts it after every cut, and on
  the steep early learning curve it is often in its warm-up when a short spike passes.
- ``both`` (default): the two side by side; whichever fires first is the detection, and
  then both start afresh (one change, one detection). Measured, it keeps the strengths of
  each and the false alarms of neither (docs/benchmarks.md, "Drift detection").

The monitor is fed one value per minibatch: the mean negative bound of its examples.
Minibatches that were not applied (non-finite loss) are not fed.

>>> monitor = DriftMonitor(DriftSettings("page-hinkley", min_minibatches=5))
>>> stream = [100.0, 101.0] * 10 + [150.0] * 10    # 50 nats worse from example 2,001 on
>>> found = [monitor.update(v, examples_seen=100 * (i + 1)) for i, v in enumerate(stream)]
>>> [(d.detector, d.examples_seen) for d in found if d]
[('page-hinkley', 2200)]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

DETECTORS = ("both", "page-hinkley", "adwin", "none")

# Defaults chosen by measurement on MNIST (docs/benchmarks.md, "Drift detection"; made with
# benchmarks/drift_thresholds.py): no false alarm over 10^6 stationary examples of the paper's
# 784-500-20 model, nor over 10^7 examples at a flat bound, and abrupt shifts (inverted,
# rotated, other digits) detected within 2,000 examples.
DEFAULT_DETECTOR = "both"
DEFAULT_PH_THRESHOLD = 50.0
DEFAULT_PH_DELTA = 2.0
DEFAULT_MIN_MINIBATCHES = 30
DEFAULT_ADWIN_DELTA = 0.002
DEFAULT_ADWIN_MIN_INCREASE = 5.0
ADWIN_CONFIRM_MINIBATCHES = 3


@dataclasses.dataclass(frozen=True)
class DriftSettings:
    """Which detector watches the negative bound, and its thresholds (picklable).

    ``threshold`` and ``delta`` are Page-Hinkley's lambda and delta, in nats (the values
    fed are per-example averages over a minibatch). ``min_minibatches`` is the warm-up of
    either detector after the start and after each detection. ``adwin_delta`` is ADWIN's
    confidence; ``adwin_min_increase`` the smallest rise of ADWIN's mean (nats) that counts.
    """

    detector: str = DEFAULT_DETECTOR
    threshold: float = DEFAULT_PH_THRESHOLD
    delta: float = DEFAULT_PH_DELTA
    min_minibatches: int = DEFAULT_MIN_MINIBATCHES
    adwin_delta: float = DEFAULT_ADWIN_DELTA
    adwin_min_increase: float = DEFAULT_ADWIN_MIN_INCREASE

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown drift detector {self.detector!r}; one of {DETECTORS}")
        for name in ("threshold", "adwin_delta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"drift {name} must be positive, got {getattr(self, name)}")
        for name in ("delta", "adwin_min_increase"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"drift {name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.adwin_delta < 1:
            raise ValueError(f"adwin_delta must be in (0, 1), got {self.adwin_delta}")
        if self.min_minibatches < 1:
            raise ValueError(f"min_minibatches must be at least 1, got {self.min_minibatches}")

    @property
    def enabled(self) -> bool:
        return self.detector != "none"


@dataclasses.dataclass(frozen=True)
class DriftDetection:
    """One detection: where in the stream, and the detector's evidence.

    ``statistic`` is Page-Hinkley's cumulative sum difference (nats) or, for ADWIN, the
    rise of the window's mean (nats); ``threshold`` is what it was compared with.
    ``value`` is the minibatch's mean negative bound, ``baseline`` the detector's mean
    before the change.
    """

    detector: str
    examples_seen: int
    statistic: float
    threshold: float
    value: float
    baseline: float
    key: str = ""
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DriftMonitor:
    """Drift detectors fed with per-minibatch mean negative bounds (one model key)."""

    def __init__(self, settings: DriftSettings = DriftSettings()) -> None:
        if not settings.enabled:
            raise ValueError("DriftMonitor needs a detector; settings say 'none'")
        self.settings = settings
        names = ("page-hinkley", "adwin") if settings.detector == "both" else (settings.detector,)
        self.detectors: tuple[str, ...] = names
        self._parts = self._new_parts()

    def _new_parts(self) -> list[_PageHinkley | _Adwin]:
        kinds = {"page-hinkley": _PageHinkley, "adwin": _Adwin}
        return [kinds[name](self.settings) for name in self.detectors]

    @property
    def thresholds(self) -> dict[str, float]:
        """What each detector's statistic is compared with (nats)."""
        return {part.name: part.threshold for part in self._parts}

    @property
    def statistics(self) -> dict[str, float]:
        """Each detector's current statistic: Page-Hinkley's cumulative sum difference
        (nats), ADWIN's window width (minibatches)."""
        return {part.name: part.statistic for part in self._parts}

    def update(
        self, negative_bound: float, examples_seen: int, key: str = "", step: int | None = None
    ) -> DriftDetection | None:
        """Feeds one minibatch's mean negative bound; returns a detection or None."""
        if not math.isfinite(negative_bound):
            return None
        found = None
        for part in self._parts:
            detection = part.update(negative_bound, examples_seen, key, step)
            found = found or detection
        if found is not None and len(self._parts) > 1:
            self._parts = self._new_parts()  # one change, one detection
        return found


class PageHinkley:
    """The Page-Hinkley test for increases of the mean, with public statistic and baseline.

    The same arithmetic as river 0.26's ``drift.PageHinkley(mode="up", alpha=1)``, in the
    same order (the same numbers bit for bit, so the same detections): after each value x_t,

        mean_t = mean of the values since the last reset, x_t included
        S_t = S_{t-1} + (x_t - mean_t - delta),    S_0 = 0
        statistic = S_t - min(S_1, ..., S_t)

    and a drift is detected when ``statistic > threshold`` once at least ``min_instances``
    values have been seen since the last reset. As in river, the reset comes lazily, at the
    start of the update after a detection, so the detection's state can still be read.

    >>> detector = PageHinkley(min_instances=3, delta=0.0, threshold=5.0)
    >>> for x in [1.0, 1.0, 1.0, 9.0]:
    ...     detector.update(x)
    >>> detector.drift_detected, detector.statistic, detector.baseline
    (True, 6.0, 1.0)
    """

    def __init__(
        self, min_instances: int = 30, delta: float = 0.005, threshold: float = 50.0
    ) -> None:
        self.min_instances = min_instances
        self.delta = delta
        self.threshold = threshold
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.drift_detected = False
        # The detector's state after the last update: S_t - min S, and the mean of the
        # values before x_t (x_t itself when it is the first since a reset), which is what
        # a detection's value is compared with.
        self.statistic = 0.0
        self.baseline = 0.0
        self._sum = 0.0
        self._min_sum = math.inf

    def update(self, x: float) -> None:
        if self.drift_detected:
            self._reset()
        self.baseline = self.mean if self.n else x
        self.n += 1
        # Written as river writes it, (1 / n) * (x - mean) rather than (x - mean) / n: the
        # two can round differently, and a statistic a last bit off could fall on the other
        # side of the threshold.
        self.mean += (1 / self.n) * (x - self.mean)
        self._sum = self._sum + (x - self.mean) - self.delta
        if self._sum < self._min_sum:
            self._min_sum = self._sum
        self.statistic = self._sum - self._min_sum
        if self.n >= self.min_instances:
            self.drift_detected = self.statistic > self.threshold


class _PageHinkley:
    name = "page-hinkley"

    def __init__(self, settings: DriftSettings) -> None:
        self.threshold = settings.threshold
        self.statistic = 0.0
        self._detector = PageHinkley(
            min_instances=settings.min_minibatches,
            delta=settings.delta,
            threshold=settings.threshold,
        )

    def update(
        self, value: float, examples_seen: int, key: str, step: int | None
    ) -> DriftDetection | None:
        detector = self._detector
        detector.update(value)
        self.statistic = float(detector.statistic)
        if not detector.drift_detected:
            return None
        # The detector starts afresh on its next value; the exported statistic already does.
        self.statistic = 0.0
        return DriftDetection(
            self.name,
            examples_seen,
            float(detector.statistic),
            self.threshold,
            value,
            float(detector.baseline),
            key,
            step,
        )


class _Adwin:
    name = "adwin"

    def __init__(self, settings: DriftSettings) -> None:
        from river import drift

        self.threshold = settings.adwin_min_increase
        self.statistic = 0.0
        self._detector = drift.ADWIN(
            delta=settings.adwin_delta,
            clock=1,
            grace_period=settings.min_minibatches,
            min_window_length=5,
        )
        # While a cut awaits confirmation: the window's mean before it, values since.
        self._cut_baseline: float | None = None
        self._since_cut: list[float] = []

    def update(
        self, value: float, examples_seen: int, key: str, step: int | None
    ) -> DriftDetection | None:
        detector = self._detector
        before = detector.estimation if detector.width else value
        detector.update(value)
        self.statistic = float(detector.width)
        if self._cut_baseline is None:
            if detector.drift_detected:
                self._cut_baseline, self._since_cut = float(before), []
            return None
        # The minibatches after a cut against the window's mean before it say whether the
        # bound got worse (a cut on one outlier, or on the learning curve, does not count).
        self._since_cut.append(value)
        if len(self._since_cut) < ADWIN_CONFIRM_MINIBATCHES:
            return None
        baseline, recent = self._cut_baseline, sum(self._since_cut) / len(self._since_cut)
        self._cut_baseline, self._since_cut = None, []
        rise = recent - baseline
        if rise < self.threshold:
            return None
        return DriftDetection(
            self.name, examples_seen, rise, self.threshold, recent, baseline, key, step
        )
