"""What a `TrainingSession` tells the outside world: records, snapshots, drift.

Observers are how metrics (`pipeline.outputs.metrics`), Beam counters and anything else follow a
session without the session knowing them. Each method carries the model key, so one
observer can follow every session of a process. Methods run on the training thread under
the session's lock: they must be quick and must not raise (a failing observer is logged
and skipped, never allowed to stop training).

>>> class Count(SessionObserver):
...     def __init__(self): self.records = 0
...     def on_record(self, record): self.records += 1
>>> observer = Count(); observer.on_snapshot("default", "/tmp/1", "every seconds", 0.0)
>>> observer.records
0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.train.drift import DriftDetection
    from pipeline.train.records import TrainingRecord


# What `on_regime` reports: the session opened, a new regime, and the two kinds of switch.
REGIME_SWITCHES = ("return", "rollback")
REGIME_CHANGES = ("start", "new", *REGIME_SWITCHES)


class SessionObserver:
    """Hooks called by `TrainingSession`; every one does nothing unless overridden."""

    def on_open(
        self,
        key: str,
        last_snapshot_unix: float,
        drift_thresholds: Mapping[str, float] | None = None,
        resumed: bool = False,
    ) -> None:
        """A session for `key` started (`resumed`: from its checkpoint). `last_snapshot_unix`
        is the creation time of its newest snapshot, or the start time when it has none;
        `drift_thresholds` maps each of its drift detectors to what the detector's
        statistic is compared with (None: no drift detection)."""

    def on_close(self, key: str, reason: str) -> None:
        """The session was closed (checkpointed, snapshotted, dropped); `reason` is its
        final snapshot's, "evicted" for a model dropped to bound memory."""

    def on_record(self, record: TrainingRecord) -> None:
        """One minibatch was scored and (if `record.applied`) trained on."""

    def on_drift_statistic(self, key: str, detector: str, statistic: float) -> None:
        """The drift detector's current statistic after the latest minibatch."""

    def on_drift(self, detection: DriftDetection) -> None:
        """The drift detector fired (the session snapshots right after)."""

    def on_snapshot(self, key: str, path: str, reason: str, created_unix: float) -> None:
        """A snapshot version was written."""

    def on_regime(self, key: str, regime: int, change: str) -> None:
        """With a regime memory: the key's active regime is now `regime` after a `change`:
        "start" (the session opened), "new" (a detection no stored regime explained),
        "return" (a stored regime came back) or "rollback" (the model went back to its
        state from before a detection that its own instability caused); the session
        snapshots after the last two."""
