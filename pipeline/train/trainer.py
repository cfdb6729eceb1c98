"""`TrainVAE`: examples in, training records out -- one model per key, test-then-train.

The composite transform keys its input and hands it to a stateful DoFn. Per key the DoFn
holds a `TrainingSession` (the model, restored from `RUN_DIR/checkpoints/<key>` when the
worker starts) and cuts the incoming chunks into minibatches of M examples. The rows that
do not fill a minibatch wait in Beam state; a processing-time timer trains them as a partial
minibatch after `max_batch_wait_seconds` (streaming), and the end-of-input timer trains the
last ones and writes the final checkpoint and snapshot (bounded input, or a drained stream).

After a crash the model is the one of its last checkpoint. Rows from files carry their
file's path, content digest and positions: the key's read ledger, saved with each checkpoint,
says which of them the restored model learned, and those are dropped (counted in the Beam
counter ``aevb/examples_already_trained``), so a job that reads its files again trains
each record once. Other sources replay from where their own position says (see the
README, "Delivery and restarts").

    records = (
        pipeline
        | ReplayDataset("mnist", chunk_size=1000, max_examples=10**6)
        | TrainVAE(VAEConfig(), run_dir="runs/mnist")
    )
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.typehints import Any as AnyHint
from apache_beam.typehints import Tuple
from apache_beam.utils.timestamp import Timestamp

import vae
from pipeline.ingest import lifecycle
from pipeline.ingest.decode import KeyedChunk
from pipeline.ingest.keys import validate_model_key
from pipeline.ingest.run_mirror import is_remote, use_store_options
from pipeline.train.checkpoints import checkpoint_number, saved_state
from pipeline.train.counters import BeamCounters
from pipeline.train.drift import DriftSettings
from pipeline.train.observers import SessionObserver
from pipeline.train.records import TrainingRecord
from pipeline.train.session import Cadence, TrainingSession
from pipeline.train.snapshots import newest_snapshot_metadata

logger = logging.getLogger(__name__)

# Threads writing the checkpoints of a bundle's keys (the machines this runs on have 2 cores).
CHECKPOINT_THREADS = 2


@dataclasses.dataclass(frozen=True)
class TestSetEvaluation:
    """Which held-out data the trainer evaluates every `evaluate_every_examples`."""

    dataset: str
    data_dir: str | None = None
    fallback: str | None = None
    examples: int = 10_000
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """Everything a trainer worker needs; pickled into the DoFn."""

    run_dir: str
    config: vae.VAEConfig
    cadence: Cadence = Cadence()
    max_batch_wait_seconds: float = 5.0
    max_examples: int | None = None
    job_id: str | None = None
    evaluation: TestSetEvaluation | None = None
    streaming: bool = False
    # Called in each worker process: observers its sessions tell besides the Beam counters.
    observer_factories: tuple[Callable[[], SessionObserver], ...] = ()
    drift: DriftSettings | None = None
    reset_optimizer_on_drift: bool = False
    max_models_in_memory: int | None = None
    regime_memory: int = 0
    # A run directory on an object store: how workers reach it (`run_mirror.store_options`).
    store_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class TrainVAE(beam.PTransform):
    """PCollection of examples -> PCollection of `TrainingRecord`s, one per minibatch.

    Elements may be one example (1-D array of D values), a chunk of examples ([k, D]),
    either of those paired with a model key: `(key, example_or_chunk)`, or the
    `pipeline.ingest.read.KeyedChunk`s of the read path. Chunks are far cheaper: Beam's
    per-element cost is of the order of one example's training step.

    Every session counts in Beam counters (`pipeline.train.counters`); each of
    `observer_factories` is called once per session in the worker process to add an
    observer of its own (the jobs pass `pipeline.outputs.metrics.PrometheusObserver`).

    With `max_models_in_memory`, a worker process keeps at most that many keys' models:
    opening one more closes the least recently used -- checkpoint, and a snapshot (reason
    "evicted") when it learned since its last -- and drops it (Beam counter
    ``aevb/models_evicted``); its next example restores it from that checkpoint, exactly,
    with its snapshot cadence, its drift detectors and its regime library.
    """

    def __init__(
        self,
        config: vae.VAEConfig,
        run_dir: str,
        cadence: Cadence = Cadence(),
        max_batch_wait_seconds: float = 5.0,
        max_examples: int | None = None,
        default_key: str = "default",
        job_id: str | None = None,
        evaluation: TestSetEvaluation | None = None,
        streaming: bool = False,
        clock: Callable[[], float] = time.time,
        observer_factories: Sequence[Callable[[], SessionObserver]] = (),
        drift: DriftSettings | None = None,
        reset_optimizer_on_drift: bool = False,
        max_models_in_memory: int | None = None,
        regime_memory: int = 0,
        store_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.spec = TrainerSpec(
            run_dir=run_dir,
            config=config,
            cadence=cadence,
            max_batch_wait_seconds=max_batch_wait_seconds,
            max_examples=max_examples,
            job_id=job_id,
            evaluation=evaluation,
            streaming=streaming,
            observer_factories=tuple(observer_factories),
            drift=drift,
            reset_optimizer_on_drift=reset_optimizer_on_drift,
            max_models_in_memory=max_models_in_memory,
            regime_memory=regime_memory,
            store_options=dict(store_options or {}),
        )
        if max_models_in_memory is not None and max_models_in_memory < 1:
            raise ValueError(f"max_models_in_memory must be at least 1, got {max_models_in_memory}")
        self.default_key = validate_model_key(default_key)
        self.clock = clock

    def expand(self, examples: beam.PCollection) -> beam.PCollection:
        return (
            examples
            | "KeyChunks"
            >> beam.Map(
                as_keyed_rows, self.default_key, self.spec.config.input_dim
            ).with_output_types(Tuple[str, AnyHint])
            | "TrainPerKey" >> beam.ParDo(TrainerDoFn(self.spec, self.clock))
        )


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds arrays
class Rows:
    """Examples of one key on their way to a minibatch, and the file records they are.

    ``origin`` (the file's path and content digest) and ``positions`` (its records') are None for
    rows that come from no file: a data-set replay, Kafka.
    """

    rows: np.ndarray  # float32 [k, D]
    origin: str | None = None
    positions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def read(self) -> list[tuple[str, np.ndarray]]:
        """The (origin, positions) a session's read ledger takes."""
        return [] if self.origin is None else [(self.origin, self.positions)]


