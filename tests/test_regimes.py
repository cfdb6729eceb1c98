"""Tests for pipeline.train.regimes and the regime memory of pipeline.train.session."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest

import vae
from pipeline.outputs import metrics
from pipeline.train.drift import DriftSettings
from pipeline.train.observers import SessionObserver
from pipeline.train.progress import ProgressLog, read_progress
from pipeline.train.regimes import MIN_MINIBATCHES, WINDOW_MINIBATCHES, RegimeMemory
from pipeline.train.session import Cadence, TrainingSession
from vae.snapshot_format import read_metadata, version_directories

D, M, PHASE = 64, 10, 300  # input width, minibatch, minibatches per phase
CONFIG = vae.VAEConfig(input_dim=D, latent_dim=2, hidden_dim=16, batch_size=M, seed=3)


@pytest.fixture(autouse=True)
def stand_in_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SavedModel export takes seconds; these tests are about when snapshots happen."""

    def save(model, directory, graph_dir=None) -> None:
        (pathlib.Path(directory) / "saved_model.pb").write_bytes(b"stand-in")

    monkeypatch.setattr(vae, "save", save)


class Regimes(SessionObserver):
    def __init__(self) -> None:
        self.events: list[tuple[int, str]] = []

    def on_regime(self, key, regime, change):
        self.events.append((regime, change))


def _regimes() -> dict[str, np.ndarray]:
    """Three distributions of binary images: four prototypes, their inverses, four others."""
    rng = np.random.default_rng(0)
    first = (rng.random((4, D)) > 0.5).astype(np.float32)
    return {"A": first, "B": 1 - first, "C": (rng.random((4, D)) > 0.5).astype(np.float32)}


def _stream(phases: str, seed: int = 1) -> list[np.ndarray]:
    """PHASE minibatches of each named regime in turn, drawn from its prototypes."""
    rng, prototypes = np.random.default_rng(seed), _regimes()
    return [prototypes[name][rng.integers(0, 4, M)] for name in phases for _ in range(PHASE)]


def _session(run_dir: pathlib.Path, memory: int, **kwargs) -> TrainingSession:
    progress = ProgressLog(run_dir / "progress.jsonl", stream=io.StringIO())
    return TrainingSession(
        run_dir,
        "machine-7",
        CONFIG,
        Cadence(log_every_steps=1000, checkpoint_every_steps=10**6),
        progress,
        drift=DriftSettings(),
        regime_memory=memory,
        **kwargs,
    )


def _train(session: TrainingSession, batches: list[np.ndarray]) -> np.ndarray:
    return np.array([session.train(batch).elbo for batch in batches])


def test_a_returning_regime_is_switched_back_to_and_a_new_one_is_not(
    tmp_path: pathlib.Path,
) -> None:
    observer = Regimes()
    session = _session(tmp_path, memory=2, observers=[observer])
    bounds = _train(session, _stream("ABAC"))

    changes = [PHASE * M * k for k in (1, 2, 3)]
    detections = [d.examples_seen for d in session.drift_detections]
    assert len(detections) == 3
    assert all(c < d <= c + 10 * M for c, d in zip(changes, detections, strict=True))
    # One switch: back to A when it returns, MIN_MINIBATCHES after its detection.
    [switch] = session.regime_switches
    assert (switch.from_regime, switch.to_regime) == (1, 0)
    assert switch.examples_seen == detections[1] + (MIN_MINIBATCHES - 1) * M
    assert switch.advantage_nats > switch.margin_nats > 0
    # Back at once to A's level before it ended, not relearned.
    level_before = bounds[PHASE - 20 : PHASE].mean()
    after_switch = switch.examples_seen // M
    assert abs(bounds[after_switch : after_switch + 10].mean() - level_before) < 5
    # C is new: no switch, A and B stored, C the third regime.
    assert session.regimes.active == 2
    assert sorted(regime.id for regime in session.regimes.stored) == [0, 1]
    assert observer.events == [(0, "start"), (1, "new"), (0, "return"), (2, "new")]
    assert switch.kind == "return"
    # The switch is in progress.jsonl and snapshotted.
    [line] = [e for e in read_progress(tmp_path / "progress.jsonl") if "regime" in e]
    assert line["regime"]["to_regime"] == 0 and line["examples"] == switch.examples_seen
    json.dumps(line)
    reasons = [
        read_metadata(path)["reason"]
        for path in version_directories(tmp_path / "snapshots" / "machine-7")
    ]
    assert reasons.count("regime") == 1 and reasons.count("drift") == 3


def test_without_a_memory_the_return_is_learned_again(tmp_path: pathlib.Path) -> None:
    stream = _stream("ABA")
    with_memory = _train(_session(tmp_path / "with", memory=2), stream)
    without = _train(_session(tmp_path / "without", memory=0), stream)
    returned = slice(2 * PHASE + 3, 2 * PHASE + 13)  # ten minibatches after the switch
    assert with_memory[returned].mean() > without[returned].mean() + 10


