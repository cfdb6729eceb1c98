"""The trainer's counters as Beam metrics (namespace ``aevb``), which runner UIs show.

Named as the Prometheus counters of `pipeline.outputs.metrics` without the ``aevb_`` prefix,
a label value appended: ``examples_total``, ``skipped_steps_total_non_finite``,
``records_rejected_total_wrong_width`` ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apache_beam.metrics import Metrics

from pipeline.train.observers import REGIME_SWITCHES, SessionObserver

if TYPE_CHECKING:
    from pipeline.train.drift import DriftDetection
    from pipeline.train.records import TrainingRecord

__all__ = ["NAMESPACE", "SKIP_REASONS", "BeamCounters", "beam_counter_name"]

NAMESPACE = "aevb"
# Why the trainer may score a minibatch without applying its update.
SKIP_REASONS = ("non_finite",)


class BeamCounters(SessionObserver):
    """The counters as Beam metrics (namespace ``aevb``), for runner UIs.

    Beam attributes an increment to the step whose code is running, so these count only
    when the session is called from a DoFn (outside one Beam drops them).
    """

    def __init__(self) -> None:
        def counter(metric: str, label_value: str | None = None):
            return Metrics.counter(NAMESPACE, beam_counter_name(metric, label_value))

        self._examples = counter("aevb_examples_total")
        self._steps = counter("aevb_train_steps_total")
        self._skipped = {r: counter("aevb_skipped_steps_total", r) for r in SKIP_REASONS}
        self._snapshots = counter("aevb_snapshots_total")
        self._drift = counter("aevb_drift_detections_total")
        self._regime_switches = counter("aevb_regime_switches_total")

    def on_record(self, record: TrainingRecord) -> None:
        self._examples.inc(record.batch_size)
        if record.applied:
            self._steps.inc()
        else:
            self._skipped["non_finite"].inc()

    def on_drift(self, detection: DriftDetection) -> None:
        self._drift.inc()

    def on_snapshot(self, key: str, path: str, reason: str, created_unix: float) -> None:
        self._snapshots.inc()

    def on_regime(self, key: str, regime: int, change: str) -> None:
        if change in REGIME_SWITCHES:
            self._regime_switches.inc()


def beam_counter_name(metric: str, label_value: str | None = None) -> str:
    """The Beam counter name of a Prometheus counter (and one label value).

    >>> beam_counter_name("aevb_records_rejected_total", "wrong_width")
    'records_rejected_total_wrong_width'
    """
    name = metric.removeprefix(f"{NAMESPACE}_")
    return name if label_value is None else f"{name}_{label_value}"
