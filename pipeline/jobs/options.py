"""The jobs' flags, a Beam `PipelineOptions` subclass, and what they describe: the model
config, the read path, the cadence and the drift detector.

They combine with Beam's own (`--runner`, `--streaming`, `--direct_num_workers`, ...) in
one command line, and `aevb train` parses them strictly first so that a bad value is one
clear error line instead of a job that fails later on a worker.

>>> options = AEVBOptions(["--dataset", "frey", "--hidden", "200", "--streaming"])
>>> options.dataset, options.hidden, options.batch_size
('frey', 200, 100)
>>> model_config(options).likelihood, model_config(options).input_dim
('gaussian', 560)
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import TYPE_CHECKING, Any, NoReturn

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.ingest.datasets import (
    DATASETS,
    CorruptDataError,
    Dataset,
    DataUnavailableError,
    dataset_shape,
    load_dataset,
)
from pipeline.ingest.decode import DEFAULT_MAX_FILE_BYTES
from pipeline.ingest.read import DatasetReplay, ReadExamples
from pipeline.ingest.run_mirror import is_remote
from pipeline.ingest.scenarios import SCENARIOS, ScenarioSpec
from pipeline.ingest.sources import DEFAULT_SETTLE_SECONDS
from pipeline.outputs.metrics import PER_KEY_METRICS
from pipeline.train import drift
from pipeline.train.adaptation import (
    ADAPTATIONS,
    DEFAULT_HALF_LIFE_EXAMPLES,
    DEFAULT_LEARNING_RATES,
    adaptation_fields,
)
from vae.config import LIKELIHOODS, PRECISIONS, VAEConfig

if TYPE_CHECKING:
    from pipeline.train.precision import PrecisionChoice
    from pipeline.train.session import Cadence

DEFAULT_RUNNER = "FnApiRunner"
DEFAULT_CHUNK_SIZE = 1000


class UsageError(Exception):
    """A flag or path the user gave cannot work; reported in one line, exit status 2."""


USAGE_ERROR = 2


class FlagParser(argparse.ArgumentParser):
    """An `argparse` parser whose errors are one line naming the problem, exit status 2."""

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line that names the problem reads better.
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def writable_directory(path: pathlib.Path, flag: str) -> pathlib.Path:
    """`path`, created if need be; UsageError naming `flag` when it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot create directory ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: directory is not writable")
    return path


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def _number(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_model_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Flags of the model and of its optimiser; returns their actions (see `model_flags`)."""
    return [
        parser.add_argument("--latent-dim", type=positive_int, default=20, help="J (default 20)"),
        parser.add_argument("--hidden", type=positive_int, default=500, help="hidden units (500)"),
        parser.add_argument("--batch-size", type=positive_int, default=100, help="M (default 100)"),
        parser.add_argument(
            "--learning-rate",
            type=positive_float,
            help="global step size (default 0.02 for Adagrad, the paper's; 0.001 for rmsprop/adam)",
        ),
        parser.add_argument("--samples-per-example", type=positive_int, default=1, help="L (1)"),
        parser.add_argument(
            "--estimator",
            choices=("analytic_kl", "monte_carlo_kl", "A", "B"),
            default="analytic_kl",
            help="SGVB estimator: B = analytic_kl (default), A = monte_carlo_kl",
        ),
        parser.add_argument(
            "--weight-decay",
            type=non_negative_float,
            default=0.0,
            help="MAP prior N(0, I) on the parameters, as 1/N for N examples (default off)",
        ),
        parser.add_argument("--seed", type=non_negative_int, default=0),
        parser.add_argument(
            "--method",
            choices=("aevb", "wake-sleep"),
            default="aevb",
            help="the learning algorithm: aevb (the paper's, default) or wake-sleep (its "
            "baseline: decoder on z ~ q(z|x), encoder on the decoder's dreams; the same bound "
            "reported)",
        ),
        parser.add_argument(
            "--precision",
            choices=(*PRECISIONS, "auto"),
            default="float32",
            help="the training step's matrix products: float32 (default), bfloat16 (mixed "
            "precision: float32 parameters, optimiser state and bound), or auto (bfloat16 "
            "where this CPU has bfloat16 matrix instructions and its step measures faster)",
        ),
        parser.add_argument(
            "--adaptation",
            choices=ADAPTATIONS,
            default="none",
            help="how the optimiser follows a drifting stream: none (the paper's Adagrad), reset "
            "(Adagrad's accumulators restarted at 500 updates' worth when drift is detected), "
            "decay (Adagrad forgetting with --half-life-examples, its steps tripled when drift is "
            "detected and relaxing back), both with Adafactor's update "
            "clipping, rmsprop or adam (baselines)",
        ),
        parser.add_argument(
            "--half-life-examples",
            type=positive_float,
            default=DEFAULT_HALF_LIFE_EXAMPLES,
            help="half-life of Adagrad's accumulators with --adaptation decay (default 100000)",
        ),
    ]


def model_flags(args: argparse.Namespace | PipelineOptions) -> list[str]:
    """The model flags of parsed `args` as a command line that parses back to the same values
    (a benchmark hands its model to the job it times this way)."""
    actions = add_model_flags(argparse.ArgumentParser(add_help=False))
    return [
        f"{action.option_strings[0]}={getattr(args, action.dest)}"
        for action in actions
        if getattr(args, action.dest) is not None
    ]


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    parser.add_argument(
        "--data-dir", help="data files directory (else $AEVB_DATA_DIR, user cache, download)"
    )
    parser.add_argument(
        "--fallback-dataset",
        choices=DATASETS,
        help="use this data set, with a notice, when --dataset cannot be found or downloaded",
    )


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """Where examples come from: shared by `aevb train` and `aevb score`."""
    parser.add_argument(
        "--source",
        default="dataset",
        help="dataset (default: --dataset replayed in reshuffled passes), files:GLOB "
        "(.npy .npz .csv .jsonl .tfrecord; watched with --streaming), "
        "kafka:BOOTSTRAP/TOPIC",
    )
    parser.add_argument(
        "--kafka-expansion-service",
        metavar="JAR|HOST:PORT",
        help="Beam's Java expansion service for the kafka source: a jar (`make services` "
        "builds .services/kafka-expansion-service/beam-kafka-expansion-service-*.jar) or a "
        "running service's address; default: Beam's own jar, downloaded from Maven Central. "
        "A kafka source needs a portable runner, e.g. --runner PrismRunner",
    )
    parser.add_argument(
        "--examples-per-second", type=positive_float, help="rate limit of the dataset source"
    )
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK_SIZE,
        help="examples per pipeline element (default 1000): Beam pays per element",
    )
    parser.add_argument(
        "--poll-interval-seconds",
        type=positive_float,
        default=1.0,
        help="how often a watched files glob is listed (streaming)",
    )
    parser.add_argument(
        "--file-settle-seconds",
        type=non_negative_float,
        default=DEFAULT_SETTLE_SECONDS,
        help="a watched file is read once unmodified for this long (default %(default)s); "
        "producers should write under another name and rename",
    )
    parser.add_argument(
        "--max-file-bytes",
        type=positive_int,
        default=DEFAULT_MAX_FILE_BYTES,
        help="what one file may hold or expand to (.npz, .gz), counted after decompression "
        "and checked before allocating; larger files are dead letters (default 256 MiB)",
    )


class AEVBOptions(PipelineOptions):
    """Everything `aevb train` takes besides Beam's own options."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_data_flags(parser)
        source = parser.add_argument_group("source")
        add_source_flags(source)
        source.add_argument(
            "--input-dim", type=positive_int, help="input width for files/kafka (else --dataset's)"
        )
        source.add_argument(
            "--likelihood",
            choices=LIKELIHOODS,
            help="decoder for files/kafka input (else --dataset's)",
        )
        add_scenario_flags(parser.add_argument_group("drift scenarios (dataset source)"))
        add_model_flags(parser.add_argument_group("model and learning algorithm"))
        run = parser.add_argument_group("run")
        run.add_argument(
            "--output", default="runs/default", help="RUN_DIR: checkpoints, snapshots, logs"
        )
        run.add_argument("--model-key", default="default", help="key of unkeyed examples")
        run.add_argument(
            "--max-examples",
            type=positive_int,
            help="stop once a model has seen this many examples in total (resumes count)",
        )
        run.add_argument("--epochs", type=positive_int, help="passes over the data set (batch)")
        run.add_argument("--log-every-steps", type=positive_int, default=10)
        run.add_argument("--checkpoint-every-steps", type=positive_int, default=1000)
        run.add_argument("--snapshot-every-examples", type=positive_int)
        run.add_argument("--snapshot-every-seconds", type=positive_float)
        run.add_argument("--keep-snapshots", type=positive_int, default=5)
        run.add_argument(
            "--max-models-in-memory",
            type=positive_int,
            help="keep at most this many keys' models in a worker process: the least "
            "recently used is checkpointed and dropped, and restored on its next example",
        )
        run.add_argument(
            "--max-batch-wait-seconds",
            type=positive_float,
            default=5.0,
            help="train a partial minibatch after this long without completing it (streaming)",
        )
        run.add_argument(
            "--evaluate-every-examples",
            type=positive_int,
            help="log the test-set bound (test_elbo) into progress.jsonl this often",
        )
        run.add_argument(
            "--evaluate-examples",
            type=positive_int,
            default=10_000,
            help="test examples used by --evaluate-every-examples (default 10000)",
        )
        add_monitoring_flags(parser.add_argument_group("monitoring (Prometheus, drift)"))


def port_number(text: str) -> int:
    value = _number(int, text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {text}")
    return value


def add_monitoring_flags(parser: argparse.ArgumentParser) -> None:
    """Prometheus export and drift detection (pipeline.outputs, pipeline.train.drift)."""
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        help="serve Prometheus /metrics on this port while the job runs (streaming jobs; "
        "0 picks a free port, logged)",
    )
    parser.add_argument(
        "--per-key-metrics",
        choices=PER_KEY_METRICS,
        default="all",
        help="all: every per-key series (~70 a key); none: only the job-level aggregates "
        "(aevb_fleet_*), for jobs of thousands of keys (default all)",
    )
    parser.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address the /metrics server binds (default 127.0.0.1; 0.0.0.0 for all)",
    )
    parser.add_argument(
        "--pushgateway",
        metavar="URL",
        help="push metrics to this Prometheus Pushgateway (batch jobs): every "
        "--push-interval-seconds and at the end, grouping key job=--push-job, model=<key>",
    )
    parser.add_argument(
        "--push-interval-seconds",
        type=positive_float,
        default=30.0,
        help="seconds between Pushgateway pushes (default 30)",
    )
    parser.add_argument(
        "--push-job", default="aevb", help="job label of Pushgateway pushes (default aevb)"
    )
    parser.add_argument(
        "--drift-detector",
        choices=drift.DETECTORS,
        default=drift.DEFAULT_DETECTOR,
        help="detector on the test-then-train negative bound (default %(default)s)",
    )
    parser.add_argument(
        "--drift-threshold",
        type=positive_float,
        default=drift.DEFAULT_PH_THRESHOLD,
        help="page-hinkley threshold lambda, in --drift-units (default %(default)s)",
    )
    parser.add_argument(
        "--drift-delta",
        type=non_negative_float,
        default=drift.DEFAULT_PH_DELTA,
        help="page-hinkley delta: tolerated rise per minibatch, in --drift-units "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--drift-units",
        choices=drift.UNITS,
        default=drift.DEFAULT_UNITS,
        help="units of the drift thresholds: noise (multiples of the minibatch noise each "
        "key's detector learns from its stream, so one setting holds on any data) or nats "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--drift-min-minibatches",
        type=positive_int,
        default=drift.DEFAULT_MIN_MINIBATCHES,
        help="warm-up minibatches before the detector may fire, after the start and after "
        "each detection (default %(default)s)",
    )
    parser.add_argument(
        "--adwin-delta",
        type=positive_float,
        default=drift.DEFAULT_ADWIN_DELTA,
        help="adwin confidence delta (default %(default)s)",
    )
    parser.add_argument(
        "--adwin-min-increase",
        type=non_negative_float,
        default=drift.DEFAULT_ADWIN_MIN_INCREASE,
        help="smallest rise of adwin's mean negative bound that counts as drift, in "
        "--drift-units (default %(default)s)",
    )
    parser.add_argument(
        "--regime-memory",
        type=non_negative_int,
        default=0,
        help="earlier regimes each key keeps (models with their optimiser state): after a "
        "drift detection the key switches back to one that explains the new data clearly "
        "better than its current model; 0 (the default) keeps none",
    )