def test_the_library_is_in_the_checkpoint_and_a_restart_switches_as_if_never_stopped(
    tmp_path: pathlib.Path,
) -> None:
    stream = _stream("ABA")
    uninterrupted = _session(tmp_path / "one", memory=2)
    expected = _train(uninterrupted, stream)
    # Stopped twice: once with A stored, once inside the return's window (its scores so far
    # and the model the detection ended are in the checkpoint too).
    return_detection = uninterrupted.drift_detections[1].examples_seen // M
    stops = [2 * PHASE - 5, return_detection]
    run, found, start = tmp_path / "two", [], 0
    for stop in [*stops, len(stream)]:
        session = _session(run, memory=2)
        found.append(_train(session, stream[start:stop]))
        if stop == return_detection:
            assert session.regimes.scoring
        session.checkpoint()
        start = stop
    np.testing.assert_array_equal(np.concatenate(found), expected)
    assert [(s.examples_seen, s.to_regime) for s in session.regime_switches] == [
        (s.examples_seen, s.to_regime) for s in uninterrupted.regime_switches
    ]
    for mine, theirs in zip(session.regimes.stored, uninterrupted.regimes.stored, strict=True):
        assert mine.id == theirs.id
        for path, array in theirs.arrays.items():
            np.testing.assert_array_equal(mine.arrays[path], array)


def test_a_full_library_drops_the_regime_least_recently_active() -> None:
    trainer = vae.Trainer(CONFIG)
    memory = RegimeMemory(trainer, capacity=2)
    batch = _stream("A")[0]
    for detection in range(3):  # three new regimes, each window closing without a switch
        memory.open_window(examples_seen=1000 * (detection + 1))
        for _ in range(WINDOW_MINIBATCHES):
            # The stored regimes never explain the data better than the current model.
            assert memory.consider(batch, 0.0, 1.0, 1000 * (detection + 1)) is None
    assert memory.active == 3
    assert [regime.id for regime in memory.stored] == [1, 2]  # regime 0 dropped
    with pytest.raises(ValueError, match="at least one regime"):
        RegimeMemory(trainer, capacity=0)


def test_regime_switches_and_the_active_regime_are_metrics() -> None:
    observer = metrics.PrometheusObserver()
    observer.on_regime("pump-3", 0, "start")
    observer.on_regime("pump-3", 4, "new")
    observer.on_regime("pump-3", 1, "return")
    exposed = metrics.generate_latest().decode()
    assert 'aevb_regime_switches_total{kind="return",model="pump-3"} 1.0' in exposed
    assert 'aevb_regime_switches_total{kind="rollback",model="pump-3"} 0.0' in exposed
    assert 'aevb_active_regime{model="pump-3"} 1.0' in exposed


def test_a_regime_memory_needs_a_detector(tmp_path: pathlib.Path, capsys) -> None:
    from pipeline.cli import main as cli

    with pytest.raises(ValueError, match="needs a detector"):
        TrainingSession(tmp_path, "k", CONFIG, regime_memory=2)
    flags = ["train", "--regime-memory", "2", "--drift-detector", "none"]
    assert cli.main([*flags, "--output", str(tmp_path / "run")]) == 2
    assert "--regime-memory acts on drift detections" in capsys.readouterr().err


def _broken_midway(session: TrainingSession) -> list[float]:
    """A stationary stream with a burst of large steps halfway, as an unstable optimiser
    makes: the data stay the same, the model gets worse at once."""
    stream = _stream("AA")
    bounds = list(_train(session, stream[:PHASE]))
    rng = np.random.default_rng(2)
    for variable in session.trainer.model.parameters():
        variable.assign_add(rng.normal(0, 0.5, variable.shape).astype(np.float32))
    return bounds + list(_train(session, stream[PHASE:]))


def test_a_model_that_breaks_itself_is_not_drift(tmp_path: pathlib.Path) -> None:
    session = _session(tmp_path, memory=0)
    bounds = _broken_midway(session)
    assert session.drift_detections == []
    [instability] = session.instabilities
    assert PHASE * M < instability.examples_seen <= (PHASE + 5) * M
    assert np.mean(bounds[PHASE : PHASE + 2]) < np.mean(bounds[PHASE - 20 : PHASE]) - 20
    [line] = [e for e in read_progress(tmp_path / "progress.jsonl") if "instability" in e]
    rise = line["instability"]["value"] - line["instability"]["baseline"]
    assert line["instability"]["earlier_rise_nats"] >= 0.5 * rise > 0
    assert not (tmp_path / "snapshots" / "machine-7").exists()  # no drift snapshot


def test_with_a_memory_a_model_that_breaks_itself_is_rolled_back(tmp_path: pathlib.Path) -> None:
    observer = Regimes()
    session = _session(tmp_path, memory=2, observers=[observer])
    bounds = _broken_midway(session)
    [instability] = session.instabilities
    [switch] = session.regime_switches
    assert switch.kind == "rollback" and switch.examples_seen == instability.examples_seen
    assert switch.from_regime == switch.to_regime == 0 == session.regimes.active
    assert session.regimes.stored == []  # no regime of its own: the data never changed
    level = np.mean(bounds[PHASE - 20 : PHASE])
    after = switch.examples_seen // M
    assert abs(np.mean(bounds[after : after + 10]) - level) < 5  # back at once
    assert observer.events == [(0, "start"), (0, "rollback")]
    [path] = version_directories(tmp_path / "snapshots" / "machine-7")
    assert read_metadata(path)["reason"] == "rollback"