def as_keyed_rows(element: Any, default_key: str, input_dim: int) -> tuple[str, Rows]:
    """(key, `Rows`) from any element form `TrainVAE` accepts."""
    origin = positions = None
    if isinstance(element, KeyedChunk):
        key, values = element.key, element.rows
        if element.origin is not None and element.positions is not None:
            origin, positions = element.origin, element.positions
    elif isinstance(element, tuple):
        key, values = element
    else:
        key, values = default_key, element
    chunk = np.asarray(values, dtype=np.float32)
    if chunk.ndim == 1:
        chunk = chunk[np.newaxis, :]
    if chunk.ndim != 2 or chunk.shape[1] != input_dim:
        raise ValueError(
            f"TrainVAE expects examples of {input_dim} values, got an array of shape "
            f"{chunk.shape}; validate input upstream (pipeline.ingest.validation) so bad records "
            "go to the dead-letter output"
        )
    return str(key), Rows(chunk, origin, positions)


def _slice(parts: list[Rows], start: int, end: int) -> list[Rows]:
    """Rows [start, end) of the parts laid end to end, still as parts (views, no copies)."""
    out, offset = [], 0
    for part in parts:
        low, high = max(start, offset) - offset, min(end, offset + len(part)) - offset
        if low < high:
            positions = None if part.positions is None else part.positions[low:high]
            out.append(Rows(part.rows[low:high], part.origin, positions))
        offset += len(part)
    return out


