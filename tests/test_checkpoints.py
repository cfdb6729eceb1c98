"""Training checkpoints: NumPy archives under TensorFlow's names, and the older format."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

import vae
from pipeline.train.checkpoints import CheckpointStore

CONFIG = vae.VAEConfig(input_dim=6, latent_dim=2, hidden_dim=5, batch_size=4, seed=3)


def _batch(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((4, 6)) > 0.5).astype(np.float32)


def _trained(steps: int, config: vae.VAEConfig = CONFIG) -> vae.Trainer:
    trainer = vae.Trainer(config)
    for seed in range(steps):
        trainer.train_step(_batch(seed))
    return trainer


def _newest(directory: pathlib.Path) -> int | None:
    state = directory / CheckpointStore.STATE_FILE
    return json.loads(state.read_text())["checkpoint"] if state.exists() else None


def _values(trainer: vae.Trainer) -> list[np.ndarray]:
    return [v.numpy() for v in tf.nest.flatten(trainer.state())]


def test_a_checkpoint_holds_every_variable_under_the_key_tensorflow_gives_it(tmp_path):
    trainer = _trained(3)
    path = CheckpointStore(tmp_path, trainer).save()
    prefix = trainer.checkpoint().write(str(tmp_path / "tensorflow" / "ckpt"))
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    tensorflow_keys = {
        name.removesuffix(suffix): name
        for name, _ in tf.train.list_variables(prefix)
        if name.endswith(suffix)
    }
    reader = tf.train.load_checkpoint(prefix)
    with np.load(path) as arrays:
        assert set(arrays.files) == set(tensorflow_keys)
        for name in arrays.files:
            expected = reader.get_tensor(tensorflow_keys[name])
            assert arrays[name].dtype == expected.dtype
            np.testing.assert_array_equal(arrays[name], expected)


def test_a_restored_trainer_continues_bit_identically(tmp_path):
    trainer = _trained(3)
    CheckpointStore(tmp_path, trainer).save()
    restored = vae.Trainer(CONFIG)
    assert CheckpointStore(tmp_path, restored).restore()
    for left, right in zip(_values(trainer), _values(restored), strict=True):
        np.testing.assert_array_equal(left, right)
    expected, continued = trainer.train_step(_batch(9)), restored.train_step(_batch(9))
    np.testing.assert_array_equal(expected.elbo, continued.elbo)  # same random draws


def test_a_checkpoint_tensorflows_saver_wrote_is_restored_and_rotated_away(tmp_path):
    # What versions before the NumPy format left: `tf.train.CheckpointManager` files and a
    # state.json naming the newest.
    trainer = _trained(2)
    manager = tf.train.CheckpointManager(trainer.checkpoint(), str(tmp_path), max_to_keep=3)
    manager.save(checkpoint_number=2)
    state = {"step": 2, "examples_seen": 8, "checkpoint": 2}
    (tmp_path / CheckpointStore.STATE_FILE).write_text(json.dumps(state))

    restored = vae.Trainer(CONFIG)
    store = CheckpointStore(tmp_path, restored, max_to_keep=2)
    assert store.restore() and (restored.step, restored.examples_seen) == (2, 8)
    for left, right in zip(_values(trainer), _values(restored), strict=True):
        np.testing.assert_array_equal(left, right)

    for seed in (5, 6):
        restored.train_step(_batch(seed))
        store.save()
    assert _newest(tmp_path) == 4
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-3.npz", "ckpt-4.npz"]


def test_only_the_newest_checkpoints_and_their_ledgers_are_kept(tmp_path):
    trainer = vae.Trainer(CONFIG)
    store = CheckpointStore(tmp_path, trainer, max_to_keep=2)
    for seed in range(4):
        trainer.train_step(_batch(seed))
        store.save()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-3.npz", "ckpt-4.npz"]
    assert sorted(p.name for p in tmp_path.glob("read_ledger-*")) == [
        "read_ledger-3.json",
        "read_ledger-4.json",
    ]
    # A new store over the same directory (a restarted job) goes on rotating what is there.
    again = CheckpointStore(tmp_path, trainer, max_to_keep=2)
    assert again.restore()
    trainer.train_step(_batch(7))
    again.save()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-4.npz", "ckpt-5.npz"]


def test_a_checkpoint_of_another_optimiser_is_refused_by_name(tmp_path):
    CheckpointStore(tmp_path, _trained(1)).save()
    other = vae.Trainer(dataclasses.replace(CONFIG, optimizer="adam"))
    with pytest.raises(ValueError, match="does not hold this trainer's variables"):
        CheckpointStore(tmp_path, other).restore()


def test_an_archive_from_before_the_step_boost_is_restored_without_it(tmp_path):
    """Older versions wrote no `boost_excess`: restored, it starts at 0 (no boost), and
    everything else is as saved."""
    config = dataclasses.replace(CONFIG, drift_step_boost=3.0)
    trainer = _trained(2, config)
    path = CheckpointStore(tmp_path, trainer).save()
    with np.load(path) as arrays:
        older = {name: arrays[name] for name in arrays.files if not name.endswith("boost_excess")}
    assert len(older) == len(arrays.files) - 1
    np.savez(path, **older)
    restored = vae.Trainer(config)
    restored.boost_steps()  # a value that the restore must set back to the start
    assert CheckpointStore(tmp_path, restored).restore()
    assert restored.optimizer.boost_excess.numpy() == 0.0
    np.testing.assert_array_equal(_values(restored)[0], _values(trainer)[0])
    del older["trainer/_step"]
    np.savez(path, **older)
    with pytest.raises(ValueError, match=r"trainer/_step"):
        CheckpointStore(tmp_path, vae.Trainer(config)).restore()


def test_checkpoint_files_are_written_under_a_temporary_name(tmp_path, monkeypatch):
    # A writer killed mid-write leaves `ckpt-N.npz.tmp`, never a partial `ckpt-N.npz`.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    trainer = _trained(1)
    store = CheckpointStore(tmp_path, trainer)
    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save()
    assert [p.name for p in pathlib.Path(tmp_path).glob("ckpt-*")] == ["ckpt-1.npz.tmp"]
    assert _newest(tmp_path) is None


def test_the_sessions_own_state_and_arrays_are_restored_with_the_trainer(tmp_path):
    trainer = _trained(3)
    store = CheckpointStore(tmp_path, trainer)
    state = {"drift": {"noise": {"value": 3.3, "_warming": None}}, "regimes": [1, 2]}
    arrays = {"regimes/1/trainer/model/decoder_hidden/kernel": np.arange(6.0).reshape(2, 3)}
    path = store.save(state, arrays)
    with np.load(path, allow_pickle=False) as saved:  # no pickle needed to read it
        assert "session/state.json" in saved.files
    resumed = CheckpointStore(tmp_path, vae.Trainer(CONFIG))
    assert resumed.restore()
    assert resumed.session_state == state
    assert resumed.session_arrays.keys() == arrays.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(resumed.session_arrays[name], array)
    np.testing.assert_array_equal(_values(resumed.trainer)[0], _values(trainer)[0])
    # A checkpoint without them (the session had nothing of its own) gives empty ones.
    store.save()
    bare = CheckpointStore(tmp_path, vae.Trainer(CONFIG))
    assert bare.restore() and bare.session_state == {} and bare.session_arrays == {}
