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
rename (`pipeline.train.snapshots`), and the model in use is swapped between chunks, never inside
one. Every output line names the version that scored it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import uuid

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.ingest import lifecycle
from pipeline.ingest.run_mirror import is_remote, newest_version, read_object, store_options
from pipeline.jobs.options import AEVBOptions, positive_float, positive_int, read_examples
from pipeline.jobs.run_lock import RunDirectoryLock
from pipeline.outputs.dead_letters import WriteDeadLetters
from pipeline.outputs.scores import WriteScores
from pipeline.score.anomalies import FlagAnomalies, Threshold
from pipeline.score.model_handler import (
    DEFAULT_MAX_MODELS,
    KeyedSnapshotModelHandler,
    RouteToModels,
    SnapshotModelHandler,
    WatchSnapshots,
)
from vae.config import VAEConfig
from vae.snapshot_format import (
    METADATA_PATH,
    read_metadata,
    resolve_version,
    version_directories,
)

__all__ = [
    "MODEL_UPDATES",
    "ScoreOptions",
    "ScoringJob",
    "build_scoring_pipeline",
    "models_config",
    "resolve_model_version",
    "run_scoring",
    "snapshot_config",
    "threshold_of",
]

MODEL_UPDATES = ("poll", "side-input")


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
    """The flags of `ScoreOptions`; `aevb score` requires --model or --models at parse time."""
    models = parser.add_mutually_exclusive_group(required=require_model)
    models.add_argument(
        "--model",
        help="a snapshot version directory, or a model directory (RUN_DIR/snapshots/<key>): "
        "its newest version, followed as new ones appear in streaming jobs",
    )
    models.add_argument(
        "--models",
        help="a model per key: RUN_DIR/snapshots, whose <key>/ scores that key's records "
        "(newest version, followed in streaming jobs); records of keys without one are "
        "dead letters (no_model)",
    )
    parser.add_argument(
        # Not --max-models-in-memory: Beam merges the flags of every PipelineOptions class,
        # and the training job's means something else.
        "--max-models-per-worker",
        type=positive_int,
        default=DEFAULT_MAX_MODELS,
        help="with --models: models a worker holds at once, the least recently used "
        "dropped (default %(default)s)",
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


@dataclasses.dataclass(frozen=True)
class ScoringJob:
    """The PCollections of a built scoring job."""

    scores: beam.PCollection  # the output dicts
    dead_letters: beam.PCollection
    job_id: str


def snapshot_config(model: str | os.PathLike) -> VAEConfig:
    """The config of the version `model` resolves to (from its metadata, else loaded)."""
    if is_remote(model):
        version = resolve_model_version(os.fspath(model))
        metadata = read_object(f"{version}/{METADATA_PATH.as_posix()}")
        if metadata is None:
            raise FileNotFoundError(f"{version} has no {METADATA_PATH.as_posix()}")
        return VAEConfig.from_dict(json.loads(metadata)["config"])
    version_dir = resolve_version(model)
    config = read_metadata(version_dir).get("config")
    if config is None:
        import vae

        return vae.load(version_dir).config
    return VAEConfig.from_dict(config)


def resolve_model_version(model: str) -> str:
    """The version directory `model` (a model or version directory) resolves to now."""
    if not is_remote(model):
        return os.fspath(resolve_version(model))
    version = newest_version(model)
    if version is None:
        raise FileNotFoundError(f"{model} has no published snapshot version")
    return version


def models_config(models_dir: str | os.PathLike) -> VAEConfig:
    """The config every key's newest snapshot in `models_dir` shares (the read path needs
    one input width and likelihood).

    Raises:
        FileNotFoundError: `models_dir` holds no model directory with a version.
        ValueError: the keys' models read different inputs.
    """
    configs = {}
    for model_dir in sorted(pathlib.Path(models_dir).glob("[!.]*")):
        if version_directories(model_dir):
            configs[model_dir.name] = snapshot_config(model_dir)
    if not configs:
        raise FileNotFoundError(f"{models_dir} holds no model directory with a snapshot")
    inputs = {(c.input_dim, c.likelihood) for c in configs.values()}
    if len(inputs) > 1:
        raise ValueError(
            f"the models in {models_dir} read different inputs (input_dim, likelihood): "
            f"{sorted(inputs)}; score them with --model one at a time"
        )
    return next(iter(configs.values()))


def threshold_of(options: ScoreOptions) -> Threshold:
    return Threshold(
        value=options.threshold,
        quantile=options.threshold_quantile,
        window=options.threshold_window,
    )


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
    if not score.model and not score.models:
        raise ValueError("--model or --models is required: RUN_DIR/snapshots/<key> or its parent")
    model = score.model or score.models
    if is_remote(model):
        if score.models or score.model_updates == "side-input":
            raise ValueError(
                f"{model}: on an object store, score with --model (a model's directory or "
                "version) and --model-updates poll"
            )
    else:
        model = os.path.abspath(model)
    config = models_config(model) if score.models else snapshot_config(model)
    threshold = threshold_of(score)
    out_dir = os.path.abspath(aevb.output)

    epochs = aevb.epochs
    if not streaming and epochs is None and aevb.max_examples is None:
        epochs = 1  # a batch job scores the split once
    chunks, letters = pipeline | "ReadExamples" >> read_examples(
        aevb,
        config.input_dim,
        config.likelihood,
        streaming=streaming,
        job_id=job_id,
        split=score.split,
        epochs=epochs,
    )
    follow = streaming and score.model_updates == "poll"
    if score.models:
        if score.model_updates == "side-input":
            raise ValueError(
                "--models follows each key's versions by polling: --model-updates poll"
            )
        chunks, unmodelled = chunks | "RouteToModels" >> RouteToModels(
            model, config.input_dim, config.likelihood
        )
        letters = (letters, unmodelled) | "AllDeadLetters" >> beam.Flatten()
        handler = KeyedSnapshotModelHandler(
            model,
            follow=follow,
            poll_interval_seconds=score.model_poll_seconds,
            max_models=score.max_models_per_worker,
        )
    else:
        # A batch job scores everything with the version that is newest now, on every worker.
        handler = SnapshotModelHandler(
            model if streaming else resolve_model_version(model),
            follow=follow,
            poll_interval_seconds=score.model_poll_seconds,
            store_options=store_options(options),
        )
    metadata = None
    if streaming and score.model_updates == "side-input":
        metadata = pipeline | "WatchSnapshots" >> WatchSnapshots(
            model, poll_interval_seconds=score.model_poll_seconds, job_id=job_id
        )
    scores = (
        chunks
        | "RunInference" >> RunInference(handler, model_metadata_pcoll=metadata)
        | "FlagAnomalies" >> FlagAnomalies(threshold)
        | "WriteScores" >> WriteScores(out_dir)
    )
    dead_letters = letters | "WriteDeadLetters" >> WriteDeadLetters(
        out_dir, model_key=aevb.model_key
    )
    return ScoringJob(scores=scores, dead_letters=dead_letters, job_id=job_id)


def run_scoring(options: PipelineOptions) -> beam.runners.runner.PipelineResult | None:
    """Runs the scoring job until its input ends or Ctrl-C (the first one drains).

    Raises:
        RunDirectoryBusy: another job writes to the same --output (`pipeline.jobs.run_lock`).
    """
    output = os.path.abspath(options.view_as(AEVBOptions).output)
    with RunDirectoryLock(output), lifecycle.cross_language_services(options):
        pipeline = beam.Pipeline(options=options)
        job = build_scoring_pipeline(pipeline, options)
        return lifecycle.run_draining_on_interrupt(pipeline, job.job_id)