def _joined(parts: list[Rows]) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One minibatch from parts: its rows and the file records they are."""
    rows = parts[0].rows if len(parts) == 1 else np.concatenate([part.rows for part in parts])
    return rows, [read for part in parts for read in part.read()]


class TrainerDoFn(beam.DoFn):
    """Stateful per-key trainer. Beam state holds the partial minibatch; the model itself
    lives in the worker (one `TrainingSession` per key) and persists through checkpoints,
    as a model that size cannot travel through Beam state at every step."""

    PENDING = BagStateSpec("pending_rows", PickleCoder())
    FLUSH = TimerSpec("flush_partial_minibatch", beam.TimeDomain.REAL_TIME)
    END_OF_INPUT = TimerSpec("end_of_input", beam.TimeDomain.WATERMARK)

    def __init__(self, spec: TrainerSpec, clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.clock = clock
        # examples_total, train_steps_total, skipped_steps_total_<reason>, snapshots_total
        # and drift_detections_total are counted by the sessions' `BeamCounters` observer.
        self.dropped_counter = Metrics.counter("aevb", "examples_beyond_max_examples")
        # File records a restored model had learned already (read again after a restart, or
        # a retried bundle): dropped, never trained twice.
        self.known_counter = Metrics.counter("aevb", "examples_already_trained")
        self.evicted_counter = Metrics.counter("aevb", "models_evicted")

    def setup(self) -> None:
        use_store_options(self.spec.store_options)
        self._sessions: dict[str, TrainingSession] = {}
        self._test_data = None
        if self.spec.evaluation is not None and self.spec.cadence.evaluate_every_examples:
            self._test_data = _test_data(self.spec.evaluation)

    def process(
        self,
        element: tuple[str, Rows],
        timestamp=beam.DoFn.TimestampParam,
        pending=beam.DoFn.StateParam(PENDING),
        flush=beam.DoFn.TimerParam(FLUSH),
        end_of_input=beam.DoFn.TimerParam(END_OF_INPUT),
    ) -> Iterator[TrainingRecord]:
        key, part = element
        session = self._session(key)
        unread = _unread(session, part)
        self.known_counter.inc(len(part) - len(unread))
        part = unread
        buffered = list(pending.read())
        parts = self._within_limit(session, [*buffered, part])
        total = sum(len(p) for p in parts)
        batch_size = self.spec.config.batch_size
        full = total - total % batch_size
        for start in range(0, full, batch_size):
            yield from self._train(session, _slice(parts, start, start + batch_size), timestamp)
        remainder = _slice(parts, full, total)
        if buffered:
            # Only when there is something to clear: Beam's state cache weighs every value
            # it stores, with a walk over all loaded modules (~3 ms with TensorFlow's),
            # which chunks of whole minibatches never need.
            pending.clear()
        for waiting in remainder:
            pending.add(waiting)
        if remainder and not buffered:
            # The wait runs from the first row of a partial minibatch, not the last.
            flush.set(Timestamp.of(self.clock() + self.spec.max_batch_wait_seconds))
        end_of_input.set(GlobalWindow().max_timestamp())
        self._stop_if_done(session)

    @on_timer(FLUSH)
    def flush_partial_minibatch(
        self, key=beam.DoFn.KeyParam, pending=beam.DoFn.StateParam(PENDING)
    ) -> Iterator[TrainingRecord]:
        yield from self._train_pending(key, pending)

    @on_timer(END_OF_INPUT)
    def end_of_input(
        self, key=beam.DoFn.KeyParam, pending=beam.DoFn.StateParam(PENDING)
    ) -> Iterator[TrainingRecord]:
        yield from self._train_pending(key, pending)
        if self.spec.streaming:
            # FnApiRunner runs a stream in rounds and advances the watermark to the end of
            # time after each one, so in streaming this timer does not mean the input ended:
            # keep the model (`finish_bundle` made the round durable). The job closes its
            # sessions when it really ends (`close_live_sessions`).
            return
        # One closing at a time per key: Prism (Beam 2.77) fired this timer a second time,
        # in another bundle, while the first firing was still writing the final snapshot
        # (apache/beam#35771); the second then finds the model closed on disk.
        with _closing_lock(self.spec.run_dir, key):
            if not _is_live(self.spec.run_dir, key) and _closed_on_disk(self.spec.run_dir, key):
                # Evicted and not trained since (or closed by a firing before this one): its
                # checkpoint and snapshot are final already, and restoring the model only to
                # find so would cost as much as a minibatch.
                self._sessions.pop(key, None)
                return
            # Restored from the checkpoint when another worker process trained the key.
            session = self._session(key)
            del self._sessions[key]
            _close(session)

    def start_bundle(self) -> None:
        # Looked up again in every bundle: another worker may have trained a key meanwhile.
        self._sessions = {}

    def finish_bundle(self) -> None:
        # Every bundle leaves its keys' models on disk: FnApiRunner with several workers
        # hands the bundles of a stateful stage to its workers in turn, so a key's next
        # bundle (its timers too) may run in another process, which restores this checkpoint.
        sessions = list(self._sessions.values())
        if len(sessions) < 2:
            for session in sessions:
                session.checkpoint()
            return
        # TensorFlow's saver spends about two thirds of a write in C++, without the GIL:
        # two threads write a fleet's checkpoints ~25% faster (measured 12 -> 9 ms a key).
        with concurrent.futures.ThreadPoolExecutor(CHECKPOINT_THREADS) as pool:
            list(pool.map(TrainingSession.checkpoint, sessions))

    def teardown(self) -> None:
        # Not the end of the run: runners may discard a DoFn instance after any bundle
        # (BundleBasedDirectRunner does after every one). The models, saved at the end of
        # each bundle, stay open in the process; the end-of-input timer (bounded input) or
        # the job (`close_live_sessions`) writes their final checkpoint and snapshot.
        self._sessions = {}

    def _train_pending(self, key: str, pending) -> Iterator[TrainingRecord]:
        buffered = list(pending.read())
        if not buffered:
            return
        pending.clear()
        session = self._session(key)
        parts = self._within_limit(session, buffered)
        yield from self._train(session, parts, Timestamp.of(self.clock()))
        # A partial minibatch can be the one that reaches max_examples.
        self._stop_if_done(session)

    def _train(
        self, session: TrainingSession, parts: list[Rows], timestamp
    ) -> Iterator[TrainingRecord]:
        # Checked again here, not only on arrival: rows that waited in Beam state may have
        # been learned meanwhile (a retried bundle, a file read again while they waited).
        fresh = _unread_once(session, parts)
        self.known_counter.inc(sum(map(len, parts)) - sum(map(len, fresh)))
        parts = fresh
        if parts:
            batch, read = _joined(parts)
            yield session.train(batch, event_time=float(timestamp), read=read)

    def _within_limit(self, session: TrainingSession, parts: list[Rows]) -> list[Rows]:
        parts = [part for part in parts if len(part)]
        if self.spec.max_examples is None:
            return parts
        room = max(0, self.spec.max_examples - session.examples_seen)
        total = sum(len(part) for part in parts)
        if room >= total:
            return parts
        self.dropped_counter.inc(total - room)
        return _slice(parts, 0, room)

    def _stop_if_done(self, session: TrainingSession) -> None:
        limit = self.spec.max_examples
        if limit is not None and session.examples_seen >= limit and self.spec.job_id:
            lifecycle.request_stop(self.spec.job_id)

    def _session(self, key: str) -> TrainingSession:
        session = self._sessions.get(key)
        if session is None:
            evaluator = None
            if self._test_data is not None:
                evaluator = _test_bound_evaluator(self._test_data, self.spec.evaluation.seed)
            session, evicted = _open_session(
                self.spec, validate_model_key(key), evaluator, self.clock
            )
            for old in evicted:
                # Its checkpoint is where the key's next example restores it from, exactly;
                # its snapshot keeps the served model current while it is out of memory.
                old.close(reason="evicted")
                self._sessions.pop(old.key, None)
                self.evicted_counter.inc()
            self._sessions[key] = session
        return session


def _unread(session: TrainingSession, part: Rows) -> Rows:
    """The rows of `part` the session's model has not learned from yet: a restarted job
    reads its files again, and only the records its checkpoint lacks may train."""
    if part.origin is None:
        return part
    unread = session.unread(part.origin, part.positions)
    if unread.all():
        return part
    return Rows(part.rows[unread], part.origin, part.positions[unread])


def _unread_once(session: TrainingSession, parts: list[Rows]) -> list[Rows]:
    """The rows of a minibatch's parts the model has not learned from, each record once."""
    fresh, taken = [], {}
    for part in parts:
        part = _unread(session, part)
        if part.origin is not None and len(part):
            seen = taken.setdefault(part.origin, set())
            positions = part.positions.tolist()
            first = np.fromiter((p not in seen for p in positions), bool, len(positions))
            seen.update(positions)
            if not first.all():
                part = Rows(part.rows[first], part.origin, part.positions[first])
        if len(part):
            fresh.append(part)
    return fresh


