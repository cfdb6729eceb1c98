"""Tests for pipeline.ingest.sources: data-set replay, file reading and watching, Kafka, specs."""

import itertools
import os
import pathlib
import re
import threading
import time
import uuid

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.coders import RowCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import external_transforms_pb2
from apache_beam.testing.util import assert_that, equal_to

from pipeline.ingest import lifecycle, sources
from pipeline.ingest.datasets import Dataset
from pipeline.ingest.decode import DEAD_LETTER_TAG, DecodeFiles, KeyedChunk
from pipeline.ingest.replay import Pacer, ReplayPlan, replay_chunks
from pipeline.ingest.sources import (
    ReadFiles,
    ReplayDataset,
    WatchFiles,
    kafka_source,
    parse_source,
    read_files,
)

N = 23  # not a multiple of the chunk sizes below: passes end in short chunks


def _data(n: int = N) -> np.ndarray:
    # Row i is (i, -i): the first column names the example.
    ids = np.arange(n, dtype=np.float32)
    return np.stack([ids, -ids], axis=1)


def _options(streaming: bool = False) -> PipelineOptions:
    return PipelineOptions(["--runner=FnApiRunner", *(["--streaming"] if streaming else [])])


# Outputs of pipelines that run in this process (FnApiRunner), in arrival order. Collected
# by module-level DoFn classes: Beam pickles those by reference (a closure would be pickled
# by value, with copies of these dicts), so they append to the lists here.
_lock = threading.Lock()
_collected: dict[str, list] = {}
_stop_after: dict[str, int] = {}


class _Collect(beam.DoFn):
    """Appends (element, timestamp, arrival time); requests the stop after _stop_after[tag]."""

    def __init__(self, tag: str) -> None:
        self._tag = tag

    def process(self, element, timestamp=beam.DoFn.TimestampParam):
        with _lock:
            seen = _collected.setdefault(self._tag, [])
            seen.append((element, float(timestamp), time.monotonic()))
            if len(seen) == _stop_after.get(self._tag):
                lifecycle.request_stop(self._tag)


class _CollectRows(beam.DoFn):
    """Appends the (key, row as list) of each row of a (key, chunk) element."""

    def __init__(self, tag: str) -> None:
        self._tag = tag

    def process(self, element):
        # The replay emits (key, chunk); decoding emits KeyedChunks.
        key, chunk = (element.key, element.rows) if isinstance(element, KeyedChunk) else element
        with _lock:
            _collected.setdefault(self._tag, []).extend((key, row) for row in chunk.tolist())


def _collected_chunks(tag: str) -> list[np.ndarray]:
    return [element[1] for element, _, _ in _collected.get(tag, [])]


@pytest.fixture
def job() -> str:
    """A unique job id (also the collection tag), cleaned up afterwards."""
    job_id = f"test-{uuid.uuid4().hex}"
    yield job_id
    lifecycle.clear(job_id)
    _collected.pop(job_id, None)
    _stop_after.pop(job_id, None)


def _run_replay(job_id: str, streaming: bool = False, dataset: str = "synthetic", **kwargs) -> None:
    with beam.Pipeline(options=_options(streaming)) as pipeline:
        _ = (
            pipeline
            | ReplayDataset(dataset, job_id=job_id, streaming=streaming, **kwargs)
            | beam.ParDo(_Collect(job_id))
        )


def _sequential_replay(data, chunk_size, max_examples=None, epochs=None, seed=0, skip=0):
    """The replay order written the plain way, pass after pass: what `ReplayPlan` addresses
    at random (and `replay_chunks` walks) must equal it."""
    rng = np.random.default_rng(seed)
    limit = max_examples
    if epochs is not None:
        limit = min(limit, epochs * len(data)) if limit is not None else epochs * len(data)
    position = 0
    while limit is None or position < limit:
        order = rng.permutation(len(data))
        for start in range(0, len(data), chunk_size):
            end = min(start + chunk_size, len(data))
            if limit is not None:
                end = min(end, start + limit - position)
            count = end - start
            if count <= 0:
                return
            if position + count > skip:
                yield data[order[start + max(0, skip - position) : end]]
            position += count
            if limit is not None and position >= limit:
                return


