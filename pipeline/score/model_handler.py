"""RunInference over aevb snapshots, following new versions as a streaming job runs.

`SnapshotModelHandler` is a Beam `ModelHandler` over `tf.saved_model.load` (through
`vae.load`; Beam's own TensorFlow handler cannot load SavedModels with TF >= 2.16,
apache/beam#30616). It takes a version directory or a model directory; with a model
directory in a streaming job it follows the newest version:

- polling (``follow``): the loaded model checks the model directory at most every
  ``poll_interval_seconds`` and, when a newer version is there, loads it and switches
  between two chunks. Needs only that the workers see the model directory.
- Beam's model-update side input: `WatchSnapshots` emits `ModelMetadata` for each new
  version and RunInference reloads through `SnapshotModelHandler.update_model_path`, as
  with Beam's `WatchFilePattern`. It needs a runner that feeds unbounded side inputs to a
  running stage (such as Dataflow or Flink).

Either way a record is only ever scored by a complete version: versions appear by atomic
rename (`pipeline.train.snapshots`), and the model in use is swapped between chunks, never
inside one.

`KeyedSnapshotModelHandler` scores each key's chunks with that key's own model
(`RUN_DIR/snapshots/<key>/`, followed by polling), holding a bounded number per worker;
`RouteToModels` turns the records of keys without a model into ``no_model`` dead letters.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.ml.inference.base import ModelHandler, ModelMetadata, PredictionResult
from apache_beam.transforms import trigger, userstate, window

from pipeline.ingest.dead_letter import (
    DEAD_LETTER_TAG,
    DeadLetter,
    record_locator,
    row_excerpt,
)
from pipeline.ingest.decode import KeyedChunk
from pipeline.ingest.run_mirror import (
    fetch_version,
    is_remote,
    newest_version,
    published_versions,
    use_store_options,
)
from pipeline.ingest.sources import WatchFiles
from vae.snapshot_format import (
    SAVED_MODEL_FILE,
    read_metadata,
    version_directories,
    version_number,
)

__all__ = ["KeyedSnapshotModelHandler", "RouteToModels", "SnapshotModelHandler", "WatchSnapshots"]

# Models a worker holds at once when scoring with a model per key.
DEFAULT_MAX_MODELS = 64

logger = logging.getLogger(__name__)


class _FollowedModel:
    """The `vae.LoadedModel` to score with; with `follow`, the newest version of its directory.

    Shared by the DoFn threads of a worker (RunInference caches one per process), hence the
    lock. A version that fails to load (e.g. pruned between listing and loading) is logged
    and the current model kept; the next poll tries again.
    """

    def __init__(
        self,
        path: str,
        follow: bool,
        poll_interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import vae

        self._load = vae.load
        self._clock = clock
        self._interval = poll_interval_seconds
        self._lock = threading.Lock()
        self._next_poll = clock() + poll_interval_seconds
        if is_remote(path):
            # On a store: published versions, fetched into this process's cache to load.
            self._model_dir = path
            newest = newest_version(path)
            if newest is None:
                raise FileNotFoundError(f"{path} has no published snapshot version")
            self._follow = follow and newest != path.rstrip("/")
            self._model = self._load(fetch_version(newest, _version_cache()))
        else:
            self._model_dir = pathlib.Path(path)
            self._follow = follow and not (self._model_dir / SAVED_MODEL_FILE).exists()
            self._model = self._load(path)
        logger.info("scoring with %s", self._model.path)

    def current(self):
        if not self._follow:
            return self._model
        with self._lock:
            if self._clock() >= self._next_poll:
                self._next_poll = self._clock() + self._interval
                self._switch_to_newest()
            return self._model

    def _switch_to_newest(self) -> None:
        if isinstance(self._model_dir, str):
            versions = published_versions(self._model_dir)
        else:
            versions = version_directories(self._model_dir)
        if not versions or version_number(versions[-1]) <= (self._model.version or 0):
            return
        try:
            newest = versions[-1]
            if isinstance(newest, str):
                newest = fetch_version(newest, _version_cache())
            model = self._load(newest)
        except Exception as error:  # pruned meanwhile, unreadable, ...: keep scoring
            logger.warning(
                "cannot load %s, keeping version %s: %s", versions[-1], self._model.version, error
            )
            return
        logger.info("switching from version %s to %s", self._model.version, model.version)
        self._model = model


def _version_cache() -> pathlib.Path:
    """Where this process keeps the versions it fetched from a store (removed at exit)."""
    global _fetched_versions
    with _fetched_versions_lock:
        if _fetched_versions is None:
            _fetched_versions = pathlib.Path(tempfile.mkdtemp(prefix="aevb-versions-"))
            atexit.register(shutil.rmtree, _fetched_versions, ignore_errors=True)
        return _fetched_versions


_fetched_versions: pathlib.Path | None = None
_fetched_versions_lock = threading.Lock()


class _ChunkModelHandler(ModelHandler[KeyedChunk, PredictionResult, Any]):
    """What both handlers share: chunks come batched from the sources, so RunInference's own
    batching is skipped, and their metrics go to one namespace."""

    def should_skip_batching(self) -> bool:
        return True

    def get_num_bytes(self, batch: KeyedChunk) -> int:
        return int(batch.rows.nbytes)

    def get_metrics_namespace(self) -> str:
        return "aevb_score"


class SnapshotModelHandler(_ChunkModelHandler):
    """RunInference over aevb snapshots: a `KeyedChunk` in, one `PredictionResult` per row out.

    ``PredictionResult.example`` is ``(key, source, position)``, ``.inference`` is
    ``{"score": float32, "latent_mean": float32 [J]}`` (from one call of the
    ``serving_default`` signature: score = -elbo), ``.model_id`` the version directory
    that scored the row. Chunks come batched from the sources, so RunInference's own
    batching is skipped.

    Args:
        model_path: a version directory, or a model directory: its newest version, and with
            ``follow`` every newer one as it appears (checked every
            ``poll_interval_seconds``). Either may be on an object store (``s3://...``,
            reached with ``store_options``, `pipeline.ingest.run_mirror.store_options`):
            published versions are fetched into a temporary directory and loaded from it.
    """

    def __init__(
        self,
        model_path: str,
        follow: bool = False,
        poll_interval_seconds: float = 2.0,
        store_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._model_path = os.fspath(model_path)
        self._follow = follow
        self._poll_interval = poll_interval_seconds
        self._store_options = dict(store_options or {})

    def load_model(self) -> _FollowedModel:
        if is_remote(self._model_path):
            use_store_options(self._store_options)
        return _FollowedModel(self._model_path, self._follow, self._poll_interval)

    def update_model_path(self, model_path: str | None = None) -> None:
        # Called by RunInference with each version its model-metadata side input names:
        # that version is then loaded, and not followed past (the side input moves it on).
        if model_path:
            self._model_path = model_path
            self._follow = False

    def run_inference(
        self,
        batch: KeyedChunk,
        model: _FollowedModel,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        return _predictions(batch, model.current())  # one version for the whole chunk


def _predictions(batch: KeyedChunk, loaded) -> list[PredictionResult]:
    """One `PredictionResult` per row of `batch`, scored by the `vae.LoadedModel` `loaded`."""
    outputs = loaded.predict(batch.rows)
    scores = -outputs["elbo"]
    model_id = os.fspath(loaded.path)
    positions = batch.positions
    return [
        PredictionResult(
            (batch.key, batch.source, None if positions is None else int(positions[i])),
            {"score": scores[i], "latent_mean": outputs["latent_mean"][i]},
            model_id,
        )
        for i in range(len(batch.rows))
    ]


class _ModelsByKey:
    """Each key's `_FollowedModel`, loaded on its key's first chunk; at most `max_models` of
    them, the least recently used dropped (and loaded again when its key comes back)."""

    def __init__(
        self, models_dir: str, follow: bool, poll_interval_seconds: float, max_models: int
    ) -> None:
        self._models_dir = pathlib.Path(models_dir)
        self._follow = follow
        self._interval = poll_interval_seconds
        self._max_models = max_models
        self._models: collections.OrderedDict[str, _FollowedModel] = collections.OrderedDict()
        self._lock = threading.Lock()

    def current(self, key: str):
        with self._lock:
            followed = self._models.get(key)
            if followed is None:
                followed = _FollowedModel(
                    os.fspath(self._models_dir / key), self._follow, self._interval
                )
                self._models[key] = followed
            self._models.move_to_end(key)
            while len(self._models) > self._max_models:
                self._models.popitem(last=False)
        return followed.current()


class KeyedSnapshotModelHandler(_ChunkModelHandler):
    """RunInference with a model per key, as Beam's `KeyedModelHandler` would: a chunk of key
    K is scored by the newest snapshot in ``models_dir/K`` (`RUN_DIR/snapshots` of a
    training job), followed as new versions appear with ``follow``. A worker holds at most
    ``max_models`` models. Records of keys without a model are routed away beforehand
    (`RouteToModels`). Outputs as `SnapshotModelHandler`'s.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike,
        follow: bool = False,
        poll_interval_seconds: float = 2.0,
        max_models: int = DEFAULT_MAX_MODELS,
    ) -> None:
        super().__init__()
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self._models_dir = os.fspath(models_dir)
        self._follow = follow
        self._poll_interval = poll_interval_seconds
        self._max_models = max_models

    def load_model(self) -> _ModelsByKey:
        return _ModelsByKey(self._models_dir, self._follow, self._poll_interval, self._max_models)

    def run_inference(
        self,
        batch: KeyedChunk,
        model: _ModelsByKey,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        return _predictions(batch, model.current(batch.key))


class _RouteToModelsFn(beam.DoFn):
    def __init__(self, models_dir: str, input_dim: int, likelihood: str) -> None:
        self._models_dir = pathlib.Path(models_dir)
        self._inputs = (input_dim, likelihood)

    def setup(self) -> None:
        # Keys seen with a fitting model: versions are pruned but never all, so they keep one.
        self._known: set[str] = set()

    def process(self, chunk: KeyedChunk) -> Iterator[Any]:
        if chunk.key in self._known:
            yield chunk
            return
        versions = version_directories(self._models_dir / chunk.key)
        config = read_metadata(versions[-1]).get("config", {}) if versions else {}
        inputs = (config.get("input_dim"), config.get("likelihood"))
        if versions and inputs == self._inputs:
            self._known.add(chunk.key)
            yield chunk
            return
        if versions:  # a model the job's records do not fit: scoring it would fail
            detail = (
                f"the model of key {chunk.key!r} reads {inputs}, the job's records are "
                f"{self._inputs} (input_dim, likelihood)"
            )
        else:
            detail = f"no snapshot of model key {chunk.key!r} in {self._models_dir}"
        for index in range(len(chunk)):
            position = None if chunk.positions is None else int(chunk.positions[index])
            unit = "row" if chunk.positions is None else "record"
            record = record_locator(unit, position, row_excerpt(chunk.rows[index]))
            letter = DeadLetter(chunk.source, "no_model", detail, record, position, chunk.origin)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)


