"""Tests for pipeline.train.trainer's TrainVAE inside real Beam pipelines driven by TestStream.

TestStream runs on Beam's BundleBasedDirectRunner only (``--streaming``). Its processing
time starts at 0, so the trainer gets a fixed clock (``FixedClock``): a partial minibatch's
flush timer, set at ``clock() + max_batch_wait_seconds``, then fires exactly when the test
advances processing time past ``max_batch_wait_seconds``.

The runner executes the pipeline in this process, so the records are collected by a
module-level DoFn (Beam pickles it by reference) into ``_collected``, and the expected
numbers come from a plain ``vae.Trainer`` fed the minibatches the test expects: same
config, same seed, same minibatches in the same order give bit-identical results.
"""

import logging
import pathlib
import threading
import uuid

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream as BeamTestStream

import vae
from pipeline.train import trainer as trainer_module
from pipeline.train.checkpoints import CheckpointStore
from pipeline.train.records import TrainingRecord
from pipeline.train.session import Cadence
from pipeline.train.trainer import TrainVAE
from vae.snapshot_format import read_metadata, version_directories

D = 8
CONFIG = vae.VAEConfig(input_dim=D, latent_dim=2, hidden_dim=8, batch_size=4, seed=3)
WAIT = 5.0  # max_batch_wait_seconds


class FixedClock:
    """The trainer's clock under TestStream: a constant (picklable: module level)."""

    def __call__(self) -> float:
        return 0.0


def _stand_in_save(model: vae.VAE, directory, graph_dir=None) -> None:
    """Replaces the SavedModel export (seconds for a configuration's first snapshot): these
    tests are about when snapshots happen and what their metadata says;
    tests/test_snapshots.py and tests/test_export.py load real ones, tests/test_job.py too."""
    (pathlib.Path(directory) / "saved_model.pb").write_bytes(b"stand-in")


@pytest.fixture(autouse=True)
def stand_in_export(monkeypatch: pytest.MonkeyPatch) -> None:
    # The BundleBasedDirectRunner runs the trainer in this process: the patch applies.
    monkeypatch.setattr(vae, "save", _stand_in_save)


_lock = threading.Lock()
_collected: dict[str, list[TrainingRecord]] = {}


class _Collect(beam.DoFn):
    def __init__(self, tag: str) -> None:
        self._tag = tag

    def process(self, record: TrainingRecord):
        with _lock:
            _collected.setdefault(self._tag, []).append(record)


def _rows(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, D)) > 0.5).astype(np.float32)


def _run(
    events: BeamTestStream,
    run_dir: pathlib.Path,
    cadence: Cadence = Cadence(log_every_steps=1),
    max_models_in_memory: int | None = None,
) -> list[TrainingRecord]:
    """Runs events -> TrainVAE on the TestStream runner; the records by (key, step)."""
    tag = uuid.uuid4().hex
    options = PipelineOptions(["--runner=BundleBasedDirectRunner", "--streaming"])
    try:
        with beam.Pipeline(options=options) as pipeline:
            _ = (
                pipeline
                | events
                | TrainVAE(
                    CONFIG,
                    str(run_dir),
                    cadence=cadence,
                    max_batch_wait_seconds=WAIT,
                    clock=FixedClock(),
                    max_models_in_memory=max_models_in_memory,
                )
                | beam.ParDo(_Collect(tag))
            )
        return sorted(_collected.get(tag, []), key=lambda r: (r.key, r.step))
    finally:
        _collected.pop(tag, None)


def _stream(*chunks: np.ndarray | tuple[str, np.ndarray]) -> BeamTestStream:
    """A TestStream adding each chunk (one element each) in turn, then ending the input."""
    events = BeamTestStream()
    for index, chunk in enumerate(chunks):
        events = events.add_elements([beam.window.TimestampedValue(chunk, 10 + index)])
    return events.advance_watermark_to_infinity()


def _reference(batches: list[np.ndarray]) -> tuple[list[np.ndarray], vae.Trainer]:
    """Per-example bounds of a plain trainer fed exactly these minibatches, and the trainer."""
    reference = vae.Trainer(CONFIG)
    return [reference.train_step(batch).elbo for batch in batches], reference


def _state(trainer: vae.Trainer) -> list[np.ndarray]:
    """The whole training state: parameters, Adagrad accumulators, counters, RNG."""
    return [v.numpy().copy() for v in trainer.variables] + [trainer.rng.state.numpy().copy()]


def _checkpointed_state(run_dir: pathlib.Path, key: str) -> list[np.ndarray]:
    restored = vae.Trainer(CONFIG)
    assert CheckpointStore(run_dir / "checkpoints" / key, restored).restore()
    return _state(restored)


