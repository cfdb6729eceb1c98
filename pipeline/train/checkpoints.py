"""Training-state checkpoints of one model key under `RUN_DIR/checkpoints/<key>/`.

The whole `vae.Trainer` state (parameters, Adagrad accumulators, counters, random generator)
goes into a `tf.train.Checkpoint`; `tf.train.CheckpointManager` writes it atomically and
keeps the last few, so a crash mid-write leaves the previous checkpoint usable.

>>> import tempfile, numpy as np, vae
>>> config = vae.VAEConfig(input_dim=4, latent_dim=2, hidden_dim=8)
>>> trainer = vae.Trainer(config)
>>> store = CheckpointStore(tempfile.mkdtemp(), trainer)
>>> store.restore()            # nothing to restore yet
False
>>> _ = trainer.train_step(np.eye(4, dtype=np.float32)); _ = store.save()
>>> resumed = vae.Trainer(config)
>>> CheckpointStore(store.directory, resumed).restore(), resumed.examples_seen
(True, 4)
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from typing import Any

import tensorflow as tf

import vae
from pipeline.train.read_ledger import ReadLedger

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.json"


class CheckpointStore:
    """Saves and restores one trainer's state in a directory of its own.

    Beside the TensorFlow checkpoint it keeps `state.json` (step, examples seen), which
    a job reads to resume its source without importing TensorFlow, and with each
    checkpoint its `read_ledger` (`pipeline.train.read_ledger`): the file records that
    checkpoint has learned from, restored with it.
    """

    STATE_FILE = "state.json"
    # `read_ledger-<N>.json` beside `ckpt-<N>`: which file records checkpoint N has learned.
    LEDGER_PREFIX = "read_ledger-"

    def __init__(self, directory: str | os.PathLike, trainer: vae.Trainer, max_to_keep: int = 3):
        self.directory = pathlib.Path(directory)
        self.trainer = trainer
        self.read_ledger = ReadLedger()
        # The number of the checkpoint restored or last written (None: none yet).
        self.saved_number: int | None = None
        self._manager = tf.train.CheckpointManager(
            trainer.checkpoint(), os.fspath(self.directory), max_to_keep=max_to_keep
        )

    @staticmethod
    def saved_config(directory: str | os.PathLike) -> vae.VAEConfig | None:
        """The model config a run saved beside its checkpoints, if any."""
        path = pathlib.Path(directory) / CONFIG_FILE
        if not path.exists():
            return None
        return vae.VAEConfig.from_dict(json.loads(path.read_text()))

    def restore(self) -> bool:
        """Loads the latest checkpoint into the trainer; False when there is none."""
        latest = self._manager.latest_checkpoint
        if latest is None:
            return False
        saved = self.saved_config(self.directory)
        if saved is not None and _architecture(saved) != _architecture(self.trainer.config):
            raise ValueError(
                f"checkpoint in {self.directory} is for a different model "
                f"({_architecture(saved)}), not {_architecture(self.trainer.config)}; "
                "use another --output or the same model flags"
            )
        self._manager.checkpoint.restore(latest).assert_existing_objects_matched()
        self.saved_number = _checkpoint_number(latest)
        ledger = self._ledger_path(self.saved_number)
        if ledger.exists():
            self.read_ledger = ReadLedger.from_dict(json.loads(ledger.read_text()))
        else:
            logger.warning(
                "%s has no read ledger (written by an older version?): its files' records "
                "will be trained again if they are read again",
                latest,
            )
        logger.info(
            "restored %s: step %d, %d examples seen",
            latest,
            self.trainer.step,
            self.trainer.examples_seen,
        )
        return True

    def save(self) -> str:
        """Writes a checkpoint now and returns its path prefix."""
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / CONFIG_FILE
        if not config_path.exists():
            config_path.write_text(json.dumps(self.trainer.config.to_dict(), indent=2))
        # The ledger first, under the number the checkpoint will have: a checkpoint on disk
        # always has its ledger, and one killed before it was written is never restored.
        number = self.number()
        _write_atomically(self._ledger_path(number), json.dumps(self.read_ledger.to_dict()))
        prefix = self._manager.save(checkpoint_number=number)
        self.saved_number = number
        kept = {_checkpoint_number(path) for path in self._manager.checkpoints}
        for ledger in self.directory.glob(f"{self.LEDGER_PREFIX}*.json"):
            if int(ledger.stem.removeprefix(self.LEDGER_PREFIX)) not in kept:
                ledger.unlink(missing_ok=True)
        state = {
            "step": self.trainer.step,
            "examples_seen": self.trainer.examples_seen,
            "checkpoint": number,
        }
        _write_atomically(self.directory / self.STATE_FILE, json.dumps(state))
        return prefix

    def number(self) -> int:
        """The number the next checkpoint gets: the minibatches processed, applied or
        skipped (the update step alone stays put when a non-finite minibatch is skipped),
        and always above the last one's (a drift reset changes the state between two
        minibatches): no checkpoint is ever written twice under one number, so a kill
        mid-write never spoils the newest."""
        processed = self.trainer.step + self.trainer.skipped_steps
        return processed if self.saved_number is None else max(processed, self.saved_number + 1)

    def _ledger_path(self, number: int) -> pathlib.Path:
        return self.directory / f"{self.LEDGER_PREFIX}{number}.json"


def _checkpoint_number(prefix: str) -> int:
    """N of a checkpoint prefix `.../ckpt-N`."""
    return int(prefix.rsplit("-", 1)[1])


def _write_atomically(path: pathlib.Path, text: str) -> None:
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text)
    os.replace(staged, path)


def checkpointed_examples(run_dir: str | os.PathLike, key: str) -> int:
    """Examples seen by the newest checkpoint of `key` under `run_dir` (0 if none).

    Read from its `state.json`, so a job can resume its source without restoring a model.
    """
    return saved_state(run_dir, key).get("examples_seen", 0)


def checkpoint_number(run_dir: str | os.PathLike, key: str) -> int | None:
    """The number of the newest checkpoint of `key` under `run_dir` (None if none), from
    its `state.json`: a live session saved under a lower one is stale."""
    return saved_state(run_dir, key).get("checkpoint")


def saved_state(run_dir: str | os.PathLike, key: str) -> dict[str, Any]:
    """The `state.json` of `key`'s newest checkpoint ({} if none): its "checkpoint" number,
    "step" and "examples_seen", read without restoring a model."""
    state = pathlib.Path(run_dir) / "checkpoints" / key / CheckpointStore.STATE_FILE
    return json.loads(state.read_text()) if state.exists() else {}


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Removes what a writer killed mid-checkpoint left under `run_dir/checkpoints/`:
    TensorFlow's `<prefix>_temp/` directories and half-written `*.json.tmp` files. Only for
    the job that holds the run directory, before it trains (the last complete checkpoint
    is never touched). Returns what was removed."""
    removed = []
    for key_dir in pathlib.Path(run_dir, "checkpoints").glob("*"):
        for partial in [*key_dir.glob("*_temp"), *key_dir.glob("*.json.tmp")]:
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            elif partial.exists():
                partial.unlink()
            else:
                continue
            removed.append(partial)
    return removed


def _architecture(config: vae.VAEConfig) -> dict:
    fields = ("input_dim", "latent_dim", "hidden_dim", "likelihood")
    return {name: getattr(config, name) for name in fields}