class RouteToModels(beam.PTransform):
    """`KeyedChunk`s -> those whose key has a model in ``models_dir`` that reads the job's
    records (``input_dim``, ``likelihood``; main output), and one ``no_model`` dead letter
    per record of the others (`DEAD_LETTER_TAG`). A key whose first model appears later is
    scored from then on."""

    def __init__(self, models_dir: str | os.PathLike, input_dim: int, likelihood: str) -> None:
        super().__init__()
        self._fn = _RouteToModelsFn(os.fspath(models_dir), input_dim, likelihood)

    def expand(self, chunks: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        return chunks | "KeysWithModels" >> beam.ParDo(self._fn).with_outputs(
            DEAD_LETTER_TAG, main="scored"
        )


class _NewestVersionsFn(beam.DoFn):
    """Keyed ``(model_dir, version_dir)`` -> ModelMetadata of versions newer than any before.

    A version is skipped when a newer complete one is already on disk (it will come too),
    so a watch that starts on a directory of several versions emits only the newest.
    """

    NEWEST = userstate.ReadModifyWriteStateSpec("newest", VarIntCoder())

    def process(
        self, element: tuple[str, str], newest=beam.DoFn.StateParam(NEWEST)
    ) -> Iterator[ModelMetadata]:
        model_dir, version_dir = element
        version = version_number(version_dir)
        if version is None or version <= (newest.read() or 0):
            return
        on_disk = version_directories(model_dir)
        if on_disk and int(on_disk[-1].name) > version:
            return
        newest.write(version)
        yield ModelMetadata(model_id=version_dir, model_name=str(version))


class WatchSnapshots(beam.PTransform):
    """PBegin -> `ModelMetadata` of each new version of a model directory (unbounded).

    Beam's model-update side input for RunInference (``model_metadata_pcoll``), like Beam's
    `WatchFilePattern` but on the snapshot layout: a version is announced when its
    ``saved_model.pb`` is seen (versions appear complete, by rename), newest only, in the
    global window with a trigger per element.
    """

    def __init__(
        self,
        model_dir: str,
        poll_interval_seconds: float = 2.0,
        job_id: str | None = None,
        stop_after_seconds: float | None = None,
    ) -> None:
        super().__init__()
        self._model_dir = os.fspath(model_dir)
        self._watch = WatchFiles(
            os.path.join(self._model_dir, "*", SAVED_MODEL_FILE),
            poll_interval_seconds=poll_interval_seconds,
            job_id=job_id,
            stop_after_seconds=stop_after_seconds,
        )

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        model_dir = self._model_dir
        return (
            pbegin
            | "WatchVersions" >> self._watch
            | "KeyByModel" >> beam.Map(lambda path: (model_dir, os.path.dirname(path)))
            | "NewestOnly" >> beam.ParDo(_NewestVersionsFn())
            | "EveryVersion"
            >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
        )
