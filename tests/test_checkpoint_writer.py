"""`vae.checkpoint_writer`: TensorFlow's checkpoint files, written without its object walk."""

import numpy as np
import tensorflow as tf

import vae
from vae.checkpoint_writer import write_checkpoint

CONFIG = vae.VAEConfig(input_dim=6, latent_dim=2, hidden_dim=5, batch_size=4)


def _files(prefix: str) -> dict[str, bytes]:
    directory = tf.io.gfile.glob(prefix + ".*")
    return {path.rsplit("/", 1)[1]: tf.io.gfile.GFile(path, "rb").read() for path in directory}


def test_later_writes_of_a_structure_are_the_bytes_tensorflow_writes(tmp_path):
    first, second = vae.Trainer(CONFIG), vae.Trainer(CONFIG)
    second.train_step(np.eye(4, 6, dtype=np.float32))  # other values, one structure
    write_checkpoint(tf.train.Checkpoint(trainer=first), str(tmp_path / "first" / "ckpt"))
    fast = write_checkpoint(tf.train.Checkpoint(trainer=second), str(tmp_path / "fast" / "ckpt"))
    reference = tf.train.Checkpoint(trainer=second).write(str(tmp_path / "reference" / "ckpt"))
    assert _files(fast) == _files(reference) and len(_files(fast)) == 2
    assert not tf.io.gfile.exists(fast + "_temp")  # merged into the prefix


def test_a_fast_write_restores_into_a_new_object(tmp_path):
    written = vae.VAE(CONFIG)
    for directory in ("first", "second"):
        prefix = write_checkpoint(tf.train.Checkpoint(model=written), str(tmp_path / directory))
    restored = vae.VAE(vae.VAEConfig(**{**CONFIG.to_dict(), "seed": 9}))
    tf.train.Checkpoint(model=restored).read(prefix).assert_consumed()
    for left, right in zip(written.parameters(), restored.parameters(), strict=True):
        np.testing.assert_array_equal(left.numpy(), right.numpy())


def test_another_structure_is_written_by_tensorflow_first(tmp_path):
    # A root with one more variable is another structure: its keys are learned, not reused.
    model = vae.VAE(CONFIG)
    write_checkpoint(tf.train.Checkpoint(model=model), str(tmp_path / "a"))
    extra = tf.train.Checkpoint(model=model, note=tf.Variable(3))
    prefix = write_checkpoint(extra, str(tmp_path / "b"))
    names = {name for name, _ in tf.train.list_variables(prefix)}
    assert "note/.ATTRIBUTES/VARIABLE_VALUE" in names
