"""One model key's training session: resume, test-then-train, checkpoints, snapshots, log.

The Beam trainer holds one session per model key; `aevb` drives the same class, so a run
behaves the same whichever way it is fed. Layout under `RUN_DIR`:

    checkpoints/<key>/          training state (restored when the session starts)
    snapshots/<key>/<version>/  SavedModel snapshots (see `pipeline.train.snapshots`)
    progress.jsonl              one line per logged step, all keys (on an object store:
                                progress-<host>-<pid>.jsonl, one per worker process)

`RUN_DIR` may be on an object store (`s3://bucket/run`): the session then works in this
process's working copy and publishes to the store (`pipeline.ingest.run_mirror`).

>>> import tempfile, numpy as np, vae
>>> run_dir = tempfile.mkdtemp()
>>> config = vae.VAEConfig(input_dim=4, latent_dim=2, hidden_dim=8, batch_size=2)
>>> session = TrainingSession(run_dir, "default", config, Cadence(log_every_steps=1))
>>> record = session.train(np.eye(4, dtype=np.float32)[:2])
>>> record.examples_seen, session.close().name      # the final snapshot is version 1
(2, '1')
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import vae
from pipeline.ingest.keys import validate_model_key
from pipeline.ingest.run_mirror import RunMirror, is_remote
from pipeline.train.checkpoints import CheckpointStore
from pipeline.train.drift import DriftDetection, DriftMonitor, DriftSettings
from pipeline.train.instability import SHARE, InstabilityCheck
from pipeline.train.observers import SessionObserver
from pipeline.train.progress import ProgressLog, progress_log
from pipeline.train.records import TrainingRecord
from pipeline.train.regimes import RegimeMemory, Switch
from pipeline.train.snapshots import SnapshotWriter
from vae.snapshot_format import read_metadata

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often a session logs, checkpoints and snapshots (None disables a trigger)."""

    log_every_steps: int = 10
    checkpoint_every_steps: int = 1000
    snapshot_every_examples: int | None = None
    snapshot_every_seconds: float | None = None
    keep_snapshots: int = 5
    evaluate_every_examples: int | None = None

    def __post_init__(self) -> None:
        for name in ("log_every_steps", "checkpoint_every_steps", "keep_snapshots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "snapshot_every_examples",
            "snapshot_every_seconds",
            "evaluate_every_examples",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


class TrainingSession:
    """Trains one model key and keeps its run directory current.

    Thread-safe: a worker's threads may share one session per key (see `pipeline.train.trainer`).

    `observers` hear of every record, snapshot and drift detection (`SessionObserver`).
    With `drift` settings, a `DriftMonitor` watches the test-then-train negative bound; a
    detection is logged, written to progress.jsonl as a line with a "drift" field, told to
    the observers, and snapshotted at once (reason "drift"). The detectors' state goes into
    every checkpoint: a resumed session detects as if it had never stopped. A detection the
    model caused itself (`InstabilityCheck`: the examples it learned a while ago got worse
    as much as the new ones) is not drift: logged and written to progress.jsonl as an
    "instability" line, without snapshot or reset.

    With `regime_memory` N, a `RegimeMemory` of up to N earlier regimes: at each detection
    the ended model is kept, and a stored one that explains the next minibatches clearly
    better is switched to -- logged, written to progress.jsonl as a "regime" line, told to
    the observers (`on_regime`) and snapshotted (reason "regime"; "rollback" when the model
    from before the detection is the one that explains the data). The library is part of
    the checkpoint.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        key: str,
        config: vae.VAEConfig,
        cadence: Cadence = Cadence(),
        progress: ProgressLog | None = None,
        evaluator: Callable[[vae.VAE], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
        observers: Sequence[SessionObserver] = (),
        drift: DriftSettings | None = None,
        reset_optimizer_on_drift: bool = False,
        regime_memory: int = 0,
    ) -> None:
        self.run_dir = os.fspath(run_dir)
        self.key = validate_model_key(key)
        self.cadence = cadence
        self.clock = clock
        self.trainer = vae.Trainer(config)
        mirror = RunMirror.for_run(self.run_dir) if is_remote(self.run_dir) else None
        local = pathlib.Path(self.run_dir) if mirror is None else mirror.local
        self.checkpoints = CheckpointStore(local / "checkpoints" / key, self.trainer, mirror=mirror)
        self.resumed = self.checkpoints.restore()
        # Whether the training state changed since it was restored or last saved.
        self._unsaved = not self.resumed
        self.snapshots = SnapshotWriter(local, key, keep=cadence.keep_snapshots, mirror=mirror)
        self.progress = progress or progress_log(self.run_dir)
        self.evaluator = evaluator
        self._started = time.perf_counter()
        # From the newest snapshot, not from now: a session restored (after a restart or an
        # eviction) keeps the snapshot cadence, and its close snapshots what came since.
        newest = self.snapshots.newest_metadata()
        self._last_snapshot_time = float(newest.get("created_unix_seconds", clock()))
        self._last_snapshot_examples = newest.get("examples_seen", self.trainer.examples_seen)
        self._last_evaluation_examples = self.trainer.examples_seen
        self._last_checkpoint_step = self.trainer.step
        # The trainer's (step, examples seen, skipped steps), kept from its last step: a
        # job asks for them with every element, and reading a variable costs ~50 µs.
        self._counters = (self.trainer.step, self.trainer.examples_seen, self.trainer.skipped_steps)
        self._window = _Window()
        self._lock = threading.RLock()
        self.observers = tuple(observers)
        self._observer_failures: set[tuple[int, str]] = set()
        self.drift = DriftMonitor(drift) if drift is not None and drift.enabled else None
        if self.drift is not None and self.resumed:
            self._restore_drift(self.checkpoints.session_state.get("drift"))
        if reset_optimizer_on_drift and self.drift is None:
            raise ValueError("resetting the optimiser on drift needs a drift detector")
        if regime_memory and self.drift is None:
            raise ValueError("a regime memory acts on drift detections: it needs a detector")
        self.reset_optimizer_on_drift = reset_optimizer_on_drift
        self.regimes = RegimeMemory(self.trainer, regime_memory, key) if regime_memory else None
        if self.regimes is not None and "regimes" in self.checkpoints.session_state:
            self.regimes.load(
                self.checkpoints.session_state["regimes"], self.checkpoints.session_arrays
            )
        self.drift_detections: list[DriftDetection] = []
        # Detections the model caused (`pipeline.train.instability`), not counted as drift.
        self.instabilities: list[DriftDetection] = []
        self.instability = InstabilityCheck()
        if "instability" in self.checkpoints.session_state:
            self.instability.load(
                self.checkpoints.session_state["instability"], self.checkpoints.session_arrays
            )
        self.regime_switches: list[Switch] = []
        self._notify_open(self.resumed)

    @property
    def examples_seen(self) -> int:
        return self._counters[1]

    def train(
        self,
        batch: np.ndarray,
        event_time: float | None = None,
        read: Sequence[tuple[str, np.ndarray]] = (),
    ) -> TrainingRecord:
        """One test-then-train step on `batch`, then whatever the cadence asks for.

        `read` names the file records of `batch`, as (origin, positions) pairs: they join
        the key's read ledger, saved with its next checkpoint (see `unread`).
        """
        with self._lock:
            return self._train(batch, event_time, read)

    def unread(self, origin: str, positions: np.ndarray) -> np.ndarray:
        """Which of these records of file `origin` the model has not learned from yet (a
        mask): a restarted job reads its files again, and the checkpoint's ledger says
        which records its model already holds."""
        return self.checkpoints.read_ledger.unread(origin, positions)

    def _train(
        self, batch: np.ndarray, event_time: float | None, read: Sequence[tuple[str, np.ndarray]]
    ) -> TrainingRecord:
        started = time.perf_counter()
        result = self.trainer.train_step(batch)
        self._counters = (result.step, result.examples_seen, result.skipped_steps)
        self._unsaved = True
        # Scored and applied, or skipped as non-finite: either way done with, never retried.
        for origin, positions in read:
            self.checkpoints.read_ledger.add(origin, positions)
        step_seconds = time.perf_counter() - started
        now = self.clock()
        record = TrainingRecord(
            key=self.key,
            step=result.step,
            examples_seen=result.examples_seen,
            batch_size=len(batch),
            elbo=float(result.elbo.mean()),
            reconstruction_log_likelihood=float(result.reconstruction_log_likelihood.mean()),
            kl=float(result.kl.mean()),
            applied=result.applied,
            event_time=now if event_time is None else event_time,
            processing_time=now,
            wall_seconds=time.perf_counter() - self._started,
            step_seconds=step_seconds,
            elbo_per_example=tuple(result.elbo.tolist()),
        )
        if not result.applied:
            logger.warning(
                "%s: skipped a minibatch of %d examples whose loss or gradients were not finite",
                self.key,
                len(batch),
            )
        self._window.add(record)
        self._notify("on_record", record)
        # The detectors first: a checkpoint the cadence writes next holds them as they are
        # after this very minibatch, like the model.
        if self.drift is not None and record.applied:
            self._watch_drift(batch, record)
            self.instability.observe(batch, result.elbo)
            if self.regimes is not None:
                self.regimes.observe(record.elbo)
                if self.regimes.scoring:
                    self._consider_regimes(batch, record)
        self._after_step(record)
        return record

    def _watch_drift(self, batch: np.ndarray, record: TrainingRecord) -> None:
        detection = self.drift.update(
            -record.elbo, record.examples_seen, key=self.key, step=record.step
        )
        for detector, statistic in self.drift.statistics.items():
            self._notify("on_drift_statistic", self.key, detector, statistic)
        if detection is None:
            return
        rise = detection.value - detection.baseline  # nats: the negative bound rose
        unstable, earlier_rise = self.instability.is_instability(
            self.trainer.model, batch, rise, self.drift.noise.value, self.trainer.config.seed
        )
        if unstable:
            self._model_instability(detection, rise, earlier_rise)
            return
        self.drift_detections.append(detection)
        logger.warning(
            "%s: drift detected by %s at %d examples seen: statistic %.2f > %.2f "
            "(units of %.3g nats; minibatch negative bound %.2f nats, baseline %.2f)",
            self.key,
            detection.detector,
            detection.examples_seen,
            detection.statistic,
            detection.threshold,
            detection.noise_scale,
            detection.value,
            detection.baseline,
        )
        self.progress.write(
            {
                "key": self.key,
                "step": self.trainer.step,
                "examples": detection.examples_seen,
                "wall_seconds": round(time.perf_counter() - self._started, 3),
                "drift": detection.to_dict(),
            }
        )
        self._notify("on_drift", detection)
        self._snapshot("drift")
        if self.regimes is not None:
            # Before the reset: the regime that ended is kept with its optimiser state.
            self.regimes.open_window(detection.examples_seen)
        if self.reset_optimizer_on_drift:
            # After the snapshot, which keeps the model as it was when the data moved.
            self.trainer.reset_optimizer()
            self._unsaved = True
            logger.info("%s: optimiser state reset (--adaptation reset)", self.key)
        if self.trainer.config.drift_step_boost is not None:
            self.trainer.boost_steps()
            self._unsaved = True

    def _model_instability(
        self, detection: DriftDetection, rise: float, earlier_rise: float
    ) -> None:
        """A detection the model caused: it explains the examples it learned a while ago
        about as much worse as the new ones. Not drift: no drift snapshot, no reset; with a
        regime memory, the model goes back to its copy from before."""
        self.instabilities.append(detection)
        logger.warning(
            "%s: the bound rose by %.2f nats at %d examples seen, but the examples learned "
            "10-20 minibatches ago rose by %.2f: the model's own instability, not drift",
            self.key,
            rise,
            detection.examples_seen,
            earlier_rise,
        )
        self.progress.write(
            {
                "key": self.key,
                "step": self.trainer.step,
                "examples": detection.examples_seen,
                "wall_seconds": round(time.perf_counter() - self._started, 3),
                "instability": {**detection.to_dict(), "earlier_rise_nats": earlier_rise},
            }
        )
        if self.regimes is not None:
            switch = self.regimes.roll_back(detection.examples_seen, earlier_rise, SHARE * rise)
            if switch is not None:
                self._switched(switch, detection.step)

    def _consider_regimes(self, batch: np.ndarray, record: TrainingRecord) -> None:
        """While a detection's window is open: whether a stored regime explains the new
        minibatches better than the current model, and if so the switch to it."""
        active = self.regimes.active
        switch = self.regimes.consider(
            batch, record.elbo, self.drift.noise.value, record.examples_seen
        )
        if switch is None:
            if self.regimes.active != active:  # the window closed: a new regime
                self._unsaved = True
                self._notify("on_regime", self.key, self.regimes.active, "new")
            return
        self._switched(switch, record.step)

    def _switched(self, switch: Switch, step: int | None) -> None:
        self._unsaved = True
        self.regime_switches.append(switch)
        what = (
            f"back to regime {switch.to_regime} (from {switch.from_regime})"
            if switch.kind == "return"
            else "rolled back to its state from before the detection (the model's own "
            "instability, not the data, made the bound worse)"
        )
        logger.warning(
            "%s: %s at %d examples seen: it explains the last %d minibatches %.2f nats per "
            "example better (margin %.2f)",
            self.key,
            what,
            switch.examples_seen,
            switch.minibatches_scored,
            switch.advantage_nats,
            switch.margin_nats,
        )
        self.progress.write(
            {
                "key": self.key,
                "step": step,
                "examples": switch.examples_seen,
                "wall_seconds": round(time.perf_counter() - self._started, 3),
                "regime": switch.to_dict(),
            }
        )
        self._notify("on_regime", self.key, switch.to_regime, switch.kind)
        self._snapshot("regime" if switch.kind == "return" else "rollback")

    def _restore_drift(self, state: dict[str, Any] | None) -> None:
        if state is not None and self.drift.load_state(state):
            logger.info("%s: drift detectors restored from the checkpoint", self.key)
            return
        logger.info(
            "%s: drift detectors start afresh (%s)",
            self.key,
            "the checkpoint holds none" if state is None else "saved with other settings",
        )

    def _session_state(self) -> dict[str, Any]:
        """What the checkpoint keeps beside the trainer: the drift detectors' state and
        the regime library's bookkeeping (its models: `RegimeMemory.arrays`)."""
        if self.drift is None:
            return {}
        state = {"drift": self.drift.state(), "instability": self.instability.state()}
        if self.regimes is not None:
            state["regimes"] = self.regimes.state()
        return state

    def _notify(self, method: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:  # an observer must never stop training
                # The traceback once per observer and hook, not on every minibatch.
                seen = (id(observer), method) in self._observer_failures
                self._observer_failures.add((id(observer), method))
                logger.log(
                    logging.DEBUG if seen else logging.ERROR,
                    "%s: observer %r failed in %s",
                    self.key,
                    observer,
                    method,
                    exc_info=not seen,
                )

    def snapshot(self, reason: str) -> pathlib.Path:
        """Exports the current model as a new snapshot version now."""
        with self._lock:
            return self._snapshot(reason)

    def _snapshot(self, reason: str) -> pathlib.Path:
        path = self.snapshots.write(
            self.trainer.model,
            {
                "key": self.key,
                "step": self.trainer.step,
                "examples_seen": self.trainer.examples_seen,
                "elbo_at_export": self._window.last_elbo,
                "reason": reason,
            },
        )
        self._last_snapshot_time = self.clock()
        self._last_snapshot_examples = self.trainer.examples_seen
        logger.info("%s: snapshot %s (%s)", self.key, path, reason)
        created = read_metadata(path).get("created_unix_seconds", self._last_snapshot_time)
        self._notify("on_snapshot", self.key, str(path), reason, float(created))
        return path

    def checkpoint(self) -> None:
        """Saves the training state, unless nothing happened since the last save: a
        checkpoint is never rewritten in place (a kill mid-write would spoil the newest)."""
        with self._lock:
            if not self._unsaved:
                return
            arrays = self.instability.arrays() if self.drift is not None else {}
            if self.regimes is not None:
                arrays.update(self.regimes.arrays())
            self.checkpoints.save(self._session_state(), arrays)
            self._unsaved = False
            self.progress.publish()
        self._last_checkpoint_step = self.trainer.step

    def reopen(self) -> None:
        """Tells the observers the closed session is in use again (an evicted model that was
        still held elsewhere, revived rather than restored a second time)."""
        self._notify_open(resumed=True)

    def _notify_open(self, resumed: bool) -> None:
        thresholds = self.drift.thresholds if self.drift else None
        self._notify("on_open", self.key, self._last_snapshot_time, thresholds, resumed)
        if self.regimes is not None:
            self._notify("on_regime", self.key, self.regimes.active, "start")

    def close(self, reason: str = "end of run") -> pathlib.Path | None:
        """Final log line, checkpoint and snapshot (unless the newest snapshot is of this very
        model); returns the newest snapshot directory. `reason` names the snapshot."""
        with self._lock:
            return self._close(reason)

    def _close(self, reason: str) -> pathlib.Path | None:
        self._log()
        self.checkpoint()
        newest = self.snapshots.latest_version()
        if newest is None or self.trainer.examples_seen != self._last_snapshot_examples:
            path = self._snapshot(reason)
        else:
            path = self.snapshots.model_dir / str(newest)
        self.progress.publish(force=True)
        self._notify("on_close", self.key, reason)
        return path

    def _after_step(self, record: TrainingRecord) -> None:
        if record.step - self._last_checkpoint_step >= self.cadence.checkpoint_every_steps:
            self.checkpoint()
        every_examples = self.cadence.evaluate_every_examples
        evaluate_now = (
            self.evaluator is not None
            and every_examples is not None
            and record.examples_seen - self._last_evaluation_examples >= every_examples
        )
        if evaluate_now or self._window.steps >= self.cadence.log_every_steps:
            self._log(evaluate=evaluate_now)
        due_by_examples = (
            self.cadence.snapshot_every_examples is not None
            and record.examples_seen - self._last_snapshot_examples
            >= self.cadence.snapshot_every_examples
        )
        due_by_time = (
            self.cadence.snapshot_every_seconds is not None
            and self.clock() - self._last_snapshot_time >= self.cadence.snapshot_every_seconds
        )
        if due_by_examples or due_by_time:
            self._snapshot("every examples" if due_by_examples else "every seconds")

    def _log(self, evaluate: bool = False) -> None:
        if self._window.steps == 0 and not evaluate:
            return
        step, examples_seen, skipped_steps = self._counters
        entry = {
            "key": self.key,
            "step": step,
            "examples": examples_seen,
            "skipped_steps": skipped_steps,
            "wall_seconds": round(time.perf_counter() - self._started, 3),
            **self._window.averages(),
        }
        if evaluate:
            entry.update(self.evaluator(self.trainer.model))
            self._last_evaluation_examples = examples_seen
        self.progress.write(entry)
        self._window = _Window(last_elbo=self._window.last_elbo)


@dataclasses.dataclass
class _Window:
    """Running sums over the steps since the last progress line."""

    steps: int = 0
    examples: int = 0
    elbo: float = 0.0
    reconstruction: float = 0.0
    kl: float = 0.0
    last_elbo: float | None = None
    # Seconds from the event time of the last minibatch's newest element (a Kafka message's
    # CreateTime; a file's or replay's read time) to its update.
    last_event_lag: float | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, record: TrainingRecord) -> None:
        self.steps += 1
        self.last_elbo = record.elbo
        self.last_event_lag = record.processing_time - record.event_time
        if not record.applied or not np.isfinite(record.elbo):
            return
        self.examples += record.batch_size
        self.elbo += record.elbo * record.batch_size
        self.reconstruction += record.reconstruction_log_likelihood * record.batch_size
        self.kl += record.kl * record.batch_size

    def averages(self) -> dict[str, float]:
        if self.examples == 0:
            return {}
        return {
            "elbo": self.elbo / self.examples,
            "reconstruction_log_likelihood": self.reconstruction / self.examples,
            "kl": self.kl / self.examples,
            "examples_per_second": self.examples / (time.perf_counter() - self.started),
            "event_lag_seconds": round(self.last_event_lag, 4),
        }
