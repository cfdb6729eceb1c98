"""Training-state checkpoints of one model key under `RUN_DIR/checkpoints/<key>/`.

The whole `vae.Trainer` state (parameters, Adagrad accumulators, counters, random generator)
goes into `ckpt-<N>.npz`, one NumPy array per variable under its object path in the trainer
(the key `tf.train.Checkpoint(trainer=...)` would give it, less its suffix), written to a
temporary name and renamed: a crash mid-write leaves the previous checkpoint usable. The last
few are kept. What else the session learns goes into the same file, so it is saved and restored
with the model it belongs to: a JSON document of its own state (the drift detectors', the
regime library's) and arrays of its own (stored regimes), under names starting `session/`.
Not TensorFlow's checkpoint format: its writer took 17 ms for a 784-500-20
trainer's 6.5 MB where NumPy's took 4.5 (measured alternating, 2026-11-29), and a fleet
writes a checkpoint for every key it trains and evicts. Checkpoints TensorFlow wrote, as
older versions did, are still restored.

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
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

import vae
from pipeline.ingest.run_mirror import RunMirror, is_remote, read_object
from pipeline.train.read_ledger import ReadLedger
from vae.checkpoint_writer import variables_by_path

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.json"


class CheckpointStore:
    """Saves and restores one trainer's state in a directory of its own.

    Beside the checkpoints it keeps `state.json` (step, examples seen, the newest
    checkpoint's number), which a job reads to resume its source without importing
    TensorFlow and `restore` reads to find the newest checkpoint, and with each checkpoint
    its `read_ledger` (`pipeline.train.read_ledger`): the file records that checkpoint has
    learned from, restored with it.
    """

    STATE_FILE = "state.json"
    # `read_ledger-<N>.json` beside `ckpt-<N>.npz`: which file records checkpoint N has learned.
    LEDGER_PREFIX = "read_ledger-"

    def __init__(
        self,
        directory: str | os.PathLike,
        trainer: vae.Trainer,
        max_to_keep: int = 3,
        mirror: RunMirror | None = None,
    ):
        self.directory = pathlib.Path(directory)
        self.trainer = trainer
        self.max_to_keep = max_to_keep
        # A run directory on a store: `directory` is in the working copy, published to it.
        self.mirror = mirror
        self.read_ledger = ReadLedger()
        # The number of the checkpoint restored or last written (None: none yet).
        self.saved_number: int | None = None
        # What the session saved beside the trainer in the restored checkpoint.
        self.session_state: dict[str, Any] = {}
        self.session_arrays: dict[str, np.ndarray] = {}
        # The numbers of the checkpoints on disk, oldest first (None: not listed yet).
        self._kept: list[int] | None = None
        self._config_published = False

    @staticmethod
    def saved_config(directory: str | os.PathLike) -> vae.VAEConfig | None:
        """The model config a run saved beside its checkpoints, if any."""
        path = pathlib.Path(directory) / CONFIG_FILE
        if not path.exists():
            return None
        return vae.VAEConfig.from_dict(json.loads(path.read_text()))

    def restore(self) -> bool:
        """Loads the latest checkpoint into the trainer; False when there is none."""
        if self.mirror is not None:
            self._fetch_published()
        number = self._newest_number()
        if number is None:
            return False
        saved = self.saved_config(self.directory)
        if saved is not None and _architecture(saved) != _architecture(self.trainer.config):
            raise ValueError(
                f"checkpoint in {self.directory} is for a different model "
                f"({_architecture(saved)}), not {_architecture(self.trainer.config)}; "
                "use another --output or the same model flags"
            )
        path = self._path(number)
        if path.exists():
            self.session_state, self.session_arrays = _load_arrays(path, self.trainer)
        else:  # written by TensorFlow's saver (an older version)
            path = self.directory / f"ckpt-{number}"
            self.trainer.checkpoint().restore(os.fspath(path)).assert_existing_objects_matched()
        self.saved_number = number
        ledger = self._ledger_path(number)
        if ledger.exists():
            self.read_ledger = ReadLedger.from_dict(json.loads(ledger.read_text()))
        else:
            logger.warning(
                "%s has no read ledger (written by an older version?): its files' records "
                "will be trained again if they are read again",
                path,
            )
        logger.info(
            "restored %s: step %d, %d examples seen",
            path,
            self.trainer.step,
            self.trainer.examples_seen,
        )
        return True

    def save(
        self,
        session_state: Mapping[str, Any] | None = None,
        session_arrays: Mapping[str, np.ndarray] | None = None,
    ) -> str:
        """Writes a checkpoint now and returns its path; `session_state` (JSON-able) and
        `session_arrays` are the session's own, given back by the `restore` that reads it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / CONFIG_FILE
        if not config_path.exists():
            config_path.write_text(json.dumps(self.trainer.config.to_dict(), indent=2))
        # The ledger first, under the number the checkpoint will have: a checkpoint on disk
        # always has its ledger, and one killed before it was written is never restored.
        number = self.number()
        _write_atomically(self._ledger_path(number), json.dumps(self.read_ledger.to_dict()))
        variables = variables_by_path(self.trainer.checkpoint())
        arrays = {path: variable.numpy() for path, variable in variables.items()}
        for name, array in (session_arrays or {}).items():
            arrays[SESSION_PREFIX + name] = array
        if session_state is not None:
            # A 0-d string array: read back without pickle.
            arrays[SESSION_STATE] = np.array(json.dumps(session_state))
        path = self._path(number)
        staged = path.with_name(path.name + ".tmp")
        with open(staged, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(staged, path)
        self.saved_number = number
        state = {
            "step": int(arrays[STEP_PATH]),
            "examples_seen": int(arrays[EXAMPLES_SEEN_PATH]),
            "checkpoint": number,
            # What the step computed its products in (config.json keeps the first run's).
            "precision": self.trainer.config.precision,
        }
        _write_atomically(self.directory / self.STATE_FILE, json.dumps(state))
        if self.mirror is not None:
            # state.json last: it names the checkpoint, which must be whole before it does.
            new_config = [config_path] if not self._config_published else []
            ledger = self._ledger_path(number)
            self.mirror.publish([*new_config, ledger, path, self.directory / self.STATE_FILE])
            self._config_published = True
        self._forget_old(number)
        return os.fspath(path)

    def _fetch_published(self) -> None:
        """Brings the newest published checkpoint into the working copy when it is newer
        than the one there (another worker, or an earlier job, trained the key)."""
        published = self.mirror.read_json(self.directory / self.STATE_FILE)
        if published is None:
            return
        number = published["checkpoint"]
        local = _read_state(self.directory).get("checkpoint")
        self._config_published = True
        if local is not None and local >= number:
            return
        names = [self._path(number), self._ledger_path(number), self.directory / CONFIG_FILE]
        if not self.mirror.fetch([*names, self.directory / self.STATE_FILE]):
            raise FileNotFoundError(
                f"{self.mirror.url_of(self.directory)}: checkpoint {number} is named by "
                "state.json but not all of it is published (deleted by hand?)"
            )

    def number(self) -> int:
        """The number the next checkpoint gets: the minibatches processed, applied or
        skipped (the update step alone stays put when a non-finite minibatch is skipped),
        and always above the last one's (a drift reset changes the state between two
        minibatches): no checkpoint is ever written twice under one number, so a kill
        mid-write never spoils the newest."""
        processed = self.trainer.step + self.trainer.skipped_steps
        return processed if self.saved_number is None else max(processed, self.saved_number + 1)

    def _path(self, number: int) -> pathlib.Path:
        return self.directory / f"ckpt-{number}.npz"

    def _ledger_path(self, number: int) -> pathlib.Path:
        return self.directory / f"{self.LEDGER_PREFIX}{number}.json"

    def _newest_number(self) -> int | None:
        number = _read_state(self.directory).get("checkpoint")
        if number is None:  # a run from before state.json named its checkpoint
            prefix = tf.train.latest_checkpoint(os.fspath(self.directory))
            number = None if prefix is None else int(prefix.rsplit("-", 1)[1])
        return number

    def _forget_old(self, newest: int) -> None:
        """Deletes all but the newest `max_to_keep` checkpoints, with their ledgers."""
        if self._kept is None:
            on_disk = _numbers_on_disk(self.directory)
            if self.mirror is not None:  # with those other workers published
                on_disk |= _numbers(self.mirror.published(self.directory / "ckpt-*.npz"))
            self._kept = sorted(on_disk - {newest})
        self._kept.append(newest)
        while len(self._kept) > self.max_to_keep:
            old = self._kept.pop(0)
            for path in [
                self._path(old),
                self._ledger_path(old),
                # What TensorFlow's saver wrote for an older version.
                *self.directory.glob(f"ckpt-{old}.index"),
                *self.directory.glob(f"ckpt-{old}.data-*"),
            ]:
                path.unlink(missing_ok=True)
            if self.mirror is not None:
                self.mirror.withdraw([self._path(old), self._ledger_path(old)])


# The paths of the trainer's counters, which `state.json` repeats.
STEP_PATH = "trainer/_step"
EXAMPLES_SEEN_PATH = "trainer/_examples_seen"


# Variables added to the trainer after archives were first written, by the last part of
# their path, with the value they start at: an older archive without them restores that.
ADDED_VARIABLES = {"boost_excess": 0.0}

# Names of the session's own entries in a checkpoint archive.
SESSION_PREFIX = "session/"
SESSION_STATE = "session/state.json"


def _load_arrays(
    path: pathlib.Path, trainer: vae.Trainer
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Assigns the arrays of the checkpoint at `path` to `trainer`'s variables; returns the
    session's state and arrays saved with them."""
    variables = variables_by_path(trainer.checkpoint())
    with np.load(path) as arrays:
        trainer_names = {name for name in arrays.files if not name.startswith(SESSION_PREFIX)}
        differ = trainer_names ^ set(variables)
        added = {
            name: start
            for name in differ - trainer_names
            for suffix, start in ADDED_VARIABLES.items()
            if name.endswith("/" + suffix)
        }
        if differ - set(added):
            raise ValueError(
                f"checkpoint {path} does not hold this trainer's variables: "
                f"{sorted(differ - set(added))} differ"
            )
        for name, variable in variables.items():
            if name in added:
                logger.info("%s has no %s (an older version's): it starts afresh", path, name)
            variable.assign(added[name] if name in added else arrays[name])
        state = json.loads(str(arrays[SESSION_STATE])) if SESSION_STATE in arrays.files else {}
        session_arrays = {
            name.removeprefix(SESSION_PREFIX): arrays[name]
            for name in arrays.files
            if name.startswith(SESSION_PREFIX) and name != SESSION_STATE
        }
    return state, session_arrays


def _numbers_on_disk(directory: pathlib.Path) -> set[int]:
    """The numbers N of the `ckpt-N` checkpoints in `directory`, of either format."""
    return _numbers([*directory.glob("ckpt-*.npz"), *directory.glob("ckpt-*.index")])


def _numbers(paths: list[pathlib.Path]) -> set[int]:
    return {int(p.name.split(".")[0].removeprefix("ckpt-")) for p in paths}


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
    "step" and "examples_seen", read without restoring a model (on a store: the published
    one, one read)."""
    if is_remote(run_dir):
        data = read_object(f"{os.fspath(run_dir).rstrip('/')}/checkpoints/{key}/state.json")
        return {} if data is None else json.loads(data)
    return _read_state(pathlib.Path(run_dir) / "checkpoints" / key)


def _read_state(directory: pathlib.Path) -> dict[str, Any]:
    state = directory / CheckpointStore.STATE_FILE
    return json.loads(state.read_text()) if state.exists() else {}


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Removes what a writer killed mid-checkpoint left under `run_dir/checkpoints/`:
    half-written `*.npz.tmp` and `*.json.tmp` files, and TensorFlow's `<prefix>_temp/`
    directories (older versions). Only for
    the job that holds the run directory, before it trains (the last complete checkpoint
    is never touched). Returns what was removed."""
    removed = []
    for key_dir in pathlib.Path(run_dir, "checkpoints").glob("*"):
        for partial in [*key_dir.glob("*_temp"), *key_dir.glob("*.tmp")]:
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
