"""Prometheus metrics of the training job: their families and the observer that updates them.

Every series carries a ``model`` label (the model key); nothing is labelled per example.
Names follow Prometheus conventions (``aevb_`` prefix, base units, ``_total`` counters):

=====================================================  =========  ==============================
metric                                                 type       what
=====================================================  =========  ==============================
aevb_elbo_nats{model}                                  gauge      test-then-train bound per
                                                                  example, latest minibatch
aevb_reconstruction_log_likelihood_nats{model}         gauge      its reconstruction term
aevb_kl_nats{model}                                    gauge      its KL term
aevb_negative_elbo_nats{model}                         histogram  per-example negative bound
aevb_examples_total{model}                             counter    examples scored and trained
aevb_train_steps_total{model}                          counter    minibatch updates applied
aevb_skipped_steps_total{model,reason}                 counter    minibatches not applied
aevb_records_rejected_total{model,reason}              counter    dead letters
aevb_step_seconds{model}                               histogram  one training step
aevb_snapshots_total{model}                            counter    snapshot versions written
aevb_last_snapshot_timestamp_seconds{model}            gauge      newest snapshot's time
aevb_drift_detections_total{model,detector}            counter    drift detections
aevb_drift_statistic{model,detector}                   gauge      detector's current statistic
aevb_drift_threshold{model,detector}                   gauge      what it is compared with
aevb_regime_switches_total{model,kind}                 counter    returns to a stored regime,
                                                                  rollbacks after instability
                                                                  (--regime-memory)
aevb_active_regime{model}                              gauge      id of the regime the model
                                                                  is of (0 first, new ids
                                                                  after detections)
=====================================================  =========  ==============================

Job-level aggregates, which stay a few dozen series however many keys the job trains (with
``--per-key-metrics none`` the only ones, besides the dead letters'):

=====================================================  =========  ==============================
aevb_fleet_keys_in_memory                              gauge      models held by the workers
aevb_fleet_keys_trained                                gauge      keys that trained in this job
aevb_fleet_sessions_opened_total{restored}             counter    models opened: new keys
                                                                  (false) or from a checkpoint
aevb_fleet_evictions_total                             counter    models closed to stay within
                                                                  --max-models-in-memory
aevb_fleet_examples_total                              counter    examples, all keys
aevb_fleet_drift_detections_total                      counter    drift detections, all keys
aevb_fleet_keys_drifting                               gauge      keys with a detection in the
                                                                  last 10 minutes
aevb_fleet_keys_by_negative_elbo_nats{le}              gauge      keys whose latest minibatch's
                                                                  negative bound is <= le
=====================================================  =========  ==============================

The last is a gauge histogram over keys: ``histogram_quantile(0.9,
aevb_fleet_keys_by_negative_elbo_nats)`` is the negative bound 90% of the keys are at or
below (deploy/prometheus/rules.yml records the 0.1, 0.5 and 0.9 quantiles). With several
worker processes the fleet gauges are sums over the live ones; a key trained in two
processes (its bundles moved) counts in both.

The counters are also Beam metrics in namespace ``aevb`` (`pipeline.train.counters`), named
without the prefix, a label value appended: ``examples_total``,
``skipped_steps_total_non_finite``, ``records_rejected_total_wrong_width`` ... so a Flink or
Dataflow UI shows them.

Several worker processes: the local runners' workers (``--direct_running_mode
multi_processing``) are subprocesses of the driver. `run_training` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (`use_multiprocess_dir`) before any worker
starts; every process writes its values to files there and the driver serves their
aggregate on one port: counters and histograms summed, gauges the most recently set value.

The metric families are `pipeline.outputs.prometheus_families`' (prometheus-client's
Counter, Gauge and Histogram rebuilt from its public parts, see there why).

>>> observer = PrometheusObserver()
>>> observer.on_open("doc-model", last_snapshot_unix=1.0, drift_thresholds={"adwin": 5.0})
>>> exposed = generate_latest().decode()
>>> 'aevb_examples_total{model="doc-model"} 0.0' in exposed
True
>>> 'aevb_last_snapshot_timestamp_seconds{model="doc-model"} 1.0' in exposed
True
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.utils import floatToGoString

from pipeline.outputs.prometheus_families import (
    MULTIPROC_ENV,
    CounterFamily,
    GaugeFamily,
    HistogramFamily,
    MetricFamily,
    SummedGaugeFamily,
    ValueFactory,
    multiprocess_dir,
    value_class,
)
from pipeline.train.counters import SKIP_REASONS
from pipeline.train.observers import REGIME_SWITCHES, SessionObserver

if TYPE_CHECKING:
    from pipeline.train.drift import DriftDetection
    from pipeline.train.records import TrainingRecord


# Per-example negative bounds in nats: a 784-pixel Bernoulli model starts near
# 784 log 2 = 543 and learns towards 60-150 (MNIST); Gaussian decoders (Frey Face) go
# negative, to about -1,500. Fine steps where trained Bernoulli models live.
NEGATIVE_ELBO_BUCKETS = (
    -2000.0, -1500.0, -1000.0, -500.0, -250.0, 0.0, 25.0, 50.0, 75.0, 100.0, 125.0, 150.0,
    175.0, 200.0, 250.0, 300.0, 400.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 5000.0,
)  # fmt: skip
# One XLA step of the paper's model takes 5-20 ms on a CPU core; partial minibatches and
# first-call compilation (about a second) fall in the top buckets.
STEP_SECONDS_BUCKETS = (
    0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
# A key counts as drifting this long after its latest detection: the alert rules' window.
DRIFTING_SECONDS = 600.0
PER_KEY_METRICS = ("all", "none")

# The registry of this process's metrics in single-process mode (tests, in-process jobs).
REGISTRY = CollectorRegistry(auto_describe=True)


class Families:
    """The metric families; built on first use (`families()`), after the multiprocess
    choice is made. Tests build their own, in a registry of their own."""

    def __init__(
        self, registry: CollectorRegistry | None = REGISTRY, values: ValueFactory | None = None
    ) -> None:
        values = values or value_class()

        def gauge(name: str, documentation: str, labels=("model",)) -> GaugeFamily:
            return GaugeFamily(name, documentation, labels, registry, values)

        def counter(name: str, documentation: str, labels=("model",)) -> CounterFamily:
            return CounterFamily(name, documentation, labels, registry, values)

        def histogram(name: str, documentation: str, buckets) -> HistogramFamily:
            return HistogramFamily(
                name, documentation, ("model",), registry, values, buckets=buckets
            )

        self.elbo = gauge(
            "aevb_elbo_nats",
            "Test-then-train variational lower bound per example on the latest minibatch "
            "(measured before the update), in nats.",
        )
        self.reconstruction = gauge(
            "aevb_reconstruction_log_likelihood_nats",
            "Reconstruction term E_q[log p(x|z)] of the latest minibatch's bound, in nats.",
        )
        self.kl = gauge(
            "aevb_kl_nats", "KL(q(z|x) || p(z)) term of the latest minibatch's bound, in nats."
        )
        self.negative_elbo = histogram(
            "aevb_negative_elbo_nats",
            "Per-example negative test-then-train bound (a loss: lower is better), in nats.",
            NEGATIVE_ELBO_BUCKETS,
        )
        self.examples = counter("aevb_examples_total", "Examples scored and trained on.")
        self.steps = counter("aevb_train_steps_total", "Minibatch updates applied.")
        self.skipped = counter(
            "aevb_skipped_steps_total",
            "Minibatches scored but not applied, by reason (non_finite: loss or gradients).",
            ("model", "reason"),
        )
        self.rejected = counter(
            "aevb_records_rejected_total",
            "Records rejected to the dead-letter output, by reason.",
            ("model", "reason"),
        )
        self.step_seconds = histogram(
            "aevb_step_seconds",
            "Wall time of one training step (score, gradients, Adagrad update), in seconds.",
            STEP_SECONDS_BUCKETS,
        )
        self.snapshots = counter("aevb_snapshots_total", "Snapshot versions written.")
        self.last_snapshot = gauge(
            "aevb_last_snapshot_timestamp_seconds",
            "Unix time of the newest snapshot (of the session start while there is none).",
        )
        self.drift_detections = counter(
            "aevb_drift_detections_total",
            "Drift detections on the test-then-train negative bound.",
            ("model", "detector"),
        )
        self.drift_statistic = gauge(
            "aevb_drift_statistic",
            "Drift detector's current statistic: page-hinkley cumulative sum difference "
            "(in --drift-units: multiples of the learned minibatch noise by default), adwin "
            "window width (minibatches).",
            ("model", "detector"),
        )
        self.drift_threshold = gauge(
            "aevb_drift_threshold",
            "Value the drift statistic is compared with: page-hinkley threshold, adwin "
            "minimum rise of the mean (both in --drift-units).",
            ("model", "detector"),
        )
        self.regime_switches = counter(
            "aevb_regime_switches_total",
            "Switches after a drift detection (--regime-memory), by kind: return (to a stored "
            "regime that explained the new data better than the current model) or rollback "
            "(to the model from before the detection: the model's own instability).",
            ("model", "kind"),
        )
        self.active_regime = gauge(
            "aevb_active_regime",
            "Id of the regime the model is of: 0 at the start, a new id after each drift "
            "detection, a stored one's after a switch back to it (--regime-memory).",
        )

        def summed_gauge(name: str, documentation: str, labels=()) -> SummedGaugeFamily:
            return SummedGaugeFamily(name, documentation, labels, registry, values)

        self.fleet_keys_in_memory = summed_gauge(
            "aevb_fleet_keys_in_memory", "Models held in memory by the job's worker processes."
        )
        self.fleet_keys_trained = summed_gauge(
            "aevb_fleet_keys_trained", "Keys that trained at least one minibatch in this job."
        )
        self.fleet_sessions_opened = counter(
            "aevb_fleet_sessions_opened_total",
            "Models opened: a new key (restored=false) or one restored from its checkpoint "
            "(after an eviction or a restart, restored=true).",
            ("restored",),
        )
        self.fleet_evictions = counter(
            "aevb_fleet_evictions_total",
            "Models checkpointed and dropped to stay within --max-models-in-memory.",
            (),
        )
        self.fleet_examples = counter(
            "aevb_fleet_examples_total", "Examples scored and trained on, all keys.", ()
        )
        self.fleet_drift_detections = counter(
            "aevb_fleet_drift_detections_total", "Drift detections, all keys and detectors.", ()
        )
        self.fleet_keys_drifting = summed_gauge(
            "aevb_fleet_keys_drifting",
            f"Keys with a drift detection in the last {DRIFTING_SECONDS:g} seconds "
            "(updated as minibatches arrive).",
        )
        self.fleet_keys_by_negative_elbo = summed_gauge(
            "aevb_fleet_keys_by_negative_elbo_nats",
            "Keys whose latest minibatch's negative bound per example is at most le nats "
            "(a gauge histogram over keys: histogram_quantile gives the bound's quantiles).",
            ("le",),
        )

    def all(self) -> list[MetricFamily]:
        """Every family, in registration (exposition) order."""
        return [f for f in vars(self).values() if isinstance(f, MetricFamily)]


_families: Families | None = None
_families_lock = threading.Lock()


def families() -> Families:
    global _families
    with _families_lock:
        if _families is None:
            _families = Families()
        return _families


def use_multiprocess_dir(directory: str | os.PathLike) -> bool:
    """Switches this process, and the worker processes it starts later, to multiprocess mode.

    Sets ``PROMETHEUS_MULTIPROC_DIR`` (inherited by the local runners' worker processes),
    where the families store their values once built (`value_class`). It must run before
    this process has built them; returns False (and changes nothing) when it is too late.
    """
    with _families_lock:
        if _families is not None and multiprocess_dir() != os.fspath(directory):
            return False
        os.environ[MULTIPROC_ENV] = os.fspath(directory)
        return True


def exposition_registry() -> CollectorRegistry:
    """What /metrics and the Pushgateway get: all processes' aggregate in multiprocess
    mode, this process's registry otherwise."""
    directory = multiprocess_dir()
    if directory is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


def generate_latest(registry: CollectorRegistry | None = None) -> bytes:
    """The text exposition of `registry` (default: `exposition_registry()`)."""
    return prometheus_client.generate_latest(registry or exposition_registry())


class Fleet:
    """The job-level aggregates of one process: what every key's observer adds to.

    Per key it keeps an int (its bucket of the negative bound) and, for a while after a
    detection, a time: ~100 bytes per key, whatever `--per-key-metrics` says.
    """

    def __init__(self, metrics: Families, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._bounds = (*NEGATIVE_ELBO_BUCKETS, math.inf)
        self._bucket_series = [
            metrics.fleet_keys_by_negative_elbo.labels(le=floatToGoString(bound))
            for bound in self._bounds
        ]
        self._bucket_of: dict[str, int] = {}  # key -> index of its latest bound's bucket
        self._drifting_since: dict[str, float] = {}
        # Every series made now, at 0 (see `PrometheusObserver.on_open`), and kept.
        self._in_memory = metrics.fleet_keys_in_memory.labels()
        self._trained = metrics.fleet_keys_trained.labels()
        self._opened = {
            restored: metrics.fleet_sessions_opened.labels(restored=str(restored).lower())
            for restored in (False, True)
        }
        self._evictions = metrics.fleet_evictions.labels()
        self._examples = metrics.fleet_examples.labels()
        self._drift_detections = metrics.fleet_drift_detections.labels()
        self._drifting = metrics.fleet_keys_drifting.labels()

    def opened(self, resumed: bool) -> None:
        self._in_memory.inc()
        self._opened[resumed].inc()

    def closed(self, reason: str) -> None:
        self._in_memory.inc(-1)
        if reason == "evicted":
            self._evictions.inc()

    def record(self, key: str, examples: int, elbo: float) -> None:
        self._examples.inc(examples)
        with self._lock:
            if np.isfinite(elbo):
                self._move(key, bisect.bisect_left(self._bounds, -elbo))
            self._expire_drifting()

    def drift(self, key: str) -> None:
        self._drift_detections.inc()
        with self._lock:
            if key not in self._drifting_since:
                self._drifting.inc()
            self._drifting_since[key] = self._clock()

    def _move(self, key: str, bucket: int) -> None:
        """Cumulative buckets: a key counts in its bucket and every one above it."""
        old = self._bucket_of.get(key)
        if old == bucket:
            return
        self._bucket_of[key] = bucket
        if old is None:
            self._trained.inc()
            old = len(self._bounds)
        step = 1 if bucket < old else -1
        for index in range(min(bucket, old), max(bucket, old)):
            self._bucket_series[index].inc(step)

    def _expire_drifting(self) -> None:
        if not self._drifting_since:
            return
        horizon = self._clock() - DRIFTING_SECONDS
        expired = [key for key, since in self._drifting_since.items() if since < horizon]
        for key in expired:
            del self._drifting_since[key]
        if expired:
            self._drifting.inc(-len(expired))


_fleet: Fleet | None = None


def fleet() -> Fleet:
    """This process's `Fleet`, made on first use (after the multiprocess choice)."""
    global _fleet
    metrics = families()
    with _families_lock:
        if _fleet is None:
            _fleet = Fleet(metrics)
        return _fleet


class PrometheusObserver(SessionObserver):
    """Updates the Prometheus metrics from a session's events (any number of keys).

    `per_key`: "all" keeps every per-key series; "none" only the job-level aggregates
    (`Fleet`), for jobs of thousands of keys where ~70 series per key would swamp a
    Prometheus server (10,000 keys: 700,000 series).
    """

    def __init__(self, per_key: str = "all") -> None:
        if per_key not in PER_KEY_METRICS:
            raise ValueError(f"per_key must be one of {PER_KEY_METRICS}, got {per_key!r}")
        self._metrics = families()
        self._fleet = fleet()
        self._per_key = per_key == "all"

    def on_open(
        self,
        key: str,
        last_snapshot_unix: float,
        drift_thresholds: Mapping[str, float] | None = None,
        resumed: bool = False,
    ) -> None:
        self._fleet.opened(resumed)
        if not self._per_key:
            return
        m = self._metrics
        # Every series exists from the start at 0, so that rate() and increase() see the
        # first increment (a series born at 1 has no increase).
        for counter in (m.examples, m.steps, m.snapshots):
            counter.labels(model=key)
        for reason in SKIP_REASONS:
            m.skipped.labels(model=key, reason=reason)
        m.negative_elbo.labels(model=key)
        m.step_seconds.labels(model=key)
        m.last_snapshot.labels(model=key).set(last_snapshot_unix)
        for detector, threshold in (drift_thresholds or {}).items():
            m.drift_detections.labels(model=key, detector=detector)
            m.drift_statistic.labels(model=key, detector=detector).set(0.0)
            m.drift_threshold.labels(model=key, detector=detector).set(threshold)

    def on_close(self, key: str, reason: str) -> None:
        self._fleet.closed(reason)

    def on_record(self, record: TrainingRecord) -> None:
        self._fleet.record(record.key, record.batch_size, record.elbo)
        if not self._per_key:
            return
        m = self._metrics
        key = record.key
        m.examples.labels(model=key).inc(record.batch_size)
        m.step_seconds.labels(model=key).observe(record.step_seconds)
        if not record.applied:
            m.skipped.labels(model=key, reason="non_finite").inc()
        else:
            m.steps.labels(model=key).inc()
        if np.isfinite(record.elbo):
            m.elbo.labels(model=key).set(record.elbo)
            m.reconstruction.labels(model=key).set(record.reconstruction_log_likelihood)
            m.kl.labels(model=key).set(record.kl)
        if record.elbo_per_example:
            m.negative_elbo.labels(model=key).observe_many(-np.asarray(record.elbo_per_example))

    def on_drift_statistic(self, key: str, detector: str, statistic: float) -> None:
        if self._per_key:
            self._metrics.drift_statistic.labels(model=key, detector=detector).set(statistic)

    def on_drift(self, detection: DriftDetection) -> None:
        self._fleet.drift(detection.key)
        if self._per_key:
            self._metrics.drift_detections.labels(
                model=detection.key, detector=detection.detector
            ).inc()

    def on_snapshot(self, key: str, path: str, reason: str, created_unix: float) -> None:
        if not self._per_key:
            return
        self._metrics.snapshots.labels(model=key).inc()
        self._metrics.last_snapshot.labels(model=key).set(created_unix)

    def on_regime(self, key: str, regime: int, change: str) -> None:
        if not self._per_key:
            return
        for kind in REGIME_SWITCHES:  # from 0, as the others
            switches = self._metrics.regime_switches.labels(model=key, kind=kind)
            if change == kind:
                switches.inc()
        self._metrics.active_regime.labels(model=key).set(regime)


def count_rejected(model: str, reason: str, count: int = 1) -> None:
    """aevb_records_rejected_total{model, reason} += count."""
    families().rejected.labels(model=model, reason=reason).inc(count)


def init_rejected(model: str, reasons: Iterable[str]) -> None:
    """Creates the rejected-records series of `model` at 0 (see `PrometheusObserver.on_open`)."""
    rejected = families().rejected
    for reason in reasons:
        rejected.labels(model=model, reason=reason)