def drift_settings(options: AEVBOptions) -> drift.DriftSettings | None:
    """The drift detector the flags ask for (None: --drift-detector none)."""
    if options.drift_detector == "none":
        return None
    return drift.DriftSettings(
        detector=options.drift_detector,
        threshold=options.drift_threshold,
        delta=options.drift_delta,
        min_minibatches=options.drift_min_minibatches,
        adwin_delta=options.adwin_delta,
        adwin_min_increase=options.adwin_min_increase,
        units=options.drift_units,
    )


def exports_metrics(options: AEVBOptions) -> bool:
    """Prometheus metrics are kept when the job serves or pushes them."""
    return options.metrics_port is not None or options.pushgateway is not None


def add_scenario_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--drift",
        choices=("none", *SCENARIOS),
        default="none",
        help="replay --dataset as a non-stationary stream (deterministic under --seed)",
    )
    parser.add_argument(
        "--phase-examples",
        type=positive_int,
        default=200_000,
        help="examples per phase (gradual: before the rotation starts)",
    )
    parser.add_argument("--drift-classes", default="0-4,5-9", help="class-incremental phases")
    parser.add_argument(
        "--drift-datasets",
        default="mnist,inverted-mnist",
        help="abrupt/recurring phases: data sets of one shape; 'inverted-' inverts one",
    )
    parser.add_argument("--rotation-degrees", type=float, default=90.0, help="gradual: final angle")
    parser.add_argument(
        "--rotation-span-examples",
        type=positive_int,
        help="gradual: examples over which the angle grows (default --phase-examples)",
    )


