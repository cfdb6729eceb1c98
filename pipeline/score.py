"""The scoring job: records -> RunInference on the newest snapshot -> scores and anomaly flags.

    read (dataset | files | kafka)                 the sources of `aevb train`
      -> decode and validate  --(bad records)--> OUT_DIR/dead_letter/*.jsonl
      -> RunInference(SnapshotModelHandler)       negative bound and q(z|x) mean per record
      -> FlagAnomalies                            fixed threshold or a quantile of recent scores
      -> OUT_DIR/scores-<host>-<pid>.jsonl         one JSON object per record

Each output line: ``key``, ``source`` and ``position`` (where the record came from, as in
dead letters; ``position`` is null for data-set replays and Kafka), ``score`` (the negative
bound in nats, the anomaly score), ``latent_mean``, ``model_version``, ``anomaly``
(null while a quantile threshold has too few recent scores), ``threshold`` and
``scored_unix_seconds``.

The model: `SnapshotModelHandler` is a Beam `ModelHandler` over `tf.saved_model.load`
(through `vae.load`; Beam's own TensorFlow handler cannot load SavedModels with TF >= 2.16,
apache/beam#30616). It takes a version directory or a model directory; with a model
directory in a streaming job it follows the newest version:

- ``--model-updates poll`` (default): the loaded model checks the model directory at most
  every ``--model-poll-seconds`` and, when a newer version is there, loads it and switches
  between two chunks. Needs only that the workers see the model directory (a local or
  mounted directory, like the output); tested on FnApiRunner, batch and streaming.
- ``--model-updates side-input``: Beam's model-update side input -- `WatchSnapshots` emits
  `ModelMetadata` for each new version and RunInference reloads through
  `SnapshotModelHandler.update_model_path`, as with Beam's `WatchFilePattern`. It needs a
  runner that feeds unbounded side inputs to a running stage (such as Dataflow or Flink;
  not tested here). The local FnApiRunner holds a stage back until its side inputs are
  complete, so it would score nothing until the watch ends (and Beam's own
  `WatchFilePattern` fails there with "more than one element accessed as a singleton
  view"); `aevb score` refuses that combination.

Scores are appended to per-worker files (like dead letters), not written with windowed
`fileio`, so the same job works in batch and streaming on FnApiRunner; OUT_DIR must be a
local or mounted directory on every worker.

Either way a record is only ever scored by a complete version: versions appear by atomic
rename (`pipeline.snapshots`), and the model in use is swapped between chunks, never inside
one. Every output line names the version that scored it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.coders import VarIntCoder
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import (
    ModelHandler,
    ModelMetadata,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms import trigger, userstate, window

from pipeline import lifecycle
from pipeline.dead_letter import DEAD_LETTER_TAG, DeadLetter, WriteDeadLetters
from pipeline.decode import DecodeRecords, ValidateChunks, decode_file
from pipeline.options import AEVBOptions, positive_float, positive_int
from pipeline.snapshots import read_metadata
from pipeline.sources import ReplayDataset, WatchFiles, kafka_source, parse_source, read_files
from vae.config import VAEConfig
from vae.versions import SAVED_MODEL_FILE, resolve_version, version_directories, version_number

__all__ = [
    "MODEL_UPDATES",
    "ScoreChunk",
    "ScoreOptions",
    "ScoringJob",
    "SnapshotModelHandler",
    "Threshold",
    "WatchSnapshots",
    "build_scoring_pipeline",
    "read_scores",
    "run_scoring",
    "snapshot_config",
]

logger = logging.getLogger(__name__)

MODEL_UPDATES = ("poll", "side-input")
SCORES_PREFIX = "scores"
_DECIMALS = 6  # of scores and latent means in the output: float32 has ~7 significant digits


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds arrays
class ScoreChunk:
    """Valid rows of one model key from one source, the unit RunInference scores at once."""

    key: str
    rows: np.ndarray  # float32 [k, D]
    source: str
    positions: np.ndarray | None = None  # of each row, as dead letters count them

    def __len__(self) -> int:
        return len(self.rows)


class ScoreOptions(PipelineOptions):
    """The flags of `aevb score` that `AEVBOptions` (sources, data, output) does not have."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_score_flags(parser)