@functools.cache
def _test_data(evaluation: TestSetEvaluation) -> np.ndarray:
    """Loaded once per process, however many DoFn instances the runner makes."""
    from pipeline.ingest.datasets import load_dataset

    dataset = load_dataset(evaluation.dataset, evaluation.data_dir, fallback=evaluation.fallback)
    return dataset.test[: evaluation.examples]


def _test_bound_evaluator(test_data: np.ndarray, seed: int):
    def evaluator(model: vae.VAE) -> dict[str, float]:
        result = vae.evaluate(model, test_data, seed=seed)
        return {"test_elbo": result.elbo, "test_examples": len(test_data)}

    return evaluator


# One session per (run directory, key) in a process: two DoFn instances that meet the same
# key in one worker (threaded harnesses) share its model instead of forking it. Least
# recently opened first: with `max_models_in_memory`, the first ones are evicted.
_live_sessions: collections.OrderedDict[tuple[str, str], TrainingSession] = (
    collections.OrderedDict()
)
# Evicted sessions something still holds (another DoFn instance's bundle, the eviction
# itself): reopening the key revives that object instead of forking a second model.
_evicted_sessions: weakref.WeakValueDictionary[tuple[str, str], TrainingSession] = (
    weakref.WeakValueDictionary()
)
_live_lock = threading.Lock()
# Held while a key's model is closed at the end of its input (a lock per key, made once).
_closing_locks: dict[tuple[str, str], threading.Lock] = {}