def scenario_spec(options: AEVBOptions) -> ScenarioSpec | None:
    """The drift scenario the flags ask for (None: the plain reshuffled replay)."""
    if options.drift == "none":
        return None
    return ScenarioSpec(
        kind=options.drift,
        phase_examples=options.phase_examples,
        classes=options.drift_classes,
        datasets=options.drift_datasets,
        rotation_degrees=options.rotation_degrees,
        rotation_span_examples=options.rotation_span_examples,
    )


def read_examples(
    options: AEVBOptions,
    input_dim: int,
    likelihood: str,
    *,
    streaming: bool,
    job_id: str,
    **replay_fields: Any,
) -> ReadExamples:
    """The read path the source flags describe, for either job; `replay_fields` are the
    job's own fields of the dataset replay (`split`, `epochs`, `skip`, `scenario`)."""
    return ReadExamples(
        options.source,
        input_dim,
        likelihood,
        model_key=options.model_key,
        streaming=streaming,
        max_examples=options.max_examples,
        chunk_size=options.chunk_size,
        poll_interval_seconds=options.poll_interval_seconds,
        settle_seconds=options.file_settle_seconds,
        max_file_bytes=options.max_file_bytes,
        replay=DatasetReplay(
            options.dataset,
            data_dir=options.data_dir,
            fallback=options.fallback_dataset,
            examples_per_second=options.examples_per_second,
            seed=options.seed,
            **replay_fields,
        ),
        job_id=job_id,
        kafka_expansion_service=options.kafka_expansion_service,
    )


