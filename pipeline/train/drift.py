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

Thresholds are in units of the stream's own noise (``units="noise"``, the default): `NoiseScale`
learns the standard deviation of the minibatch values from their differences (robust to the
learning curve's trend and to outliers), and Page-Hinkley's ``threshold`` and ``delta`` and
ADWIN's ``adwin_min_increase`` are multiples of it. The same defaults then hold on any data:
MNIST's Bernoulli bound has a minibatch noise of 3.2-3.7 nats, Frey Face's Gaussian one of
~20, and thresholds in nats tuned on the first fired 243 times in 10^6 stationary examples of
the second (docs/benchmarks.md, "Detectors calibrated to the stream"). ``units="nats"`` keeps
fixed thresholds. The noise estimate restarts with the detectors after each detection, from
the new regime's first minibatches. The whole monitor's state is a small JSON-able dict
(`DriftMonitor.state`), saved with each checkpoint so a restarted job needs no new warm-up.

>>> monitor = DriftMonitor(DriftSettings("page-hinkley", min_minibatches=5))
>>> stream = [100.0, 101.0] * 10 + [150.0] * 10    # 50 noise units worse from example 2,001 on
>>> found = [monitor.update(v, examples_seen=100 * (i + 1)) for i, v in enumerate(stream)]
>>> [(d.detector, d.examples_seen, round(d.noise_scale, 2)) for d in found if d]
[('page-hinkley', 2100, 1.09)]
"""

from __future__ import annotations

import base64
import dataclasses
import math
import pickle
import statistics
from typing import Any

DETECTORS = ("both", "page-hinkley", "adwin", "none")
UNITS = ("noise", "nats")

# Defaults chosen by measurement (docs/benchmarks.md, "Drift detection" and "Detectors
# calibrated to the stream"; made with benchmarks/drift_thresholds.py): first in nats on MNIST
# (50, 2 and 5: no false alarm over 10^6 stationary examples of the paper's 784-500-20 model,
# nor over 10^7 examples at a flat bound, and abrupt shifts detected within 2,000 examples),
# then expressed in units of that stream's minibatch noise (3.2-3.7 nats) and checked on
# every data set we ship.
DEFAULT_DETECTOR = "both"
DEFAULT_UNITS = "noise"
DEFAULT_PH_THRESHOLD = 15.0
DEFAULT_PH_DELTA = 0.6
DEFAULT_MIN_MINIBATCHES = 30
DEFAULT_ADWIN_DELTA = 0.002
DEFAULT_ADWIN_MIN_INCREASE = 1.75
ADWIN_CONFIRM_MINIBATCHES = 3
# The minibatch noise (nats) of the MNIST stream ADWIN's delta was chosen on, and by how
# much (a log ratio: a quarter) the noise moves before ADWIN restarts at the new scale.
ADWIN_NOISE = 3.3
ADWIN_RESCALE = math.log(1.25)


@dataclasses.dataclass(frozen=True)
class DriftSettings:
    """Which detector watches the negative bound, and its thresholds (picklable).

    ``threshold`` and ``delta`` are Page-Hinkley's lambda and delta, ``adwin_min_increase``
    the smallest rise of ADWIN's mean that counts, all in ``units``: "noise" (multiples of
    the minibatch noise `NoiseScale` learns from the stream) or "nats" (the values fed are
    per-example averages over a minibatch). ``min_minibatches`` is the warm-up of either
    detector (and of the noise estimate) after the start and after each detection.
    ``adwin_delta`` is ADWIN's confidence.
    """

    detector: str = DEFAULT_DETECTOR
    threshold: float = DEFAULT_PH_THRESHOLD
    delta: float = DEFAULT_PH_DELTA
    min_minibatches: int = DEFAULT_MIN_MINIBATCHES
    adwin_delta: float = DEFAULT_ADWIN_DELTA
    adwin_min_increase: float = DEFAULT_ADWIN_MIN_INCREASE
    units: str = DEFAULT_UNITS

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown drift detector {self.detector!r}; one of {DETECTORS}")
        if self.units not in UNITS:
            raise ValueError(f"unknown drift units {self.units!r}; one of {UNITS}")
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

    ``statistic`` is Page-Hinkley's cumulative sum difference or, for ADWIN, the rise of the
    window's mean; ``threshold`` is what it was compared with; both in the settings' units,
    which are ``noise_scale`` nats each (1 with units "nats"). ``value`` is the minibatch's
    mean negative bound, ``baseline`` the detector's mean before the change, in nats.
    """

    detector: str
    examples_seen: int
    statistic: float
    threshold: float
    value: float
    baseline: float
    key: str = ""
    step: int | None = None
    noise_scale: float = 1.0

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
        self.noise = NoiseScale(warmup=max(1, settings.min_minibatches - 1))
        self._parts = self._new_parts()

    def _new_parts(self) -> list[_PageHinkley | _Adwin]:
        kinds = {"page-hinkley": _PageHinkley, "adwin": _Adwin}
        return [kinds[name](self.settings) for name in self.detectors]

    @property
    def thresholds(self) -> dict[str, float]:
        """What each detector's statistic is compared with (in the settings' units)."""
        return {part.name: part.threshold for part in self._parts}

    @property
    def statistics(self) -> dict[str, float]:
        """Each detector's current statistic, in the settings' units: Page-Hinkley's
        cumulative sum difference, ADWIN's window width (minibatches)."""
        return {part.name: part.statistic for part in self._parts}

    @property
    def noise_scale(self) -> float:
        """Nats per unit of the thresholds: the learned minibatch noise, or 1 for "nats"."""
        if self.settings.units == "nats":
            return 1.0
        return self.noise.value if self.noise.value is not None else math.nan

    def update(
        self, negative_bound: float, examples_seen: int, key: str = "", step: int | None = None
    ) -> DriftDetection | None:
        """Feeds one minibatch's mean negative bound; returns a detection or None."""
        if not math.isfinite(negative_bound):
            return None
        self.noise.update(negative_bound)
        scale = self.noise_scale
        if not math.isfinite(scale):  # no noise estimate yet: nothing to compare with
            return None
        found = None
        for part in self._parts:
            detection = part.update(negative_bound, scale, examples_seen, key, step)
            found = found or detection
        if found is not None:
            # The new regime's own noise, learned afresh (the old estimate meanwhile).
            self.noise.restart()
            if len(self._parts) > 1:
                self._parts = self._new_parts()  # one change, one detection
        return found

    def state(self) -> dict[str, Any]:
        """Everything the detectors have learned, JSON-able: saved with a checkpoint so a
        restarted job goes on detecting without a new warm-up (`load_state`)."""
        return {
            "settings": dataclasses.asdict(self.settings),
            "noise": self.noise.state(),
            "detectors": {part.name: part.state() for part in self._parts},
        }

    def load_state(self, state: dict[str, Any]) -> bool:
        """Takes up a saved `state`; False (and nothing changed) when it was saved with other
        settings or detectors, whose statistics would not mean the same."""
        if state.get("settings") != dataclasses.asdict(self.settings):
            return False
        saved = state["detectors"]
        if set(saved) != set(self.detectors):
            return False
        parts = self._new_parts()
        for part in parts:
            if not part.load_state(saved[part.name]):
                return False
        self.noise.load_state(state["noise"])
        self._parts = parts
        return True