def quantile(text: str) -> float:
    value = positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_score_flags(parser: argparse.ArgumentParser, require_model: bool = False) -> None:
    """The flags of `ScoreOptions`; `aevb score` requires --model at parse time."""
    parser.add_argument(
        "--model",
        required=require_model,
        help="a snapshot version directory, or a model directory (RUN_DIR/snapshots/<key>): "
        "its newest version, followed as new ones appear in streaming jobs",
    )
    parser.add_argument(
        "--split",
        choices=("train", "test"),
        default="test",
        help="which split of --dataset the dataset source replays (default test)",
    )
    parser.add_argument(
        "--threshold", type=float, help="flag records whose score (nats) exceeds this"
    )
    parser.add_argument(
        "--threshold-quantile",
        type=quantile,
        help="flag records scoring above this quantile of the recent scores of their key",
    )
    parser.add_argument(
        "--threshold-window",
        type=positive_int,
        default=1000,
        help="recent scores per key for --threshold-quantile (default 1000); records are "
        "not flagged (anomaly null) until that many were scored",
    )
    parser.add_argument(
        "--model-updates",
        choices=MODEL_UPDATES,
        default="poll",
        help="how a streaming job follows new snapshot versions: poll (default, any runner) "
        "or side-input (Beam's model-update side input; runners with streaming side inputs)",
    )
    parser.add_argument(
        "--model-poll-seconds",
        type=positive_float,
        default=2.0,
        help="how often the model directory is checked for a new version (default 2)",
    )


# --- Thresholds -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A fixed `value`, or the `quantile` of the last `window` scores of a key (or none)."""

    value: float | None = None
    quantile: float | None = None
    window: int = 1000

    def __post_init__(self) -> None:
        if self.value is not None and self.quantile is not None:
            raise ValueError("give a fixed threshold or a threshold quantile, not both")
        if self.quantile is not None and not 0 < self.quantile < 1:
            raise ValueError(f"threshold quantile must be between 0 and 1, got {self.quantile}")
        if self.window < 1:
            raise ValueError(f"threshold window must be positive, got {self.window}")


class _FlagAnomaliesFn(beam.DoFn):
    """PredictionResult per record -> the output dict, with the anomaly flag.

    The recent scores of each key are kept in the DoFn instance (per worker thread), so
    with several workers each judges against the scores it saw itself.
    """

    def __init__(self, threshold: Threshold) -> None:
        self._threshold = threshold

    def setup(self) -> None:
        self._recent: dict[str, collections.deque] = {}

    def process(self, result: PredictionResult) -> Iterator[dict[str, Any]]:
        key, source, position = result.example
        score = float(result.inference["score"])
        limit = self._limit(key, score)
        version_dir = pathlib.Path(result.model_id)
        yield {
            "key": key,
            "source": source,
            "position": position,
            "score": round(score, _DECIMALS),
            "latent_mean": np.round(
                np.asarray(result.inference["latent_mean"], np.float64), _DECIMALS
            ).tolist(),
            "model_version": version_number(version_dir),
            "anomaly": None if limit is None else bool(score > limit),
            "threshold": None if limit is None else round(float(limit), _DECIMALS),
            "scored_unix_seconds": round(time.time(), 3),
        }

    def _limit(self, key: str, score: float) -> float | None:
        """The threshold this score is judged by (before it joins the recent scores)."""
        if self._threshold.value is not None:
            return self._threshold.value
        if self._threshold.quantile is None:
            return None
        recent = self._recent.setdefault(key, collections.deque(maxlen=self._threshold.window))
        limit = None
        if len(recent) == recent.maxlen:
            limit = float(
                np.quantile(np.fromiter(recent, float, len(recent)), self._threshold.quantile)
            )
        recent.append(score)
        return limit


# --- The model ------------------------------------------------------------------------------


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
        self._model_dir = pathlib.Path(path)
        self._follow = follow and not (self._model_dir / SAVED_MODEL_FILE).exists()
        self._interval = poll_interval_seconds
        self._lock = threading.Lock()
        self._model = self._load(path)
        self._next_poll = clock() + poll_interval_seconds
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
        versions = version_directories(self._model_dir)
        if not versions or int(versions[-1].name) <= (self._model.version or 0):
            return
        try:
            model = self._load(versions[-1])
        except Exception as error:  # pruned meanwhile, unreadable, ...: keep scoring
            logger.warning(
                "cannot load %s, keeping version %s: %s", versions[-1], self._model.version, error
            )
            return
        logger.info("switching from version %s to %s", self._model.version, model.version)
        self._model = model