def _assert_same_chunks(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert [len(c) for c in actual] == [len(c) for c in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


# --- Chunk addressing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "max_examples", "epochs", "skip"),
    [
        (5, None, 3, 0),
        (5, 50, None, 0),
        (4, 61, 2, 7),  # epochs limit first, skip inside the first chunk
        (5, None, 4, 23),  # skip to a pass boundary
        (5, None, 4, 24),
        (1, 30, None, 29),
        (23, None, 3, 46),
        (100, 40, None, 3),
        (5, 20, None, 20),  # skip everything
        (5, 0, None, 0),
    ],
)
def test_replay_plan_and_replay_chunks_follow_the_sequential_order(
    chunk_size: int, max_examples: int | None, epochs: int | None, skip: int
) -> None:
    data = _data()
    expected = list(_sequential_replay(data, chunk_size, max_examples, epochs, seed=5, skip=skip))
    walked = list(replay_chunks(data, chunk_size, max_examples, epochs, seed=5, skip=skip))
    _assert_same_chunks(walked, expected)
    plan = ReplayPlan(N, chunk_size, max_examples, epochs, seed=5, skip=skip)
    assert plan.n_chunks == len(expected)
    _assert_same_chunks([plan.chunk(data, i) for i in range(len(expected))], expected)
    # Random access (a resumed restriction) gives the same chunks as sequential access.
    for i in reversed(range(len(expected))):
        np.testing.assert_array_equal(plan.chunk(data, i), expected[i])


def test_unbounded_plan_matches_the_unbounded_generator() -> None:
    data = _data()
    plan = ReplayPlan(N, 6, None, None, seed=1, skip=3)
    assert plan.n_chunks is None
    expected = list(itertools.islice(_sequential_replay(data, 6, seed=1, skip=3), 40))
    _assert_same_chunks([plan.chunk(data, i) for i in range(40)], expected)
    _assert_same_chunks(
        list(itertools.islice(replay_chunks(data, 6, seed=1, skip=3), 40)), expected
    )


# --- ReplayDataset --------------------------------------------------------------------------


def test_replay_pipeline_emits_exactly_the_replay_chunks(job: str) -> None:
    data = _data()
    _run_replay(job, data=data, chunk_size=5, max_examples=61, seed=3, skip=2, model_key="m")
    expected = list(replay_chunks(data, 5, 61, seed=3, skip=2))
    _assert_same_chunks(_collected_chunks(job), expected)
    assert {element[0] for element, _, _ in _collected[job]} == {"m"}


def test_replay_loads_the_named_data_set_once(job: str, monkeypatch) -> None:
    calls = []

    def fake_load_dataset(name, data_dir=None, *, fallback=None):
        calls.append((name, data_dir, fallback))
        return Dataset("fake", _data(), _data(2), None, None, (1, 2), "gaussian", "test")

    monkeypatch.setattr(sources, "load_dataset", fake_load_dataset)
    sources._load_train.cache_clear()
    try:
        _run_replay(
            job, dataset="mnist", data_dir="/data", fallback="mnist-5k", chunk_size=10, epochs=2
        )
    finally:
        sources._load_train.cache_clear()
    # Loaded once per process: the restriction provider and the DoFn share the copy.
    assert calls == [("mnist", "/data", "mnist-5k")]
    _assert_same_chunks(_collected_chunks(job), list(replay_chunks(_data(), 10, epochs=2)))


@pytest.mark.timeout(60)
def test_streaming_replay_with_a_limit_checkpoints_and_terminates(job: str) -> None:
    data = _data()
    before = time.time()
    # 34 chunks: more than are emitted between two checkpoints.
    _run_replay(job, streaming=True, data=data, chunk_size=3, max_examples=100, seed=9)
    after = time.time()
    expected = list(replay_chunks(data, 3, 100, seed=9))
    assert len(expected) > sources._CHUNKS_PER_CHECKPOINT
    _assert_same_chunks(_collected_chunks(job), expected)
    # Elements carry the wall-clock time they were read.
    assert all(before <= timestamp <= after for _, timestamp, _ in _collected[job])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("streaming", [False, True])
def test_stop_request_ends_an_unbounded_replay(job: str, streaming: bool) -> None:
    _stop_after[job] = 7  # the collector requests the stop when the 7th chunk arrives
    _run_replay(job, streaming=streaming, data=_data(), chunk_size=4, seed=2)
    expected = list(itertools.islice(replay_chunks(_data(), 4, seed=2), 7))
    _assert_same_chunks(_collected_chunks(job), expected)


def test_pacer_keeps_the_long_run_rate_and_limits_catch_up_bursts() -> None:
    now = [0.0]
    pacer = Pacer(10.0, clock=lambda: now[0])
    assert pacer.wait_seconds() == 0
    pacer.sent(5)
    assert pacer.wait_seconds() == pytest.approx(0.5)
    now[0] = 0.5
    assert pacer.wait_seconds() == 0
    # After a 10 s stall only one second's worth (10 examples) may go out at once.
    now[0] = 10.5
    assert pacer.wait_seconds() == 0
    pacer.sent(20)
    assert pacer.wait_seconds() == pytest.approx(1.0)


@pytest.mark.timeout(60)
def test_rate_limited_replay_honours_examples_per_second(job: str) -> None:
    rate, total, chunk = 1000.0, 1000, 50
    _run_replay(job, data=_data(), chunk_size=chunk, max_examples=total, examples_per_second=rate)
    arrivals = [arrival for _, _, arrival in _collected[job]]
    assert len(arrivals) == len(list(replay_chunks(_data(), chunk, total)))
    # The first chunk goes out at once, the last when the examples before it are due.
    sizes = [len(c) for c in _collected_chunks(job)]
    due = (total - sizes[-1]) / rate
    span = arrivals[-1] - arrivals[0]
    assert 0.9 * due <= span <= due + 3.0


@pytest.mark.timeout(60)
def test_stop_request_interrupts_a_rate_limited_wait(job: str) -> None:
    _stop_after[job] = 1
    start = time.monotonic()
    # The second chunk is due 10 s after the first; the stop must not wait for it.
    _run_replay(job, data=_data(), chunk_size=10, examples_per_second=1.0)
    assert len(_collected[job]) == 1
    assert time.monotonic() - start < 5.0


def test_replay_argument_errors() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        ReplayDataset("mnist", chunk_size=0)
    with pytest.raises(ValueError, match="examples_per_second"):
        ReplayDataset("mnist", examples_per_second=0)
    with pytest.raises(ValueError, match="skip"):
        ReplayDataset("mnist", skip=-1)
    with pytest.raises(ValueError, match="non-empty"):
        ReplayDataset("mnist", data=np.zeros((0, 3)))


# --- WatchFiles -----------------------------------------------------------------------------


def test_watch_state_emits_files_once_their_size_is_stable() -> None:
    state = sources._WatchState(next_poll=0.0, deadline=None)
    state, ready = state.poll({"a": (10, 0.5, 1), "empty": (0, 0.5, 2)}, now=0.0, interval=1.0)
    assert ready == [] and state.next_poll == 1.0
    state, ready = state.poll({"a": (20, 1.0, 1), "empty": (0, 0.5, 2)}, now=1.0, interval=1.0)
    assert ready == []  # still growing
    state, ready = state.poll({"a": (20, 1.0, 1), "b": (5, 1.5, 3)}, now=2.0, interval=1.0)
    assert ready == ["a"]
    state, ready = state.poll({"a": (20, 1.0, 1), "b": (5, 1.5, 3)}, now=3.0, interval=1.0)
    assert ready == ["b"]
    state, ready = state.poll({"a": (20, 1.0, 1), "b": (5, 1.5, 3)}, now=4.0, interval=1.0)
    assert ready == [] and state.pending == ()
    assert state.emitted == {("a", (20, 1.0, 1)), ("b", (5, 1.5, 3))}
    # A file that disappears is forgotten; if it comes back, it is a new file.
    state, _ = state.poll({"b": (5, 1.5, 3)}, now=5.0, interval=1.0)
    assert state.emitted == {("b", (5, 1.5, 3))}


def test_watch_state_reads_new_content_under_a_name_already_read() -> None:
    # Content renamed over a name that was read has another inode (and mtime): it is new.
    state = sources._WatchState(next_poll=0.0, deadline=None)
    for now in (0.0, 1.0):
        state, ready = state.poll({"a": (8, 0.0, 1)}, now=now, interval=1.0)
    assert ready == ["a"]
    for now, expected in ((2.0, []), (3.0, ["a"]), (4.0, [])):
        state, ready = state.poll({"a": (8, 1.5, 2)}, now=now, interval=1.0)
        assert ready == expected, now


def test_watch_state_waits_until_a_file_settled() -> None:
    # A writer that pauses longer than a poll: the size is the same twice, but the file was
    # modified less than settle_seconds ago, so it is not read half-written.
    state = sources._WatchState(next_poll=0.0, deadline=None)
    half = {"a": (100, 10.0, 1)}
    for now in (10.5, 11.5, 12.5):
        state, ready = state.poll(half, now=now, interval=1.0, settle_seconds=5.0)
        assert ready == []
    whole = {"a": (200, 13.0, 1)}
    for now in (13.5, 14.5, 17.5):
        state, ready = state.poll(whole, now=now, interval=1.0, settle_seconds=5.0)
        assert ready == []
    state, ready = state.poll(whole, now=18.0, interval=1.0, settle_seconds=5.0)
    assert ready == ["a"]


def test_watch_tracker_checkpoints_carry_the_state() -> None:
    first = sources._WatchState(next_poll=0.0, deadline=None)
    tracker = sources._WatchTracker(first)
    with pytest.raises(ValueError, match="without finishing"):
        tracker.check_done()
    polled = sources._WatchState(next_poll=1.0, deadline=None, emitted=frozenset({"a"}))
    assert tracker.try_claim(polled)
    assert tracker.try_split(0.5) is None  # a watch cannot be divided
    primary, residual = tracker.try_split(0)
    assert primary.done and residual == polled
    tracker.check_done()
    assert not tracker.try_claim(polled)  # nothing more after a checkpoint


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


@pytest.mark.timeout(120)
def test_watch_files_streams_new_files_once_and_stops_on_request(
    job: str, tmp_path: pathlib.Path
) -> None:
    watched = tmp_path / "in"
    watched.mkdir()
    letters_tag = job + "-letters"
    rows = lambda: list(_collected.get(job, []))  # noqa: E731
    failures: list[BaseException] = []

    def feed() -> None:
        try:
            (watched / "a.csv").write_text("0,0,0,0\n0,0,0,1\n0,0,1,0\n")
            _wait_for(lambda: len(rows()) >= 3)
            # New content renamed over a name already read is read: write, then rename.
            staged = tmp_path / "a.csv.partial"
            staged.write_text("1,1,1,1\n")
            os.replace(staged, watched / "a.csv")
            (watched / "b.npy").write_bytes(b"\x93NUMPY truncated")
            (watched / "c.jsonl").write_text('{"x": [1, 0, 0, 0], "key": "c"}\n[0, 1, 1, 1]\n')
            _wait_for(lambda: len(rows()) >= 6 and len(_collected.get(letters_tag, [])) >= 1)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            lifecycle.request_stop(job)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        with beam.Pipeline(options=_options(streaming=True)) as pipeline:
            outputs = (
                pipeline
                | WatchFiles(
                    str(watched / "*"),
                    poll_interval_seconds=0.05,
                    job_id=job,
                    stop_after_seconds=90,
                    settle_seconds=0.2,
                )
                | beam.ParDo(DecodeFiles(4, "bernoulli")).with_outputs(
                    DEAD_LETTER_TAG, main="chunks"
                )
            )
            _ = outputs.chunks | beam.ParDo(_CollectRows(job))
            _ = outputs[DEAD_LETTER_TAG] | beam.ParDo(_Collect(letters_tag))
    finally:
        feeder.join(timeout=60)
        letters = _collected.pop(letters_tag, [])
    assert not failures, failures
    assert sorted(rows()) == sorted(
        [
            ("default", [0, 0, 0, 0]),
            ("default", [0, 0, 0, 1]),
            ("default", [0, 0, 1, 0]),
            ("default", [1, 1, 1, 1]),
            ("c", [1, 0, 0, 0]),
            ("default", [0, 1, 1, 1]),
        ]
    )
    assert [(x.source, x.reason) for x, _, _ in letters] == [
        (str(watched / "b.npy"), "unparseable_file")
    ]


@pytest.mark.timeout(60)
def test_watch_files_ends_after_stop_after_seconds(tmp_path: pathlib.Path) -> None:
    start = time.monotonic()
    with beam.Pipeline(options=_options(streaming=True)) as pipeline:
        paths = pipeline | WatchFiles(
            str(tmp_path / "*.csv"), poll_interval_seconds=0.05, stop_after_seconds=0.3
        )
        assert_that(paths, equal_to([]))
    assert time.monotonic() - start >= 0.3


# --- ReadFiles, read_files ------------------------------------------------------------------


def test_read_files_emits_every_matching_path(tmp_path: pathlib.Path) -> None:
    for name in ("a.csv", "b.csv", "c.txt"):
        (tmp_path / name).write_text("1\n")
    with beam.Pipeline(options=_options()) as pipeline:
        paths = pipeline | ReadFiles(str(tmp_path / "*.csv"))
        assert_that(paths, equal_to([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]))


def test_read_files_with_an_empty_glob_names_it(tmp_path: pathlib.Path) -> None:
    pattern = str(tmp_path / "nothing-*.npy")
    pipeline = beam.Pipeline(options=_options())
    with pytest.raises(ValueError, match=re.escape(f"no files match '{pattern}'")):
        _ = pipeline | ReadFiles(pattern)


def test_read_files_picks_watch_or_read() -> None:
    assert isinstance(read_files("/x/*", streaming=True, job_id="j"), WatchFiles)
    assert isinstance(read_files("/x/*", streaming=False), ReadFiles)


# --- Specs and Kafka ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("dataset", ("dataset", None)),
        ("files:/data/*.npy", ("files", "/data/*.npy")),
        ("files:gs://bucket/a:b/*.csv", ("files", "gs://bucket/a:b/*.csv")),
        ("kafka:localhost:9092/aevb-examples", ("kafka", "localhost:9092/aevb-examples")),
        ("kafka:h1:9092,h2:9092/t.x_y-1", ("kafka", "h1:9092,h2:9092/t.x_y-1")),
    ],
)
def test_parse_source_forms(spec: str, parsed: tuple) -> None:
    assert parse_source(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist", "must be one of: dataset, files:GLOB, kafka:BOOTSTRAP/TOPIC"),
        ("files:", "must be one of"),
        ("dataset:mnist", "must be one of"),
        ("kafka:localhost:9092", "BOOTSTRAP/TOPIC"),
        ("kafka:/topic", "BOOTSTRAP/TOPIC"),
        ("kafka:localhost:9092/bad topic", "BOOTSTRAP/TOPIC"),
    ],
)
def test_parse_source_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_source(spec)


def test_kafka_source_builds_read_from_kafka_offline() -> None:
    transform = kafka_source("broker-1:9092,broker-2:9092/aevb-examples", max_examples=500)
    payload = external_transforms_pb2.ExternalConfigurationPayload.FromString(transform._payload)
    config = RowCoder(payload.schema).decode(payload.payload)
    assert dict(config.consumer_config) == {
        "bootstrap.servers": "broker-1:9092,broker-2:9092",
        "group.id": "aevb-stream",
        "auto.offset.reset": "earliest",
    }
    assert list(config.topics) == ["aevb-examples"]
    assert config.max_num_records == 500
    assert transform._urn.endswith("kafka_read_without_metadata:v1")
    with pytest.raises(ValueError, match="BOOTSTRAP/TOPIC"):
        kafka_source("no-topic")
