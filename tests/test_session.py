"""Tests for pipeline.train.session (with its checkpoints and progress beneath it).

The trainers of one configuration share one XLA-compiled step (about a second to compile on
a small machine), so the tests use few configurations.
"""

import dataclasses
import io
import json
import pathlib

import numpy as np
import pytest

import vae
from pipeline.ingest.keys import validate_model_key
from pipeline.train.adaptation import DRIFT_STEP_BOOST, adaptation_fields
from pipeline.train.checkpoints import CONFIG_FILE, CheckpointStore, checkpoint_number
from pipeline.train.drift import DriftSettings
from pipeline.train.observers import SessionObserver
from pipeline.train.progress import ProgressLog, read_progress
from pipeline.train.records import TrainingRecord
from pipeline.train.session import Cadence, TrainingSession
from vae.optimizers import RESET_UPDATES, STEP_BOOST_HALF_LIFE_EXAMPLES
from vae.snapshot_format import read_metadata, version_directories

D = 8
CONFIG = vae.VAEConfig(input_dim=D, latent_dim=2, hidden_dim=8, batch_size=4, seed=5)


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaces the SavedModel export (`vae.save`) by a stand-in: these tests are about
    *when* snapshots happen (tests/test_snapshots.py loads real ones)."""

    def save(model: vae.VAE, directory, graph_dir=None) -> None:
        (pathlib.Path(directory) / "saved_model.pb").write_bytes(b"stand-in")

    monkeypatch.setattr(vae, "save", save)


def _batches(count: int, size: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, D)) > 0.5).astype(np.float32) for _ in range(count)]


def _session(run_dir, cadence: Cadence, **kwargs) -> TrainingSession:
    progress = ProgressLog(pathlib.Path(run_dir) / "progress.jsonl", stream=io.StringIO())
    return TrainingSession(run_dir, "default", CONFIG, cadence, progress, **kwargs)


def _checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    directory = run_dir / "checkpoints" / "default"
    if not directory.exists():
        return []
    return sorted(int(p.name[len("ckpt-") : -len(".npz")]) for p in directory.glob("ckpt-*.npz"))


def _weighted(records: list[TrainingRecord], field: str) -> float:
    applied = [r for r in records if r.applied]
    total = sum(r.batch_size for r in applied)
    return sum(getattr(r, field) * r.batch_size for r in applied) / total


def _strict_json(line: str) -> dict:
    def reject(constant: str) -> None:
        raise AssertionError(f"{constant} in progress.jsonl is not valid JSON")

    return json.loads(line, parse_constant=reject)


def test_checkpoint_cadence_and_resume_after_a_crash(tmp_path: pathlib.Path) -> None:
    session = _session(tmp_path, Cadence(log_every_steps=100, checkpoint_every_steps=2))
    batches = _batches(5)
    seen = []
    for batch in batches:
        session.train(batch)
        seen.append(_checkpoint_steps(tmp_path))
    # A checkpoint every 2 steps: none after step 1, ckpt-2 after step 2, ckpt-4 after step 4.
    assert seen == [[], [2], [2], [2, 4], [2, 4]]
    saved = json.loads((tmp_path / "checkpoints" / "default" / CONFIG_FILE).read_text())
    assert vae.VAEConfig.from_dict(saved) == CONFIG
    assert CheckpointStore.saved_config(tmp_path / "checkpoints" / "default") == CONFIG
    assert checkpoint_number(tmp_path, "default") == 4

    # The process dies here without close(): a new session resumes from the last checkpoint.
    resumed = _session(tmp_path, Cadence(log_every_steps=100, checkpoint_every_steps=2))
    assert resumed.resumed
    assert (resumed.trainer.step, resumed.examples_seen) == (4, 16)
    # ...with the parameters of step 4, not those of the lost step 5 or of a fresh model.
    replay = vae.Trainer(CONFIG)
    for batch in batches[:4]:
        replay.train_step(batch)
    for mine, expected in zip(
        resumed.trainer.model.trainable_variables, replay.model.trainable_variables, strict=True
    ):
        np.testing.assert_array_equal(mine.numpy(), expected.numpy())


class _Lifecycle(SessionObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_open(self, key, last_snapshot_unix, drift_thresholds=None, resumed=False):
        self.events.append(("open", key, resumed))

    def on_close(self, key, reason):
        self.events.append(("close", key, reason))


def test_observers_hear_opens_restores_and_closes(tmp_path: pathlib.Path, fake_save: None) -> None:
    observer = _Lifecycle()
    first = _session(tmp_path, Cadence(), observers=[observer])
    first.train(_batches(1)[0])
    first.close(reason="evicted")
    again = _session(tmp_path, Cadence(), observers=[observer])
    again.reopen()
    assert observer.events == [
        ("open", "default", False),
        ("close", "default", "evicted"),
        ("open", "default", True),  # restored from the checkpoint the close wrote
        ("open", "default", True),
    ]


def test_resume_is_exact(tmp_path: pathlib.Path, fake_save: None) -> None:
    batches = _batches(6, seed=1)
    cadence = Cadence(log_every_steps=2, checkpoint_every_steps=1000)

    first = _session(tmp_path / "interrupted", cadence)
    assert not first.resumed
    for batch in batches[:3]:
        first.train(batch)
    first.close()  # final checkpoint at step 3 (and a snapshot)
    assert _checkpoint_steps(tmp_path / "interrupted") == [3]

    second = _session(tmp_path / "interrupted", cadence)
    assert second.resumed
    assert (second.trainer.step, second.examples_seen) == (3, 12)
    resumed_records = [second.train(batch) for batch in batches[3:]]

    straight = _session(tmp_path / "straight", cadence)
    straight_records = [straight.train(batch) for batch in batches]

    # Same parameters, Adagrad accumulators and random generator state: the resumed steps
    # measure bit-identical bounds (the Monte Carlo sample differs on every step, so a
    # restored-but-reseeded generator would not pass this).
    for mine, expected in zip(resumed_records, straight_records[3:], strict=True):
        assert (mine.step, mine.examples_seen) == (expected.step, expected.examples_seen)
        assert mine.elbo == expected.elbo
        assert mine.reconstruction_log_likelihood == expected.reconstruction_log_likelihood
        assert mine.kl == expected.kl
        assert mine.elbo_per_example == expected.elbo_per_example
    assert [r.step for r in resumed_records] == [4, 5, 6]
    for mine, expected in zip(
        second.trainer.model.trainable_variables,
        straight.trainer.model.trainable_variables,
        strict=True,
    ):
        np.testing.assert_array_equal(mine.numpy(), expected.numpy())

    # The progress log of the interrupted run continues where it stopped.
    examples = [
        entry["examples"] for entry in read_progress(tmp_path / "interrupted" / "progress.jsonl")
    ]
    assert examples == [8, 12, 20]
    second.close()
    assert read_progress(tmp_path / "interrupted" / "progress.jsonl")[-1]["examples"] == 24
    assert [p.name for p in version_directories(tmp_path / "interrupted/snapshots/default")] == [
        "1",
        "2",
    ]

    # A session that resumes and trains nothing adds no checkpoint and no snapshot.
    idle = _session(tmp_path / "interrupted", cadence)
    assert idle.resumed and idle.examples_seen == 24
    newest = idle.close()
    assert newest == tmp_path / "interrupted" / "snapshots" / "default" / "2"
    assert read_metadata(newest)["examples_seen"] == 24
    assert len(version_directories(tmp_path / "interrupted/snapshots/default")) == 2
    assert _checkpoint_steps(tmp_path / "interrupted") == [3, 6]


def test_snapshots_every_n_examples(tmp_path: pathlib.Path, fake_save: None) -> None:
    session = _session(
        tmp_path, Cadence(log_every_steps=100, snapshot_every_examples=10, keep_snapshots=10)
    )
    model_dir = tmp_path / "snapshots" / "default"
    counts = []
    for batch in _batches(7):
        session.train(batch)
        counts.append(len(version_directories(model_dir)))
    # Batches of 4: due once 10 examples passed since the last snapshot, at 12 and at 24.
    assert counts == [0, 0, 1, 1, 1, 2, 2]
    documents = [read_metadata(path) for path in version_directories(model_dir)]
    assert [(d["version"], d["examples_seen"], d["step"]) for d in documents] == [
        (1, 12, 3),
        (2, 24, 6),
    ]
    assert {d["reason"] for d in documents} == {"every examples"}
    # close() exports what was learned since (28 examples) as version 3.
    assert session.close() == model_dir / "3"
    assert read_metadata(model_dir / "3")["examples_seen"] == 28


def test_snapshots_every_n_seconds_by_the_session_clock(
    tmp_path: pathlib.Path, fake_save: None
) -> None:
    clock = FakeClock(1000.0)
    session = _session(
        tmp_path, Cadence(log_every_steps=100, snapshot_every_seconds=60), clock=clock
    )
    model_dir = tmp_path / "snapshots" / "default"
    counts = []
    for now in (1030.0, 1059.5, 1060.0, 1119.0, 1120.0, 1120.5):
        clock.now = now
        record = session.train(_batches(1)[0])
        # Records are stamped by the same clock.
        assert record.processing_time == now and record.event_time == now
        counts.append(len(version_directories(model_dir)))
    # Due 60 s after the session started (t=1060) and 60 s after that snapshot (t=1120).
    assert counts == [0, 0, 1, 1, 2, 2]
    documents = [read_metadata(path) for path in version_directories(model_dir)]
    assert [(d["examples_seen"], d["reason"]) for d in documents] == [
        (12, "every seconds"),
        (20, "every seconds"),
    ]
    # An explicit event time is kept as given.
    assert session.train(_batches(1)[0], event_time=5.0).event_time == 5.0


def test_a_progress_line_gives_the_lag_from_its_last_minibatchs_event_time(
    tmp_path: pathlib.Path, fake_save: None
) -> None:
    """event_lag_seconds: from the event time the last minibatch came with (a Kafka
    message's creation) to the session's clock when it was trained."""
    clock = FakeClock(now=5000.0)
    session = _session(tmp_path, Cadence(log_every_steps=2), clock=clock)
    batches = _batches(4)
    for batch, event_time in zip(batches, (4999.0, 4998.0, 4990.0, 4987.5), strict=True):
        clock.now += 1.0
        session.train(batch, event_time=event_time)
    lines = (tmp_path / "progress.jsonl").read_text().splitlines()
    entries = [_strict_json(line) for line in lines]
    assert [e["event_lag_seconds"] for e in entries] == [5002.0 - 4998.0, 5004.0 - 4987.5]


def test_progress_lines_are_example_weighted_averages(
    tmp_path: pathlib.Path, fake_save: None
) -> None:
    session = _session(tmp_path, Cadence(log_every_steps=3, checkpoint_every_steps=1000))
    # Batches of 4 and of 2, so that a plain mean of the records would differ.
    sizes = [4, 2, 2, 4, 2, 4, 4]
    rng = np.random.default_rng(3)
    records = [session.train((rng.random((size, D)) > 0.5).astype(np.float32)) for size in sizes]
    session.close()  # writes the final line
    lines = (tmp_path / "progress.jsonl").read_text().splitlines()
    entries = [_strict_json(line) for line in lines]
    assert len(entries) == 3  # after steps 3 and 6, and the final one for step 7
    windows = [records[0:3], records[3:6], records[6:7]]
    previous_wall = 0.0
    for entry, window in zip(entries, windows, strict=True):
        for key in ("examples", "elbo", "reconstruction_log_likelihood", "kl", "wall_seconds"):
            assert key in entry, f"{key} missing from {entry}"
        assert entry["key"] == "default"
        assert entry["step"] == window[-1].step
        assert entry["examples"] == window[-1].examples_seen == sum(sizes[: window[-1].step])
        assert entry["skipped_steps"] == 0
        for field in ("elbo", "reconstruction_log_likelihood", "kl"):
            assert entry[field] == pytest.approx(_weighted(window, field), rel=1e-12)
        assert entry["elbo"] == pytest.approx(
            entry["reconstruction_log_likelihood"] - entry["kl"], abs=1e-3
        )
        assert entry["wall_seconds"] >= previous_wall
        previous_wall = entry["wall_seconds"]
    # The weighting is visible: the plain mean of the first window's records is different.
    plain = np.mean([r.elbo for r in windows[0]])
    assert abs(plain - entries[0]["elbo"]) > 1e-6
    # Each record is the mean of its own per-example bounds, and elbo = reconstruction - kl.
    for record in records:
        assert len(record.elbo_per_example) == record.batch_size
        assert record.elbo == pytest.approx(np.mean(record.elbo_per_example), rel=1e-5)
        assert record.elbo == pytest.approx(
            record.reconstruction_log_likelihood - record.kl, abs=1e-3
        )


def test_skipped_minibatches_are_counted_and_left_out_of_averages(
    tmp_path: pathlib.Path, fake_save: None
) -> None:
    session = _session(tmp_path, Cadence(log_every_steps=3, checkpoint_every_steps=1000))
    good, other = _batches(2, seed=4)
    nan = np.full((4, D), np.nan, np.float32)
    records = [session.train(good), session.train(nan), session.train(other)]
    assert [r.applied for r in records] == [True, False, True]
    assert np.isnan(records[1].elbo)
    assert [r.step for r in records] == [1, 1, 2]  # the skipped batch is not an update
    assert [r.examples_seen for r in records] == [4, 8, 12]  # but its examples were consumed

    session.train(nan)  # a window with nothing but a skipped batch...
    session.close()
    entries = [
        _strict_json(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()
    ]
    assert len(entries) == 2
    first, last = entries
    assert (first["examples"], first["step"], first["skipped_steps"]) == (12, 2, 1)
    assert first["elbo"] == pytest.approx((records[0].elbo + records[2].elbo) / 2, rel=1e-12)
    assert np.isfinite(first["kl"]) and np.isfinite(first["reconstruction_log_likelihood"])
    # ...logs the counters and no average (rather than NaN, which is not JSON).
    assert (last["examples"], last["step"], last["skipped_steps"]) == (16, 2, 2)
    assert "elbo" not in last
    assert session.trainer.skipped_steps == 2


def test_evaluation_cadence_adds_its_results_to_the_progress_line(tmp_path: pathlib.Path) -> None:
    calls = []

    def evaluator(model: vae.VAE) -> dict:
        calls.append(session.examples_seen)
        return {"test_elbo": -float(len(calls)), "test_examples": 7}

    session = _session(
        tmp_path,
        Cadence(log_every_steps=100, checkpoint_every_steps=1000, evaluate_every_examples=8),
        evaluator=evaluator,
    )
    for batch in _batches(5):
        session.train(batch)
    assert calls == [8, 16]
    entries = read_progress(tmp_path / "progress.jsonl")
    assert [(e["examples"], e["test_elbo"], e["test_examples"]) for e in entries] == [
        (8, -1.0, 7),
        (16, -2.0, 7),
    ]


def test_restoring_a_different_architecture_names_the_directory(tmp_path: pathlib.Path) -> None:
    session = _session(tmp_path, Cadence())
    session.checkpoint()
    directory = tmp_path / "checkpoints" / "default"
    wider = vae.VAEConfig(input_dim=D, latent_dim=2, hidden_dim=16, batch_size=4)
    with pytest.raises(ValueError) as raised:
        TrainingSession(tmp_path, "default", wider, Cadence())
    message = str(raised.value)
    assert str(directory) in message
    assert "different model" in message and "'hidden_dim': 8" in message
    # Optimiser settings are not the architecture: a run may resume with another step size.
    retuned = vae.VAEConfig(input_dim=D, latent_dim=2, hidden_dim=8, learning_rate=0.05)
    assert TrainingSession(tmp_path, "default", retuned, Cadence()).resumed


@pytest.mark.parametrize(
    "key", ["", "../escape", "a/b", ".hidden", "-dash", "with space", "é", "x" * 129]
)
def test_invalid_model_keys_are_rejected(tmp_path: pathlib.Path, key: str) -> None:
    with pytest.raises(ValueError, match="must start with a letter or digit"):
        TrainingSession(tmp_path / "run", key, CONFIG, Cadence())
    assert not (tmp_path / "run").exists()  # rejected before anything was written


@pytest.mark.parametrize("key", ["default", "mnist-5k", "v1.2_b", "0", "x" * 128])
def test_valid_model_keys(key: str) -> None:
    assert validate_model_key(key) == key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("log_every_steps", 0),
        ("checkpoint_every_steps", -1),
        ("keep_snapshots", 0),
        ("snapshot_every_examples", 0),
        ("snapshot_every_seconds", -0.5),
        ("evaluate_every_examples", -10),
    ],
)
def test_cadence_validation(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be .*, got {value}$"):
        Cadence(**{field: value})


def test_cadence_defaults_and_disabled_triggers() -> None:
    cadence = Cadence(snapshot_every_examples=None, snapshot_every_seconds=None)
    assert (cadence.log_every_steps, cadence.checkpoint_every_steps, cadence.keep_snapshots) == (
        10,
        1000,
        5,
    )
    assert Cadence(snapshot_every_seconds=0.25).snapshot_every_seconds == 0.25


def test_a_drift_detection_restarts_adagrad_at_the_next_update(
    tmp_path: pathlib.Path, fake_save: None
) -> None:
    """`--adaptation reset`: the detection marks a restart; the next update, on the new
    data, restarts the accumulators at RESET_UPDATES updates' worth."""
    session = _session(
        tmp_path,
        Cadence(),
        drift=DriftSettings("page-hinkley", threshold=20, delta=1, min_minibatches=5),
        reset_optimizer_on_drift=True,
    )
    optimizer = session.trainer.optimizer
    rng = np.random.default_rng(7)
    sparse, dense = ((rng.random((4, D)) < p).astype(np.float32) for p in (0.1, 0.9))
    for _ in range(RESET_UPDATES + 100):
        session.train(sparse)
    assert session.drift_detections == []
    assert optimizer.updates_summed.numpy() == RESET_UPDATES + 100
    while not session.drift_detections:
        session.train(dense)
        assert session.examples_seen < (RESET_UPDATES + 110) * 4, "no detection"
    # The step that found the change was a plain Adagrad step; the restart waits for the next.
    assert optimizer.restart_pending.numpy()
    assert optimizer.updates_summed.numpy() == session.trainer.step
    session.train(dense)
    assert not optimizer.restart_pending.numpy()
    assert optimizer.updates_summed.numpy() == RESET_UPDATES + 1


def test_a_drift_detection_boosts_decays_steps_and_the_checkpoint_keeps_the_boost(
    tmp_path: pathlib.Path, fake_save: None
) -> None:
    """`--adaptation decay`: the detection triples the next steps (`drift_step_boost`),
    the boost relaxing from there; a restart continues with the boost where it was."""
    config = dataclasses.replace(CONFIG, **adaptation_fields("decay", 1e5))
    settings = DriftSettings("page-hinkley", threshold=20, delta=1, min_minibatches=5)
    progress = ProgressLog(tmp_path / "progress.jsonl", stream=io.StringIO())
    cadence = Cadence(checkpoint_every_steps=1)
    session = TrainingSession(tmp_path, "default", config, cadence, progress, drift=settings)
    boost = session.trainer.optimizer.boost_excess
    rng = np.random.default_rng(7)
    sparse, dense = ((rng.random((4, D)) < p).astype(np.float32) for p in (0.1, 0.9))
    for _ in range(50):
        session.train(sparse)
    assert boost.numpy() == 0.0
    while not session.drift_detections:
        session.train(dense)
    assert boost.numpy() == pytest.approx(DRIFT_STEP_BOOST - 1)
    session.train(dense)
    relaxed = (DRIFT_STEP_BOOST - 1) * 0.5 ** (4 / STEP_BOOST_HALF_LIFE_EXAMPLES)
    assert boost.numpy() == pytest.approx(relaxed, rel=1e-6)
    restored = TrainingSession(tmp_path, "default", config, cadence, progress, drift=settings)
    assert restored.resumed
    assert restored.trainer.optimizer.boost_excess.numpy() == pytest.approx(relaxed, rel=1e-6)


def test_a_drift_reset_is_in_the_checkpoint_of_its_step(
    tmp_path: pathlib.Path, fake_save: None
) -> None:
    """The detection and its reset come before the step's own checkpoint, which holds both;
    a later save (a bundle's end) has nothing new to write."""
    settings = DriftSettings("page-hinkley", threshold=20, delta=1, min_minibatches=5)
    cadence = Cadence(checkpoint_every_steps=1)
    session = _session(tmp_path, cadence, drift=settings, reset_optimizer_on_drift=True)
    rng = np.random.default_rng(7)
    sparse, dense = ((rng.random((4, D)) < p).astype(np.float32) for p in (0.1, 0.9))
    for _ in range(50):
        session.train(sparse)
    while not session.drift_detections:
        session.train(dense)
    step = session.trainer.step
    assert session.checkpoints.saved_number == step
    session.checkpoint()  # nothing new: no save
    assert session.checkpoints.saved_number == step
    restored = _session(tmp_path, cadence, drift=settings, reset_optimizer_on_drift=True)
    assert restored.resumed and restored.trainer.optimizer.restart_pending.numpy()