class SnapshotModelHandler(ModelHandler[ScoreChunk, PredictionResult, _FollowedModel]):
    """RunInference over aevb snapshots: a `ScoreChunk` in, one `PredictionResult` per row out.

    ``PredictionResult.example`` is ``(key, source, position)``, ``.inference`` is
    ``{"score": float32, "latent_mean": float32 [J]}`` (from one call of the
    ``serving_default`` signature: score = -elbo), ``.model_id`` the version directory
    that scored the row. Chunks come batched from the sources, so RunInference's own
    batching is skipped.

    Args:
        model_path: a version directory, or a model directory: its newest version, and with
            ``follow`` every newer one as it appears (checked every
            ``poll_interval_seconds``).
    """

    def __init__(
        self, model_path: str, follow: bool = False, poll_interval_seconds: float = 2.0
    ) -> None:
        super().__init__()
        self._model_path = os.fspath(model_path)
        self._follow = follow
        self._poll_interval = poll_interval_seconds

    def load_model(self) -> _FollowedModel:
        return _FollowedModel(self._model_path, self._follow, self._poll_interval)

    def update_model_path(self, model_path: str | None = None) -> None:
        # Called by RunInference with each version its model-metadata side input names:
        # that version is then loaded, and not followed past (the side input moves it on).
        if model_path:
            self._model_path = model_path
            self._follow = False

    def run_inference(
        self,
        batch: ScoreChunk,
        model: _FollowedModel,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        loaded = model.current()  # one version for the whole chunk
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

    def should_skip_batching(self) -> bool:
        return True

    def get_num_bytes(self, batch: ScoreChunk) -> int:
        return int(batch.rows.nbytes)

    def get_metrics_namespace(self) -> str:
        return "aevb_score"


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


# --- Sources and output ---------------------------------------------------------------------


class _DecodeFilesWithPositionsFn(beam.DoFn):
    """File path -> `ScoreChunk`s with the rows' positions; dead letters tagged."""

    def __init__(self, input_dim: int, likelihood: str, default_key: str) -> None:
        self._input_dim = input_dim
        self._likelihood = likelihood
        self._default_key = default_key

    def process(self, path: str) -> Iterator[Any]:
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read()
        except OSError as exc:
            letter = DeadLetter(path, "unparseable_file", f"cannot read: {exc}", "file: (unread)")
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)
            return
        items = decode_file(
            path, data, self._input_dim, self._likelihood, self._default_key, with_positions=True
        )
        for item in items:
            if isinstance(item, DeadLetter):
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, item)
            else:
                key, rows, positions = item
                yield ScoreChunk(key, rows, path, positions)


_write_lock = threading.Lock()


class _WriteScoresFn(beam.DoFn):
    """Appends output dicts to ``OUT_DIR/scores-<host>-<pid>.jsonl``, flushed every bundle."""

    def __init__(self, out_dir: str) -> None:
        self._out_dir = out_dir

    def setup(self) -> None:
        self._file = None

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with _write_lock:
            if self._file is None:
                os.makedirs(self._out_dir, exist_ok=True)
                name = f"{SCORES_PREFIX}-{socket.gethostname()}-{os.getpid()}.jsonl"
                self._file = open(  # noqa: SIM115 -- open for the worker's lifetime
                    os.path.join(self._out_dir, name), "a", encoding="utf-8"
                )
            self._file.write(line)
        yield record

    def finish_bundle(self) -> None:
        with _write_lock:
            if self._file is not None:
                self._file.flush()

    def teardown(self) -> None:
        with _write_lock:
            if getattr(self, "_file", None) is not None:
                self._file.close()
                self._file = None


# --- The job --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScoringJob:
    """The PCollections of a built scoring job."""

    scores: beam.PCollection  # the output dicts
    dead_letters: beam.PCollection
    job_id: str


def snapshot_config(model: str | os.PathLike) -> VAEConfig:
    """The config of the version `model` resolves to (from its metadata, else loaded)."""
    version_dir = resolve_version(model)
    config = read_metadata(version_dir).get("config")
    if config is None:
        import vae

        return vae.load(version_dir).config
    return VAEConfig.from_dict(config)


def threshold_of(options: ScoreOptions) -> Threshold:
    return Threshold(
        value=options.threshold,
        quantile=options.threshold_quantile,
        window=options.threshold_window,
    )