class NoiseScale:
    """The standard deviation of a stream's values about its trend, learned as it goes.

    From the differences of consecutive values, which the slow learning curve hardly moves:
    for independent noise of deviation sigma they have deviation sigma * sqrt(2). The first
    `warmup` differences give a robust start (their median absolute deviation); after that an
    exponentially weighted mean of each difference's distance from the running trend, with
    outliers clipped at `CLIP` times the estimate so that one jump (a drift) barely moves it.
    `restart` begins a new warm-up and keeps the old estimate until it is done.

    >>> import numpy as np
    >>> noise, estimates = NoiseScale(warmup=20), []
    >>> for x in 100 + np.random.default_rng(0).normal(0, 3.0, 2000):
    ...     noise.update(float(x))
    ...     estimates.append(noise.value)
    >>> bool(abs(np.mean(estimates[1000:]) - 3.0) < 0.15)    # each one within ~10% of it
    True
    """

    CLIP = 5.0
    # Of the running means, in minibatches: short enough to follow noise that grows as the
    # model learns to tell examples apart (a toy stream's grew 7-fold in 60 minibatches),
    # long enough for a steady estimate (~6% relative error at 144 effective samples).
    HALF_LIFE = 50.0
    # A Gaussian's median absolute deviation and mean absolute deviation over its sigma.
    _MAD_PER_SIGMA = 0.6744897501960817
    _MEAN_ABS_PER_SIGMA = math.sqrt(2 / math.pi)

    def __init__(self, warmup: int = DEFAULT_MIN_MINIBATCHES - 1) -> None:
        self.warmup = warmup
        self.value: float | None = None
        self._previous: float | None = None
        self._warming: list[float] | None = []  # None once warmed up
        self._trend = 0.0  # running mean of the differences
        self._mean_abs = 0.0  # running mean of their clipped distances from it
        self._rate = 1 - 0.5 ** (1 / self.HALF_LIFE)

    def update(self, x: float) -> None:
        previous, self._previous = self._previous, x
        if previous is None:
            return
        difference = x - previous
        if self._warming is not None:
            self._warming.append(difference)
            if len(self._warming) >= self.warmup:
                self._start(self._warming)
            return
        deviation = difference - self._trend
        bound = self.CLIP * self.value * math.sqrt(2)
        deviation = max(-bound, min(bound, deviation))
        self._trend += self._rate * deviation
        self._mean_abs += self._rate * (abs(deviation) - self._mean_abs)
        self.value = self._floor(self._mean_abs / self._MEAN_ABS_PER_SIGMA / math.sqrt(2))

    def _start(self, differences: list[float]) -> None:
        center = statistics.median(differences)
        spread = statistics.median(abs(d - center) for d in differences)
        self.value = self._floor(spread / self._MAD_PER_SIGMA / math.sqrt(2))
        self._trend = center
        self._mean_abs = self.value * math.sqrt(2) * self._MEAN_ABS_PER_SIGMA
        self._warming = None

    def _floor(self, sigma: float) -> float:
        # A stream without noise still has a scale: one millionth of its values.
        return max(sigma, 1e-6 * abs(self._previous or 0.0), 1e-12)

    def restart(self) -> None:
        self._warming = []
        self._previous = None

    def state(self) -> dict[str, Any]:
        fields = ("value", "_previous", "_warming", "_trend", "_mean_abs")
        return {name: getattr(self, name) for name in fields}

    def load_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


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

    def state(self) -> dict[str, Any]:
        """What the detector has learned, as JSON-able numbers (`load_state` takes it)."""
        fields = ("n", "mean", "drift_detected", "statistic", "baseline", "_sum")
        state = {name: getattr(self, name) for name in fields}
        return {**state, "_min_sum": None if math.isinf(self._min_sum) else self._min_sum}

    def load_state(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        if self._min_sum is None:
            self._min_sum = math.inf


class _PageHinkley:
    name = "page-hinkley"

    def __init__(self, settings: DriftSettings) -> None:
        self.threshold = settings.threshold
        self.delta = settings.delta
        self.statistic = 0.0
        self._detector = PageHinkley(
            min_instances=settings.min_minibatches,
            delta=settings.delta,
            threshold=settings.threshold,
        )

    def update(
        self, value: float, scale: float, examples_seen: int, key: str, step: int | None
    ) -> DriftDetection | None:
        detector = self._detector
        # In nats: its sums are of the values themselves, its slack and threshold the
        # settings' multiples of the noise as now estimated.
        detector.delta, detector.threshold = self.delta * scale, self.threshold * scale
        detector.update(value)
        self.statistic = float(detector.statistic) / scale
        if not detector.drift_detected:
            return None
        # The detector starts afresh on its next value; the exported statistic already does.
        self.statistic = 0.0
        return DriftDetection(
            self.name,
            examples_seen,
            float(detector.statistic) / scale,
            self.threshold,
            value,
            float(detector.baseline),
            key,
            step,
            scale,
        )

    def state(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "detector": self._detector.state()}

    def load_state(self, state: dict[str, Any]) -> bool:
        self.statistic = state["statistic"]
        self._detector.load_state(state["detector"])
        return True


class _Adwin:
    name = "adwin"

    def __init__(self, settings: DriftSettings) -> None:
        self.threshold = settings.adwin_min_increase
        self.statistic = 0.0
        self.settings = settings
        self._detector = self._new_detector()
        # ADWIN's cut test is not scale-free (a term of its bound assumes values in [0, 1]):
        # it is fed values rescaled to the noise its delta was chosen on (`ADWIN_NOISE`) by
        # a scale fixed while its window lasts, so that the window's mean is not moved by
        # the estimate's changes; when the noise has moved by more than a quarter from it
        # (the early learning curve's noise shrinks by half), ADWIN starts again.
        self._scale: float | None = None
        # While a cut awaits confirmation: the window's mean before it, values since.
        self._cut_baseline: float | None = None
        self._since_cut: list[float] = []

    def update(
        self, value: float, scale: float, examples_seen: int, key: str, step: int | None
    ) -> DriftDetection | None:
        if self.settings.units == "nats":
            self._scale = 1.0
        elif self._scale is None:
            self._scale = scale / ADWIN_NOISE
        elif self._cut_baseline is None and abs(math.log(scale / ADWIN_NOISE / self._scale)) > (
            ADWIN_RESCALE
        ):
            self._detector, self._scale = self._new_detector(), scale / ADWIN_NOISE
        detector = self._detector
        before = detector.estimation * self._scale if detector.width else value
        detector.update(value / self._scale)
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
        rise = (recent - baseline) / scale
        if rise < self.threshold:
            return None
        return DriftDetection(
            self.name, examples_seen, rise, self.threshold, recent, baseline, key, step, scale
        )

    def _new_detector(self) -> Any:
        from river import drift

        return drift.ADWIN(
            delta=self.settings.adwin_delta,
            clock=1,
            grace_period=self.settings.min_minibatches,
            min_window_length=5,
        )

    def state(self) -> dict[str, Any]:
        # River's ADWIN keeps its window in buckets of its own classes: pickled, with the
        # river version that wrote it (another version's pickle is not taken up).
        from river import __version__

        return {
            "river": __version__,
            "detector": base64.b64encode(pickle.dumps(self._detector)).decode("ascii"),
            "scale": self._scale,
            "cut_baseline": self._cut_baseline,
            "since_cut": self._since_cut,
        }

    def load_state(self, state: dict[str, Any]) -> bool:
        from river import __version__

        if state.get("river") != __version__:
            return False
        # Only ever our own checkpoint's bytes, written by `state` above.
        self._detector = pickle.loads(base64.b64decode(state["detector"]))
        self._scale = state["scale"]
        self._cut_baseline, self._since_cut = state["cut_baseline"], list(state["since_cut"])
        return True
