"""Sources: a data set replayed as a stream, files (read once or watched), and Kafka.

Every source is a Beam transform from ``PBegin``:

- :class:`ReplayDataset`: ``(model_key, float32 chunk)`` elements, the chunks of
  `pipeline.ingest.replay.ReplayPlan`, from a splittable DoFn that checkpoints every few
  chunks in streaming mode, honours a rate limit and stops on
  `pipeline.ingest.lifecycle.request_stop`.
- :class:`ReadFiles` (bounded) and :class:`WatchFiles` (unbounded): file paths for
  `pipeline.ingest.decode.DecodeFiles`; :func:`read_files` picks one.
- :func:`kafka_source`: Beam's cross-language ``ReadFromKafka`` (needs Java at pipeline
  construction) emitting ``(key_bytes, value_bytes)`` for `pipeline.ingest.decode.DecodeRecords`.

`pipeline.ingest.read.ReadExamples` puts a source and its decoding together.

The streaming sources stamp elements with the wall-clock time they were read and advance
the watermark with them.

>>> parse_source("files:/data/in/*.npy")
('files', '/data/in/*.npy')
>>> parse_source("kafka:localhost:9092/aevb-examples")
('kafka', 'localhost:9092/aevb-examples')
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import MonotonicWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration, Timestamp

from pipeline.ingest.datasets import load_dataset
from pipeline.ingest.lifecycle import stop_requested
from pipeline.ingest.replay import Pacer, ReplayPlan
from pipeline.ingest.scenarios import Scenario, ScenarioSpec, build_scenario

__all__ = [
    "SOURCE_FORMS",
    "ReadFiles",
    "ReplayDataset",
    "WatchFiles",
    "files_match",
    "kafka_source",
    "parse_source",
    "read_files",
]

logger = logging.getLogger(__name__)

SOURCE_FORMS = ("dataset", "files:GLOB", "kafka:BOOTSTRAP/TOPIC")

# The stop of an unbounded replay's chunk range: more chunks than any job will ever read.
_UNBOUNDED_CHUNKS = 2**62
# A streaming replay checkpoints after this many chunks or seconds, whichever comes first,
# so that the runner can commit and downstream stages are never starved for long.
_CHUNKS_PER_CHECKPOINT = 16
_SECONDS_PER_CHECKPOINT = 1.0
# The local FnApiRunner re-invokes a deferred remainder at once, ignoring the requested
# delay (verified with Beam 2.77), so waiting is done by sleeping -- in slices, to notice a
# stop request -- and at most this long per invocation before deferring with the rest of the
# delay, which runners that honour delays then use.
_MAX_WAIT_PER_INVOCATION = 1.0
_SLEEP_SLICE = 0.05
# How long a watched file must stay unmodified before it is read.
DEFAULT_SETTLE_SECONDS = 2.0
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class _OutputTimestampWatermark(WatermarkEstimatorProvider):
    """The watermark follows the output timestamps (wall-clock read times).

    Beam's own ``MonotonicWatermarkEstimator.default_provider()`` starts from None and fails
    on the first comparison (Beam 2.77), hence this provider starting from the minimum.
    """

    def initial_estimator_state(self, element: Any, restriction: Any) -> Timestamp:
        return MIN_TIMESTAMP

    def create_watermark_estimator(self, estimator_state: Timestamp) -> MonotonicWatermarkEstimator:
        return MonotonicWatermarkEstimator(estimator_state)


# Declared by the streaming sources' process(): Beam reads the estimator from the default.
_WATERMARK_PARAM = beam.DoFn.WatermarkEstimatorParam(_OutputTimestampWatermark())


def _sleep_unless_stopped(seconds: float, job_id: str | None) -> None:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if job_id is not None and stop_requested(job_id):
            return
        time.sleep(min(remaining, _SLEEP_SLICE))


# --- Data-set replay ------------------------------------------------------------------------


class _ScenarioPlan:
    """Random access to the chunks of a drift scenario's stream (see `pipeline.ingest.scenarios`).

    Chunk i holds examples [skip + i * chunk_size, ...) of the scenario, so a resumed job
    continues the same stream; the schedule is in examples, not chunks.
    """

    def __init__(
        self, scenario: Scenario, chunk_size: int, max_examples: int | None, skip: int
    ) -> None:
        self._scenario = scenario
        self._size = chunk_size
        self._limit = max_examples
        self._skip = skip

    @property
    def n_chunks(self) -> int | None:
        if self._limit is None:
            return None
        return max(0, math.ceil((self._limit - self._skip) / self._size))

    def chunk(self, data: np.ndarray | None, index: int) -> np.ndarray:
        start = self._skip + index * self._size
        end = start + self._size if self._limit is None else min(start + self._size, self._limit)
        return self._scenario.examples(start, end - start)


class _StoppableOffsetTracker(OffsetRestrictionTracker):
    """An offset tracker that refuses further claims once the job's stop is requested.

    The unclaimed rest of the range is dropped (``check_done`` passes), so the source
    finishes and the pipeline drains like a bounded one.
    """

    def __init__(self, restriction: OffsetRange, job_id: str | None) -> None:
        super().__init__(restriction)
        self._job_id = job_id
        self._stopped = False

    def try_claim(self, position: int) -> bool:
        if self._job_id is not None and stop_requested(self._job_id):
            self._stopped = True
            return False
        return super().try_claim(position)

    def try_split(self, fraction_of_remainder: float) -> Any:
        return None if self._stopped else super().try_split(fraction_of_remainder)

    def check_done(self) -> None:
        if not self._stopped:
            super().check_done()

    def is_bounded(self) -> bool:
        # The stand-in stop of an unbounded replay is not a real bound (a drain must not
        # try to read up to it).
        return self._range.stop < _UNBOUNDED_CHUNKS


@functools.lru_cache(maxsize=4)
def _load_train(dataset: str, data_dir: str | None, fallback: str | None) -> np.ndarray:
    # Cached per process: the restriction provider (for the number of chunks) and every DoFn
    # instance share one copy of the data set.
    return load_dataset(dataset, data_dir, fallback=fallback).train


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds an array
class _ReplaySpec:
    dataset: str
    data_dir: str | None
    fallback: str | None
    data: np.ndarray | None
    model_key: str
    chunk_size: int
    max_examples: int | None
    epochs: int | None
    checkpoint_often: bool
    examples_per_second: float | None
    seed: int
    skip: int
    job_id: str | None
    scenario: ScenarioSpec | None = None

    def rows(self) -> np.ndarray | None:
        if self.scenario is not None:
            return None  # a scenario draws from its own pools
        if self.data is not None:
            return self.data
        return _load_train(self.dataset, self.data_dir, self.fallback)

    def plan(self) -> ReplayPlan | _ScenarioPlan:
        if self.scenario is not None:
            scenario = build_scenario(
                self.scenario, self.dataset, self.data_dir, self.fallback, self.seed
            )
            return _ScenarioPlan(scenario, self.chunk_size, self.max_examples, self.skip)
        return ReplayPlan(
            len(self.rows()),
            self.chunk_size,
            self.max_examples,
            self.epochs,
            self.seed,
            self.skip,
        )


class _ReplayFn(beam.DoFn, RestrictionProvider):
    """Splittable DoFn over chunk indices; also its own restriction provider."""

    def __init__(self, spec: _ReplaySpec) -> None:
        self._spec = spec

    def initial_restriction(self, element: Any) -> OffsetRange:
        n_chunks = self._spec.plan().n_chunks
        return OffsetRange(0, _UNBOUNDED_CHUNKS if n_chunks is None else n_chunks)

    def create_tracker(self, restriction: OffsetRange) -> _StoppableOffsetTracker:
        return _StoppableOffsetTracker(restriction, self._spec.job_id)

    def restriction_size(self, element: Any, restriction: OffsetRange) -> int:
        return restriction.size()

    def setup(self) -> None:
        self._data = self._spec.rows()
        self._plan = self._spec.plan()
        rate = self._spec.examples_per_second
        self._pacer = Pacer(rate) if rate is not None else None

    def process(
        self,
        element: Any,
        tracker: RestrictionTracker = beam.DoFn.RestrictionParam(),
        watermark_estimator: Any = _WATERMARK_PARAM,
    ) -> Iterator[beam.window.TimestampedValue]:
        spec = self._spec
        position = tracker.current_restriction().start
        started = time.monotonic()
        claimed = 0
        while True:
            if self._pacer is not None and (wait := self._pacer.wait_seconds()) > 0:
                _sleep_unless_stopped(min(wait, _MAX_WAIT_PER_INVOCATION), spec.job_id)
                # A stopped job goes on to try_claim, which ends it, instead of deferring.
                stopping = spec.job_id is not None and stop_requested(spec.job_id)
                if wait > _MAX_WAIT_PER_INVOCATION and not stopping:
                    tracker.defer_remainder(Duration.of(wait - _MAX_WAIT_PER_INVOCATION))
                    return
            if not tracker.try_claim(position):
                return
            chunk = self._plan.chunk(self._data, position)
            yield beam.window.TimestampedValue((spec.model_key, chunk), time.time())
            if self._pacer is not None:
                self._pacer.sent(len(chunk))
            position += 1
            claimed += 1
            if spec.checkpoint_often and (
                claimed >= _CHUNKS_PER_CHECKPOINT
                or time.monotonic() - started >= _SECONDS_PER_CHECKPOINT
            ):
                tracker.defer_remainder()
                return


@beam.DoFn.unbounded_per_element()
class _UnboundedReplayFn(_ReplayFn):
    """The same DoFn, declared unbounded: a replay without max_examples or epochs."""


class ReplayDataset(beam.PTransform):
    """PBegin -> ``(model_key, float32 chunk)``: a data set's train split replayed as a stream.

    Chunk i equals the i-th chunk of ``replay_chunks(train, chunk_size, max_examples,
    epochs, seed, skip)``: reshuffled passes, deterministic per seed, chunks never span two
    passes, ``skip`` resumes a run. Without ``max_examples`` and ``epochs`` it is unbounded.

    Args:
        dataset: a name from :data:`pipeline.ingest.datasets.DATASETS` (loaded on the workers with
            ``load_dataset(dataset, data_dir, fallback=fallback)``); with ``data`` only a
            label.
        data: replay these float32 [N, D] rows instead of loading ``dataset`` (tests,
            synthetic streams); they are pickled into the pipeline.
        scenario: replay a drift scenario of ``dataset`` instead (`pipeline.ingest.scenarios`):
            its schedule of phases, in examples, decides what each chunk holds.
        streaming: checkpoint every few chunks (``defer_remainder``) so the runner can commit
            and downstream stages run as the chunks come; an unbounded or rate-limited
            replay does so in batch mode too.
        examples_per_second: long-run rate limit.
        job_id: stop, finishing cleanly, once ``pipeline.ingest.lifecycle.stop_requested(job_id)``.
    """

    def __init__(
        self,
        dataset: str,
        *,
        data_dir: str | None = None,
        fallback: str | None = None,
        model_key: str = "default",
        chunk_size: int = 1000,
        max_examples: int | None = None,
        epochs: int | None = None,
        streaming: bool = False,
        examples_per_second: float | None = None,
        seed: int = 0,
        skip: int = 0,
        job_id: str | None = None,
        data: np.ndarray | None = None,
        scenario: ScenarioSpec | None = None,
    ) -> None:
        super().__init__()
        if scenario is not None and (data is not None or epochs is not None):
            raise ValueError("a drift scenario is its own stream: no data or epochs with it")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        for name, value in (("max_examples", max_examples), ("epochs", epochs), ("skip", skip)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if examples_per_second is not None and not examples_per_second > 0:
            raise ValueError(f"examples_per_second must be positive, got {examples_per_second}")
        if data is not None:
            data = np.ascontiguousarray(data, dtype=np.float32)
            if data.ndim != 2 or len(data) == 0:
                raise ValueError(f"data must be a non-empty [N, D] array, got {data.shape}")
        bounded = max_examples is not None or epochs is not None
        self._spec = _ReplaySpec(
            dataset=dataset,
            data_dir=None if data_dir is None else str(data_dir),
            fallback=fallback,
            data=data,
            model_key=model_key,
            chunk_size=chunk_size,
            max_examples=max_examples,
            epochs=epochs,
            checkpoint_often=streaming or not bounded or examples_per_second is not None,
            examples_per_second=examples_per_second,
            seed=seed,
            skip=skip,
            job_id=job_id,
            scenario=scenario,
        )
        self._fn_class = _ReplayFn if bounded else _UnboundedReplayFn

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Impulse" >> beam.Impulse()
            | "Replay" >> beam.ParDo(self._fn_class(self._spec))
        )


# --- Files ----------------------------------------------------------------------------------


# What says a file is the same file with the same content: size, mtime and inode (0 where the
# file system has none to tell, e.g. object stores).
FileIdentity = tuple[int, float, int]


@dataclasses.dataclass(frozen=True)
class _WatchState:
    """The restriction of a file watch: everything it must remember across checkpoints."""

    next_poll: float  # time.time() of the next poll
    deadline: float | None  # time.time() after which the watch ends (stop_after_seconds)
    # (path, identity) of the files emitted and still there unchanged.
    emitted: frozenset[tuple[str, FileIdentity]] = frozenset()
    # (path, identity) of the files seen in the last poll and not emitted yet.
    pending: tuple[tuple[str, FileIdentity], ...] = ()
    done: bool = False

    def poll(
        self,
        matches: Mapping[str, FileIdentity],
        now: float,
        interval: float,
        settle_seconds: float = 0.0,
    ) -> tuple[_WatchState, list[str]]:
        """(next state, paths to emit now) after a poll that found ``{path: identity}``.

        A file is emitted once it is complete: not empty, the same in two consecutive polls,
        and unmodified for ``settle_seconds`` (a writer that pauses for less is never read
        half-way). Files are known by path and identity, so new content under a name read
        before -- renamed over it, or rewritten -- is emitted again once complete. A file
        gone from the match is forgotten (so the state does not grow forever).
        """
        current = set(matches.items())
        emitted = self.emitted & current
        previous = dict(self.pending)
        ready = sorted(
            path
            for path, identity in matches.items()
            if identity[0] > 0
            and previous.get(path) == identity
            and now - identity[1] >= settle_seconds
            and (path, identity) not in emitted
        )
        emitted |= {(path, matches[path]) for path in ready}
        pending = tuple(sorted(current - emitted))
        state = dataclasses.replace(
            self, next_poll=now + interval, emitted=frozenset(emitted), pending=pending
        )
        return state, ready


def _inode(path: str) -> int:
    """The inode of a local file (new content renamed over a name has a new one), else 0."""
    if "://" in path:
        return 0
    try:
        return os.stat(path).st_ino
    except OSError:  # gone since the match: the next poll forgets it
        return 0


class _WatchTracker(RestrictionTracker):
    """Claims are whole new states; a checkpoint hands the current state on as the residual."""

    def __init__(self, state: _WatchState) -> None:
        self._state = state
        self._checkpointed = False

    def current_restriction(self) -> _WatchState:
        return self._state

    def current_progress(self) -> RestrictionProgress:
        return RestrictionProgress(completed=0.0, remaining=0.0 if self._state.done else 1.0)

    def try_claim(self, state: _WatchState) -> bool:
        if self._state.done or self._checkpointed:
            return False
        self._state = state
        return not state.done

    def try_split(self, fraction_of_remainder: float) -> Any:
        # Only checkpoints: one watch cannot be divided.
        if fraction_of_remainder != 0 or self._state.done or self._checkpointed:
            return None
        self._checkpointed = True
        residual = self._state
        self._state = dataclasses.replace(residual, done=True)
        return self._state, residual

    def check_done(self) -> None:
        if not (self._state.done or self._checkpointed):
            raise ValueError("the file watch returned without finishing or checkpointing")

    def is_bounded(self) -> bool:
        return False


@beam.DoFn.unbounded_per_element()
class _WatchFn(beam.DoFn, RestrictionProvider):
    def __init__(
        self,
        pattern: str,
        poll_interval_seconds: float,
        job_id: str | None,
        stop_after_seconds: float | None,
        settle_seconds: float,
    ) -> None:
        self._pattern = pattern
        self._interval = poll_interval_seconds
        self._job_id = job_id
        self._stop_after = stop_after_seconds
        self._settle = settle_seconds

    def initial_restriction(self, element: Any) -> _WatchState:
        now = time.time()
        deadline = None if self._stop_after is None else now + self._stop_after
        return _WatchState(next_poll=now, deadline=deadline)

    def create_tracker(self, restriction: _WatchState) -> _WatchTracker:
        return _WatchTracker(restriction)

    def restriction_size(self, element: Any, restriction: _WatchState) -> float:
        return 0.0 if restriction.done else 1.0

    def _should_stop(self, state: _WatchState) -> bool:
        if self._job_id is not None and stop_requested(self._job_id):
            return True
        return state.deadline is not None and time.time() >= state.deadline

    def _match(self) -> dict[str, FileIdentity] | None:
        try:
            (result,) = FileSystems.match([self._pattern])
        except BeamIOError as exc:
            # A transient error (e.g. a network file system) must not end an unbounded job.
            logger.warning("Polling %s failed, will retry: %s", self._pattern, exc)
            return None
        return {
            m.path: (m.size_in_bytes, m.last_updated_in_seconds, _inode(m.path))
            for m in result.metadata_list
        }

    def process(
        self,
        element: Any,
        tracker: RestrictionTracker = beam.DoFn.RestrictionParam(),
        watermark_estimator: Any = _WATERMARK_PARAM,
    ) -> Iterator[beam.window.TimestampedValue]:
        state = tracker.current_restriction()
        wait = state.next_poll - time.time()
        if wait > 0:
            _sleep_unless_stopped(min(wait, _MAX_WAIT_PER_INVOCATION), self._job_id)
        if self._should_stop(state):
            tracker.try_claim(dataclasses.replace(state, done=True))
            return
        if time.time() < state.next_poll:
            tracker.defer_remainder(Duration.of(state.next_poll - time.time()))
            return
        now = time.time()
        matches = self._match()
        if matches is None:
            state, ready = dataclasses.replace(state, next_poll=now + self._interval), []
        else:
            state, ready = state.poll(matches, now, self._interval, self._settle)
        if not tracker.try_claim(state):
            return
        for path in ready:
            yield beam.window.TimestampedValue(path, now)
        tracker.defer_remainder(Duration.of(self._interval))


class WatchFiles(beam.PTransform):
    """PBegin -> file paths (unbounded): polls ``pattern`` and emits each file once complete.

    A file is emitted when it is non-empty, its size, modification time and inode are the
    same in two consecutive polls, and it was not modified for ``settle_seconds``: a file
    still being written is not read half-way unless its writer pauses for longer than that
    (producers should write to a name the glob does not match and rename, which is atomic).
    Files are known by path and identity: new content under a name already read (renamed
    over it, or rewritten) is emitted again, whole; so a file that is appended to is read
    again whole, and producers should add files rather than grow them. New files appear
    one to two poll intervals after they settled.

    The watch ends when ``pipeline.ingest.lifecycle.stop_requested(job_id)`` or after
    ``stop_after_seconds`` (for tests and demos). What it remembers (files emitted, files
    waiting to be stable) is its restriction, so it survives the runner's checkpoints; a
    restarted job starts a new watch.
    """

    def __init__(
        self,
        pattern: str,
        poll_interval_seconds: float = 1.0,
        job_id: str | None = None,
        stop_after_seconds: float | None = None,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    ) -> None:
        super().__init__()
        if not poll_interval_seconds > 0:
            raise ValueError(f"poll_interval_seconds must be positive, got {poll_interval_seconds}")
        if not settle_seconds >= 0:
            raise ValueError(f"settle_seconds must not be negative, got {settle_seconds}")
        self._fn = _WatchFn(
            pattern, poll_interval_seconds, job_id, stop_after_seconds, settle_seconds
        )

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return pbegin | "Impulse" >> beam.Impulse() | "Watch" >> beam.ParDo(self._fn)


def files_match(pattern: str) -> bool:
    """Whether any file matches `pattern` now (a file system that cannot be listed: no)."""
    try:
        (result,) = FileSystems.match([pattern])
    except BeamIOError:
        return False
    return bool(result.metadata_list)


class ReadFiles(beam.PTransform):
    """PBegin -> the paths of the files matching ``pattern`` (bounded).

    The pattern is matched once when the pipeline is built, so that a glob matching nothing
    fails at once with a message naming it.
    """

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        if not files_match(self._pattern):
            raise ValueError(f"no files match {self._pattern!r}")
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self._pattern)
            | "Paths" >> beam.Map(lambda metadata: metadata.path)
        )


def read_files(
    pattern: str,
    *,
    streaming: bool,
    job_id: str | None = None,
    poll_interval_seconds: float = 1.0,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
) -> beam.PTransform:
    """:class:`WatchFiles` when streaming, else :class:`ReadFiles`."""
    if streaming:
        return WatchFiles(
            pattern,
            poll_interval_seconds=poll_interval_seconds,
            job_id=job_id,
            settle_seconds=settle_seconds,
        )
    return ReadFiles(pattern)


# --- Kafka and source specs -----------------------------------------------------------------


def _split_kafka_spec(spec: str) -> tuple[str, str]:
    bootstrap, _, topic = spec.rpartition("/")
    if not bootstrap or any(c.isspace() for c in bootstrap) or not _KAFKA_TOPIC.match(topic):
        raise ValueError(
            f"Kafka source {spec!r} must be BOOTSTRAP/TOPIC, e.g. 'localhost:9092/aevb-examples' "
            "(BOOTSTRAP: host:port[,host:port...]; TOPIC: letters, digits, '.', '_', '-')"
        )
    return bootstrap, topic


def kafka_source(
    spec: str, *, max_examples: int | None = None, expansion_service: str | None = None
) -> beam.PTransform:
    """``ReadFromKafka`` for ``"BOOTSTRAP/TOPIC"``, emitting ``(key_bytes, value_bytes)``.

    Consumer group ``aevb-stream``, reading from the earliest offset when the group has
    none, so a restarted job goes on from where the last one committed. ``max_examples``
    caps the records read (one record is one example) and makes the read bounded: Beam
    passes the records on once it has read them all, and commits their offsets as the
    bundles are finalized. Unbounded, records flow as they come, and the consumer commits
    the offsets it has read every 5 s (Kafka's auto-commit): a crash may lose up to that
    many seconds of messages read but not yet trained. This is a cross-language transform:
    building the object works anywhere, but applying it to a pipeline expands it in Beam's
    Java expansion service, and running it
    needs a portable runner (Prism, Flink). ``expansion_service`` is that service: a jar
    (Beam's shaded one, or the one `make services` assembles), or the HOST:PORT of a running
    one; by default Beam downloads the jar of its own version from Maven Central. Decode the
    records with :class:`pipeline.ingest.decode.DecodeRecords`.

    Raises:
        ValueError: ``spec`` is not BOOTSTRAP/TOPIC.
    """
    from apache_beam.io.kafka import ReadFromKafka
    from apache_beam.transforms.external import JavaJarExpansionService

    bootstrap, topic = _split_kafka_spec(spec)
    service: Any = expansion_service
    if expansion_service is not None and expansion_service.endswith(".jar"):
        service = JavaJarExpansionService(expansion_service)
    consumer_config = {
        "bootstrap.servers": bootstrap,
        "group.id": "aevb-stream",
        "auto.offset.reset": "earliest",
    }
    bounded = max_examples is not None
    if not bounded:
        # KafkaIO's commit at finalization needs a runner with stable input, which Prism
        # refuses ("doesn't support ... beam:requirement:pardo:stable_input:v1", Beam 2.77);
        # the consumer commits what it has read every 5 s instead.
        consumer_config["enable.auto.commit"] = "true"
    return ReadFromKafka(
        consumer_config=consumer_config,
        topics=[topic],
        with_metadata=False,
        max_num_records=max_examples,
        commit_offset_in_finalize=bounded,
        # Event time is when the producer created the message: the records' event_time,
        # and the event_lag_seconds of progress lines, measure produce-to-update latency.
        timestamp_policy=ReadFromKafka.create_time_policy,
        expansion_service=service,
    )


def parse_source(spec: str) -> tuple[str, str | None]:
    """``"dataset"``, ``"files:GLOB"`` or ``"kafka:BOOTSTRAP/TOPIC"`` -> (kind, argument).

    Raises:
        ValueError: any other form, an empty glob or a malformed Kafka spec.
    """
    kind, sep, argument = spec.partition(":")
    if spec == "dataset":
        return "dataset", None
    if sep and kind == "files" and argument:
        return "files", argument
    if sep and kind == "kafka":
        _split_kafka_spec(argument)
        return "kafka", argument
    raise ValueError(f"source {spec!r} must be one of: {', '.join(SOURCE_FORMS)}")