def _closing_lock(run_dir: str, key: str) -> threading.Lock:
    with _live_lock:
        return _closing_locks.setdefault((run_dir, key), threading.Lock())


def _open_session(
    spec: TrainerSpec, key: str, evaluator, clock: Callable[[], float]
) -> tuple[TrainingSession, list[TrainingSession]]:
    """The live session of `key` (restored when it is not live or is stale), and the least
    recently used sessions of the run evicted to stay within `spec.max_models_in_memory`,
    which the caller closes."""
    name = (spec.run_dir, key)
    with _live_lock:
        session = _live_sessions.get(name)
        revived = None if session is not None else _evicted_sessions.pop(name, None)
        session = session or revived
        on_disk = checkpoint_number(spec.run_dir, key) if _check_due(name, session) else None
        saved = None if session is None else session.checkpoints.saved_number
        if session is None or (on_disk is not None and (saved is None or on_disk > saved)):
            # New here, or another worker process checkpointed the key since: restore.
            session = TrainingSession(
                spec.run_dir,
                key,
                spec.config,
                spec.cadence,
                evaluator=evaluator,
                clock=clock,
                observers=[BeamCounters(), *(make() for make in spec.observer_factories)],
                drift=spec.drift,
                reset_optimizer_on_drift=spec.reset_optimizer_on_drift,
                regime_memory=spec.regime_memory,
            )
        elif session is revived:
            session.reopen()  # a stale revived object is dropped instead, never reopened
        _live_sessions[name] = session
        _live_sessions.move_to_end(name)
        evicted = []
        if spec.max_models_in_memory is not None:
            run = [other for other in _live_sessions if other[0] == spec.run_dir]
            for other in run[: max(0, len(run) - spec.max_models_in_memory)]:
                evicted.append(_live_sessions.pop(other))
                _evicted_sessions[other] = evicted[-1]
        return session, evicted


# On an object store a live session is compared with the published checkpoint at most this
# often: a read per element would cost more than the training step.
REMOTE_STALENESS_CHECK_SECONDS = 10.0
_last_checks: dict[tuple[str, str], float] = {}


def _check_due(name: tuple[str, str], session: TrainingSession | None) -> bool:
    """Whether to compare `name`'s session with the newest checkpoint on disk now: always
    on a local disk and for a session not live; on a store, every
    `REMOTE_STALENESS_CHECK_SECONDS`. Called under `_live_lock`."""
    if session is None or not is_remote(name[0]):
        return True
    now = time.monotonic()
    if now - _last_checks.get(name, -float("inf")) < REMOTE_STALENESS_CHECK_SECONDS:
        return False
    _last_checks[name] = now
    return True


def _is_live(run_dir: str, key: str) -> bool:
    with _live_lock:
        return (run_dir, key) in _live_sessions


def _closed_on_disk(run_dir: str, key: str) -> bool:
    """Whether `key`'s newest snapshot is of the model of its newest checkpoint: closing
    the model restored from it would write nothing."""
    checkpoint = saved_state(run_dir, key)
    if "checkpoint" not in checkpoint:
        return False
    newest = newest_snapshot_metadata(run_dir, key)
    return bool(newest) and newest.get("examples_seen") == checkpoint["examples_seen"]


def _close(session: TrainingSession) -> None:
    with _live_lock:
        _live_sessions.pop((str(session.run_dir), session.key), None)
    session.close()


def close_live_sessions(run_dir: str) -> int:
    """Checkpoints and snapshots every session of `run_dir` still open in this process."""
    with _live_lock:
        sessions = [s for (directory, _), s in _live_sessions.items() if directory == run_dir]
    for session in sessions:
        _close(session)
    return len(sessions)