def input_spec(options: AEVBOptions) -> tuple[int, str]:
    """Input width and likelihood: explicit flags win over the data set's own."""
    shape = dataset_shape(options.dataset)
    return options.input_dim or shape.input_dim, options.likelihood or shape.likelihood


def model_config(
    options: AEVBOptions | argparse.Namespace,
    input_dim: int | None = None,
    likelihood: str | None = None,
) -> VAEConfig:
    """The model the flags describe; input width and likelihood default to `input_spec`'s.
    A `--precision auto` must have been resolved (`resolve_precision`)."""
    if options.precision not in PRECISIONS:
        raise ValueError(f"--precision {options.precision} is resolved before the model is built")
    if input_dim is None or likelihood is None:
        input_dim, likelihood = input_spec(options)
    optimizer_fields = adaptation_fields(options.adaptation, options.half_life_examples)
    default_learning_rate = DEFAULT_LEARNING_RATES[optimizer_fields["optimizer"]]
    return VAEConfig(
        input_dim=input_dim,
        latent_dim=options.latent_dim,
        hidden_dim=options.hidden,
        likelihood=likelihood,
        estimator=options.estimator,
        samples_per_example=options.samples_per_example,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate or default_learning_rate,
        weight_decay=options.weight_decay,
        method=options.method.replace("-", "_"),
        precision=options.precision,
        seed=options.seed,
        **optimizer_fields,
    )


def resolve_precision(
    options: AEVBOptions | argparse.Namespace,
    input_dim: int | None = None,
    likelihood: str | None = None,
) -> PrecisionChoice | None:
    """Replaces `--precision auto` in `options` by the precision this CPU trains the flags'
    model faster in, and returns that choice; None when the flags name a precision."""
    if options.precision != "auto":
        return None
    from pipeline.train.precision import choose_precision  # imports TensorFlow

    options.precision = "float32"  # the model to time, in either precision
    choice = choose_precision(model_config(options, input_dim, likelihood))
    options.precision = choice.precision
    return choice


def cadence(options: AEVBOptions) -> Cadence:
    from pipeline.train.session import Cadence  # imports TensorFlow: not needed to parse flags

    return Cadence(
        log_every_steps=options.log_every_steps,
        checkpoint_every_steps=options.checkpoint_every_steps,
        snapshot_every_examples=options.snapshot_every_examples,
        snapshot_every_seconds=options.snapshot_every_seconds,
        keep_snapshots=options.keep_snapshots,
        evaluate_every_examples=options.evaluate_every_examples,
    )


def run_dir(options: AEVBOptions) -> str:
    """--output: an absolute local path, or an object store's URL as given."""
    if is_remote(options.output):
        return options.output
    return os.path.abspath(options.output)


def load_data(args: argparse.Namespace) -> Dataset:
    """The data set the flags name, with data errors turned into one-line usage errors."""
    try:
        return load_dataset(args.dataset, args.data_dir, fallback=args.fallback_dataset)
    except (DataUnavailableError, CorruptDataError) as error:
        raise UsageError(str(error)) from None