def _assert_same_state(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _assert_bounds(records: list[TrainingRecord], expected: list[np.ndarray]) -> None:
    assert len(records) == len(expected)
    for record, bounds in zip(records, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(record.elbo_per_example, np.float32), bounds)


def _snapshots(run_dir: pathlib.Path, key: str = "default") -> list[dict]:
    return [read_metadata(v) for v in version_directories(run_dir / "snapshots" / key)]


def _live(run_dir: pathlib.Path) -> list[str]:
    """Keys of run_dir whose model is still open in this process."""
    with trainer_module._live_lock:
        return [key for (d, key) in trainer_module._live_sessions if d == str(run_dir)]


# --- minibatching ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_chunks_are_cut_into_minibatches_of_m_and_the_last_partial(tmp_path) -> None:
    rows = _rows(15, seed=0)
    records = _run(_stream(rows[0:6], rows[6:7], rows[7:12], rows[12:15]), tmp_path)

    assert [r.batch_size for r in records] == [4, 4, 4, 3]
    assert [r.examples_seen for r in records] == [4, 8, 12, 15]
    assert [r.step for r in records] == [1, 2, 3, 4]
    assert all(r.applied and r.key == "default" for r in records)
    # The minibatches are the rows in arrival order, cut every 4 across chunk boundaries:
    # the bounds equal those of a plain trainer fed exactly those minibatches.
    expected, reference = _reference([rows[0:4], rows[4:8], rows[8:12], rows[12:15]])
    _assert_bounds(records, expected)
    # The input ended: the model was closed with a final checkpoint and snapshot.
    assert _live(tmp_path) == []
    _assert_same_state(_checkpointed_state(tmp_path, "default"), _state(reference))
    assert [m["examples_seen"] for m in _snapshots(tmp_path)] == [15]


@pytest.mark.timeout(120)
def test_a_partial_minibatch_trains_once_the_wait_is_over_and_not_before(tmp_path) -> None:
    rows = _rows(11, seed=1)
    events = (
        BeamTestStream()
        .add_elements([beam.window.TimestampedValue(rows[0:3], 10)])
        # 3 rows wait since processing time 0; at WAIT - 1 their timer has not fired...
        .advance_processing_time(WAIT - 1)
        # ... so this row completes a minibatch with them.
        .add_elements([beam.window.TimestampedValue(rows[3:4], 11)])
        # 2 rows start a new partial minibatch (clock() is 0: its timer is due at WAIT).
        .add_elements([beam.window.TimestampedValue(rows[4:6], 12)])
        .advance_processing_time(0.5)  # WAIT - 0.5: not yet
        .add_elements([beam.window.TimestampedValue(rows[6:7], 13)])  # pending: 3 rows
        .advance_processing_time(1.5)  # WAIT + 1: the 3 pending rows train now
        .add_elements([beam.window.TimestampedValue(rows[7:11], 14)])
        .advance_watermark_to_infinity()
    )
    records = _run(events, tmp_path)

    # Had the timer fired early, the sizes would be [3, 4, ...] or [4, 2, 4, 1].
    assert [r.batch_size for r in records] == [4, 3, 4]
    assert [r.examples_seen for r in records] == [4, 7, 11]
    expected, _ = _reference([rows[0:4], rows[4:7], rows[7:11]])
    _assert_bounds(records, expected)
    # The partial minibatch was trained by the processing-time timer (its clock, 0).
    assert records[1].event_time == 0.0
    assert records[2].event_time == 14.0


# --- keys -----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_two_keys_train_independently(tmp_path) -> None:
    a, b = _rows(12, seed=2), _rows(10, seed=3)
    both = tmp_path / "both"
    records = _run(
        _stream(("A", a[0:5]), ("B", b[0:4]), ("A", a[5:12]), ("B", b[4:10])),
        both,
    )
    by_key = {key: [r for r in records if r.key == key] for key in ("A", "B")}
    assert [r.examples_seen for r in by_key["A"]] == [4, 8, 12]
    assert [r.examples_seen for r in by_key["B"]] == [4, 8, 10]
    assert [r.step for r in by_key["B"]] == [1, 2, 3]

    for key, seen in (("A", 12), ("B", 10)):
        assert (both / "checkpoints" / key / "state.json").exists()
        assert [(m["key"], m["examples_seen"]) for m in _snapshots(both, key)] == [(key, seen)]
    assert not (both / "checkpoints" / "default").exists()

    # B alone, on the same chunks: training A beside it changed nothing of B's model.
    alone = tmp_path / "alone"
    records_alone = _run(_stream(("B", b[0:4]), ("B", b[4:10])), alone)
    _assert_same_state(_checkpointed_state(both, "B"), _checkpointed_state(alone, "B"))
    _assert_bounds(by_key["B"], [np.asarray(r.elbo_per_example) for r in records_alone])
    # ... and A's model is a different one.
    a_params = _checkpointed_state(both, "A")[0]
    assert not np.array_equal(a_params, _checkpointed_state(both, "B")[0])


@pytest.mark.timeout(240)
def test_at_most_n_models_in_memory_evicts_and_restores_exactly(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c = _rows(12, seed=2), _rows(10, seed=3), _rows(9, seed=5)

    def events() -> BeamTestStream:
        return _stream(
            ("A", a[0:5]), ("B", b[0:4]), ("C", c[0:6]), ("A", a[5:12]), ("B", b[4:10]),
            ("C", c[6:9]),
        )  # fmt: skip

    with caplog.at_level(logging.INFO, logger="pipeline.train.checkpoints"):
        bounded = _run(events(), tmp_path / "bounded", max_models_in_memory=1)
    # One model at a time: each key came back from its checkpoint when its next chunk came.
    restored = [r.message for r in caplog.records if r.message.startswith("restored")]
    assert {message.split("/checkpoints/")[1].split("/")[0] for message in restored} == {
        "A",
        "B",
        "C",
    }
    # Each eviction snapshotted what the key had learned, and the end of the input the rest.
    reasons = {m["reason"] for key in "ABC" for m in _snapshots(tmp_path / "bounded", key)}
    assert "evicted" in reasons
    for key, total in (("A", 12), ("B", 10), ("C", 9)):
        assert _snapshots(tmp_path / "bounded", key)[-1]["examples_seen"] == total
    free = _run(events(), tmp_path / "free")
    for key in ("A", "B", "C"):
        _assert_same_state(
            _checkpointed_state(tmp_path / "bounded", key),
            _checkpointed_state(tmp_path / "free", key),
        )
        _assert_bounds(
            [r for r in bounded if r.key == key],
            [np.asarray(r.elbo_per_example) for r in free if r.key == key],
        )


# --- snapshots and resume -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_snapshots_every_n_examples(tmp_path) -> None:
    rows = _rows(20, seed=4)
    cadence = Cadence(log_every_steps=1, snapshot_every_examples=8)
    records = _run(_stream(rows[0:6], rows[6:12], rows[12:20]), tmp_path, cadence)
    assert [r.examples_seen for r in records] == [4, 8, 12, 16, 20]

    snapshots = _snapshots(tmp_path)
    # One version each time 8 more examples were seen, and the end of the input.
    assert [m["version"] for m in snapshots] == [1, 2, 3]
    assert [m["examples_seen"] for m in snapshots] == [8, 16, 20]
    assert [m["step"] for m in snapshots] == [2, 4, 5]
    assert [m["reason"] for m in snapshots] == ["every examples", "every examples", "end of run"]
    by_examples = {r.examples_seen: r for r in records}
    for metadata in snapshots:
        assert metadata["key"] == "default" and metadata["input_shape"] == [None, D]
        assert metadata["elbo_at_export"] == by_examples[metadata["examples_seen"]].elbo


@pytest.mark.timeout(180)
def test_a_restarted_pipeline_continues_exactly_where_the_first_one_stopped(tmp_path) -> None:
    rows = _rows(16, seed=5)
    first_part = (rows[0:6], rows[6:8])
    second_part = (rows[8:11], rows[11:16])
    run = tmp_path / "restarted"

    first = _run(_stream(*first_part), run)
    assert [(r.step, r.examples_seen) for r in first] == [(1, 4), (2, 8)]
    # The model was closed: the second pipeline starts from the checkpoint on disk.
    assert _live(run) == []
    second = _run(_stream(*second_part), run)
    assert [(r.step, r.examples_seen) for r in second] == [(3, 12), (4, 16)]

    once = tmp_path / "uninterrupted"
    uninterrupted = _run(_stream(*first_part, *second_part), once)
    # Parameters, Adagrad accumulators, counters and the RNG state were restored exactly,
    # so the restarted run measured and learned exactly what one run does.
    _assert_bounds(first + second, [np.asarray(r.elbo_per_example) for r in uninterrupted])
    assert [r.elbo for r in first + second] == [r.elbo for r in uninterrupted]
    _assert_same_state(_checkpointed_state(run, "default"), _checkpointed_state(once, "default"))
    assert [m["examples_seen"] for m in _snapshots(run)] == [8, 16]
