"""Tests for pipeline.train.snapshots: versioned SavedModel snapshots a server can poll safely."""

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

import vae
from pipeline.train import snapshots
from pipeline.train.session import Cadence, TrainingSession
from pipeline.train.snapshots import SnapshotWriter
from vae.snapshot_format import (
    METADATA_PATH,
    read_metadata,
    resolve_version,
    version_directories,
)

CONFIG = vae.VAEConfig(input_dim=8, latent_dim=2, hidden_dim=8, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def model() -> vae.VAE:
    # Trained a few steps so that its parameters differ from a fresh VAE(CONFIG).
    trainer = vae.Trainer(CONFIG)
    data = (np.random.default_rng(0).random((16, 8)) > 0.5).astype(np.float32)
    for batch in np.split(data, 4):
        trainer.train_step(batch)
    return trainer.model


class ExportStandIn:
    """Writes a stand-in instead of the ~0.5-2 s SavedModel export, or fails on request."""

    def __init__(self) -> None:
        self.exported: list[pathlib.Path] = []
        self.failure: Exception | None = None

    def save(self, model: vae.VAE, directory, graph_dir=None) -> None:
        directory = pathlib.Path(directory)
        (directory / "saved_model.pb").write_bytes(b"stand-in")  # what a reader would see
        if self.failure is not None:
            raise self.failure  # half-way: something is already in the staging directory
        self.exported.append(directory)


@pytest.fixture
def fake_save(monkeypatch: pytest.MonkeyPatch) -> ExportStandIn:
    """Replaces the export (`vae.save`) for the tests of numbering and failure handling; the
    tests that load a snapshot use the real export."""
    stand_in = ExportStandIn()
    monkeypatch.setattr(vae, "save", stand_in.save)
    return stand_in


def _names(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _assert_only_versions(model_dir: pathlib.Path) -> None:
    """What TF Serving requires of a model_base_path: integer version directories only."""
    for entry in model_dir.iterdir():
        assert entry.is_dir() and entry.name.isdigit(), f"{entry} is not a version directory"
        assert (entry / "saved_model.pb").is_file(), f"{entry} is not a complete SavedModel"


def _staging_leftovers(writer: SnapshotWriter) -> list[str]:
    """Entries of the staging directory other than the high-water-mark files."""
    staging = writer.model_dir.parent / snapshots.STAGING_DIR
    if not staging.exists():
        return []
    return [p.name for p in staging.iterdir() if not p.name.endswith(".last_version")]


def test_versions_increase_and_keep_prunes_the_oldest(tmp_path, model, fake_save) -> None:
    writer = SnapshotWriter(tmp_path, "default", keep=2)
    assert writer.latest_version() is None
    written = []
    for n in range(1, 5):
        path = writer.write(model, {"examples_seen": 10 * n})
        written.append(path)
        assert path == tmp_path / "snapshots" / "default" / str(n)
        assert writer.latest_version() == n
        _assert_only_versions(writer.model_dir)
        expected = [str(v) for v in range(max(1, n - 1), n + 1)]
        assert sorted(_names(writer.model_dir), key=int) == expected
        assert _staging_leftovers(writer) == []
    # Every export went to the staging directory, which is beside the model directory, not
    # inside it, and was renamed into place from there.
    staging = (tmp_path / "snapshots" / snapshots.STAGING_DIR).resolve()
    assert staging.is_dir()
    assert writer.model_dir.resolve() not in staging.parents
    assert len(fake_save.exported) == 4
    assert all(d.resolve().parent == staging for d in fake_save.exported)
    assert [int(p.name) for p in version_directories(writer.model_dir)] == [3, 4]
    assert not written[0].exists() and not written[1].exists()


def test_versions_are_never_reused(tmp_path, model, fake_save) -> None:
    writer = SnapshotWriter(tmp_path, "default", keep=1)
    assert [writer.write(model, {}).name for _ in range(3)] == ["1", "2", "3"]
    assert _names(writer.model_dir) == ["3"]

    # A new writer on the same run directory (a restarted process) continues.
    restarted = SnapshotWriter(tmp_path, "default", keep=1)
    assert restarted.write(model, {}).name == "4"

    # Even with every version directory gone, the high-water mark keeps versions increasing:
    # a server that saw version 4 must never be handed an older model as a "new" 1.
    shutil.rmtree(restarted.model_dir / "4")
    assert _names(restarted.model_dir) == []
    again = SnapshotWriter(tmp_path, "default", keep=1)
    assert again.write(model, {}).name == "5"
    _assert_only_versions(again.model_dir)

    # Model names count separately.
    other = SnapshotWriter(tmp_path, "other", keep=1)
    assert other.write(model, {}).name == "1"


def test_a_version_directory_left_by_someone_else_is_not_overwritten(
    tmp_path, model, fake_save
) -> None:
    writer = SnapshotWriter(tmp_path, "default")
    writer.write(model, {})
    # E.g. a version copied in by hand, above the recorded high-water mark.
    shutil.copytree(writer.model_dir / "1", writer.model_dir / "7")
    assert writer.write(model, {}).name == "8"


def test_a_snapshot_loads_and_equals_the_model(tmp_path, model) -> None:
    path = SnapshotWriter(tmp_path, "default").write(model, {})
    loaded = vae.load_model(path)
    assert loaded.config == model.config
    assert len(loaded.trainable_variables) == len(model.trainable_variables) == 8
    for mine, theirs in zip(model.trainable_variables, loaded.trainable_variables, strict=True):
        assert mine.name == theirs.name
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    # A fresh model differs, so the comparison above is not vacuous.
    fresh = vae.VAE(CONFIG)
    assert not np.array_equal(
        fresh.trainable_variables[0].numpy(), model.trainable_variables[0].numpy()
    )

    # Served through the plain SavedModel API, the bound equals the model's with EXPORT_SEED.
    served = tf.saved_model.load(str(path))
    assert set(vae.SIGNATURES) <= set(served.signatures)
    x = (np.random.default_rng(1).random((5, 8)) > 0.5).astype(np.float32)
    outputs = served.signatures["elbo"](x=tf.constant(x))
    expected = model.bound(x, tf.constant(vae.EXPORT_SEED, tf.int32))
    np.testing.assert_allclose(outputs["elbo"].numpy(), expected.elbo.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        outputs["elbo"].numpy(),
        outputs["reconstruction_log_likelihood"].numpy() - outputs["kl"].numpy(),
        rtol=1e-5,
    )
    # The real export writes its SavedModel and the metadata beside it.
    assert read_metadata(path)["version"] == 1
    assert read_metadata(path)["input_shape"] == [None, 8]


def test_the_versions_of_a_configuration_link_one_graph_file(tmp_path, model) -> None:
    other = vae.VAE(dataclasses.replace(CONFIG, seed=11))  # another key's model, same graph
    first = SnapshotWriter(tmp_path, "a").write(model, {})
    second = SnapshotWriter(tmp_path, "b").write(other, {})
    staging = tmp_path / "snapshots" / snapshots.STAGING_DIR
    (graph,) = staging.glob("saved_model-*.pb")
    assert {(p / "saved_model.pb").stat().st_ino for p in (first, second)} == {graph.stat().st_ino}
    assert graph.stat().st_nlink == 3
    # Linked, each still loads as its own model.
    for path, written in ((first, model), (second, other)):
        for mine, theirs in zip(
            written.parameters(), vae.load_model(path).parameters(), strict=True
        ):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    # A job's start clears the staging directory of leftovers, not of a linked graph file.
    assert snapshots.remove_staging(tmp_path) == [] and graph.exists()
    # Pruning a version unlinks its name only.
    SnapshotWriter(tmp_path, "a", keep=1).write(model, {})
    assert graph.stat().st_nlink == 3 and not first.exists()
    # A graph file no version links to (another run's, all of whose versions were pruned)
    # goes at the next start.
    unlinked = staging / "saved_model-0123456789abcdef.pb"
    unlinked.write_bytes(b"graph of an earlier process")
    assert snapshots.remove_staging(tmp_path) == [unlinked] and graph.exists()


def test_each_snapshot_holds_the_parameters_at_its_own_export(tmp_path) -> None:
    """A writer may reuse traced signatures between exports, never stale parameter values."""
    model = vae.VAE(CONFIG)
    writer = SnapshotWriter(tmp_path, "default")
    before = [v.numpy().copy() for v in model.trainable_variables]
    first = writer.write(model, {})
    for variable in model.trainable_variables:  # what a training step does, in place
        variable.assign_add(tf.fill(variable.shape, 0.25))
    second = writer.write(model, {})
    after = [v.numpy() for v in model.trainable_variables]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b - a, 0.25, rtol=1e-5)
    for path, values in ((first, before), (second, after)):
        loaded = vae.load_model(path).trainable_variables
        for variable, expected in zip(loaded, values, strict=True):
            np.testing.assert_array_equal(variable.numpy(), expected)


def test_metadata_of_a_session_snapshot(tmp_path, fake_save) -> None:
    config = vae.VAEConfig(input_dim=6, latent_dim=2, hidden_dim=8, batch_size=3)
    session = TrainingSession(tmp_path, "digits", config, Cadence(log_every_steps=100))
    data = np.random.default_rng(2).random((9, 6)).astype(np.float32)
    records = [session.train(batch) for batch in np.split(data, 3)]
    path = session.snapshot("test")
    assert path == tmp_path / "snapshots" / "digits" / "1"

    document = json.loads((path / METADATA_PATH).read_text())
    assert document == read_metadata(path)
    assert document["key"] == "digits"
    assert document["model"] == "digits"
    assert document["version"] == 1
    assert document["step"] == 3
    assert document["examples_seen"] == 9
    assert document["reason"] == "test"
    assert document["elbo_at_export"] == records[-1].elbo
    assert document["input_shape"] == [None, 6]
    assert vae.VAEConfig.from_dict(document["config"]) == config
    assert isinstance(document["created_unix_seconds"], float)
    assert read_metadata(tmp_path) == {}  # no metadata file: empty, not an error


def test_resolve_version(tmp_path, model, fake_save) -> None:
    writer = SnapshotWriter(tmp_path, "default", keep=5)
    first = writer.write(model, {})
    second = writer.write(model, {})
    assert resolve_version(first) == first  # a version directory as given
    assert resolve_version(writer.model_dir) == second  # a model directory: the newest
    # Newest by number, not by name: 10 comes after 9.
    shutil.copytree(second, writer.model_dir / "9")
    shutil.copytree(second, writer.model_dir / "10")
    assert resolve_version(str(writer.model_dir)) == writer.model_dir / "10"

    for bad in (tmp_path / "missing", tmp_path / "snapshots"):
        with pytest.raises(FileNotFoundError) as raised:
            resolve_version(bad)
        assert str(bad) in str(raised.value)
        assert "neither a SavedModel directory nor a model directory" in str(raised.value)


def test_a_failed_export_leaves_no_partial_version(tmp_path, model, fake_save) -> None:
    writer = SnapshotWriter(tmp_path, "default")
    assert writer.write(model, {}).name == "1"

    fake_save.failure = OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        writer.write(model, {})
    assert _names(writer.model_dir) == ["1"]
    _assert_only_versions(writer.model_dir)
    assert _staging_leftovers(writer) == []

    fake_save.failure = None
    # The failed attempt consumed no version that a reader could have seen; the next is 2.
    assert writer.write(model, {}).name == "2"
    _assert_only_versions(writer.model_dir)


def test_keep_must_be_positive(tmp_path) -> None:
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        SnapshotWriter(tmp_path, "default", keep=0)