def _examples(
    pipeline: beam.Pipeline,
    aevb: AEVBOptions,
    split: str,
    config: VAEConfig,
    streaming: bool,
    job_id: str,
) -> tuple[beam.PCollection, beam.PCollection]:
    """(ScoreChunks, dead letters) from the source the flags name."""
    kind, argument = parse_source(aevb.source)
    input_dim, likelihood = config.input_dim, config.likelihood
    if kind == "files":
        chunks, letters = (
            pipeline
            | "ReadFiles"
            >> read_files(
                argument,
                streaming=streaming,
                job_id=job_id,
                poll_interval_seconds=aevb.poll_interval_seconds,
            )
            | "Decode"
            >> beam.ParDo(
                _DecodeFilesWithPositionsFn(input_dim, likelihood, aevb.model_key)
            ).with_outputs(DEAD_LETTER_TAG, main="chunks")
        )
        return chunks, letters
    if kind == "kafka":
        decoded = (
            pipeline
            | "ReadKafka" >> kafka_source(argument, max_examples=aevb.max_examples)
            | "Decode" >> DecodeRecords(input_dim, likelihood, aevb.model_key, source=aevb.source)
        )
        source = aevb.source
        chunks = decoded[None] | "AsChunks" >> beam.MapTuple(
            lambda key, rows: ScoreChunk(key, rows, source)
        )
        return chunks, decoded[DEAD_LETTER_TAG]
    data = None
    if split == "test":
        from pipeline.datasets import load_dataset

        data = load_dataset(aevb.dataset, aevb.data_dir, fallback=aevb.fallback_dataset).test
    epochs = aevb.epochs
    if not streaming and epochs is None and aevb.max_examples is None:
        epochs = 1  # a batch job scores the split once
    source = f"dataset:{aevb.dataset}/{split}"
    chunks, letters = (
        pipeline
        | "ReplayDataset"
        >> ReplayDataset(
            aevb.dataset,
            data=data,
            data_dir=aevb.data_dir,
            fallback=aevb.fallback_dataset,
            model_key=aevb.model_key,
            chunk_size=aevb.chunk_size,
            max_examples=aevb.max_examples,
            epochs=epochs,
            streaming=streaming,
            examples_per_second=aevb.examples_per_second,
            seed=aevb.seed,
            job_id=job_id,
        )
        | "Validate"
        >> beam.ParDo(ValidateChunks(input_dim, likelihood, source=source)).with_outputs(
            DEAD_LETTER_TAG, main="chunks"
        )
    )
    chunks = chunks | "AsChunks" >> beam.MapTuple(lambda key, rows: ScoreChunk(key, rows, source))
    return chunks, letters


def build_scoring_pipeline(
    pipeline: beam.Pipeline, options: PipelineOptions, job_id: str | None = None
) -> ScoringJob:
    """Applies the scoring job to `pipeline` (see the module docstring).

    Raises:
        ValueError: no --model or --output, a bad --source, or both threshold kinds.
        FileNotFoundError: --model has no snapshot.
    """
    job_id = job_id or uuid.uuid4().hex
    aevb = options.view_as(AEVBOptions)
    score = options.view_as(ScoreOptions)
    streaming = options.view_as(StandardOptions).streaming
    if not score.model:
        raise ValueError("--model is required: a snapshot or RUN_DIR/snapshots/<key>")
    model = os.path.abspath(score.model)
    config = snapshot_config(model)
    threshold = threshold_of(score)
    out_dir = os.path.abspath(aevb.output)

    chunks, letters = _examples(pipeline, aevb, score.split, config, streaming, job_id)
    follow = streaming and score.model_updates == "poll"
    # A batch job scores everything with the version that is newest now, on every worker.
    handler = SnapshotModelHandler(
        model if streaming else os.fspath(resolve_version(model)),
        follow=follow,
        poll_interval_seconds=score.model_poll_seconds,
    )
    metadata = None
    if streaming and score.model_updates == "side-input":
        metadata = pipeline | "WatchSnapshots" >> WatchSnapshots(
            model, poll_interval_seconds=score.model_poll_seconds, job_id=job_id
        )
    scores = (
        chunks
        | "RunInference" >> RunInference(handler, model_metadata_pcoll=metadata)
        | "FlagAnomalies" >> beam.ParDo(_FlagAnomaliesFn(threshold))
        | "WriteScores" >> beam.ParDo(_WriteScoresFn(out_dir))
    )
    dead_letters = letters | "WriteDeadLetters" >> WriteDeadLetters(
        out_dir, model_key=aevb.model_key
    )
    return ScoringJob(scores=scores, dead_letters=dead_letters, job_id=job_id)


def run_scoring(options: PipelineOptions) -> beam.runners.runner.PipelineResult | None:
    """Runs the scoring job until its input ends or Ctrl-C (the first one drains)."""
    pipeline = beam.Pipeline(options=options)
    job = build_scoring_pipeline(pipeline, options)
    return lifecycle.run_draining_on_interrupt(pipeline, job.job_id)


def read_scores(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every output line of a scoring job's OUT_DIR (all workers' files)."""
    records = []
    for path in sorted(pathlib.Path(out_dir).glob(f"{SCORES_PREFIX}-*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            records.extend(json.loads(line) for line in handle if line.endswith("\n"))
    return records
