"""The training job's flags, as a Beam `PipelineOptions` subclass.

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
from typing import TYPE_CHECKING

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.datasets import DATASETS, dataset_shape
from vae.config import LIKELIHOODS, VAEConfig

if TYPE_CHECKING:
    from pipeline.session import Cadence

DEFAULT_RUNNER = "FnApiRunner"
DEFAULT_CHUNK_SIZE = 1000


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


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the model and of Adagrad."""
    parser.add_argument("--latent-dim", type=positive_int, default=20, help="J (default 20)")
    parser.add_argument("--hidden", type=positive_int, default=500, help="hidden units (500)")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="M (default 100)")
    parser.add_argument(
        "--learning-rate", type=positive_float, default=0.02, help="Adagrad step size (0.02)"
    )
    parser.add_argument("--samples-per-example", type=positive_int, default=1, help="L (1)")
    parser.add_argument(
        "--estimator",
        choices=("analytic_kl", "monte_carlo_kl", "A", "B"),
        default="analytic_kl",
        help="SGVB estimator: B = analytic_kl (default), A = monte_carlo_kl",
    )
    parser.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=0.0,
        help="MAP prior N(0, I) on the parameters, as 1/N for N examples (default off)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)


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


class AEVBOptions(PipelineOptions):
    """Everything `aevb train` takes besides Beam's own options."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_data_flags(parser)
        source = parser.add_argument_group("source")
        source.add_argument(
            "--source",
            default="dataset",
            help="dataset (default: --dataset replayed in reshuffled passes), files:GLOB "
            "(.npy .npz .csv .jsonl .tfrecord; watched with --streaming), "
            "kafka:BOOTSTRAP/TOPIC",
        )
        source.add_argument(
            "--examples-per-second", type=positive_float, help="rate limit of the dataset source"
        )
        source.add_argument(
            "--input-dim", type=positive_int, help="input width for files/kafka (else --dataset's)"
        )
        source.add_argument(
            "--likelihood",
            choices=LIKELIHOODS,
            help="decoder for files/kafka input (else --dataset's)",
        )
        source.add_argument(
            "--chunk-size",
            type=positive_int,
            default=DEFAULT_CHUNK_SIZE,
            help="examples per pipeline element (default 1000): Beam pays per element",
        )
        source.add_argument(
            "--poll-interval-seconds",
            type=positive_float,
            default=1.0,
            help="how often a watched files glob is listed (streaming)",
        )
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


def input_spec(options: AEVBOptions) -> tuple[int, str]:
    """Input width and likelihood: explicit flags win over the data set's own."""
    shape = dataset_shape(options.dataset)
    return options.input_dim or shape.input_dim, options.likelihood or shape.likelihood


def model_config(
    options: AEVBOptions | argparse.Namespace,
    input_dim: int | None = None,
    likelihood: str | None = None,
) -> VAEConfig:
    """The model the flags describe; input width and likelihood default to `input_spec`'s."""
    if input_dim is None or likelihood is None:
        input_dim, likelihood = input_spec(options)
    return VAEConfig(
        input_dim=input_dim,
        latent_dim=options.latent_dim,
        hidden_dim=options.hidden,
        likelihood=likelihood,
        estimator=options.estimator,
        samples_per_example=options.samples_per_example,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        seed=options.seed,
    )


def cadence(options: AEVBOptions) -> Cadence:
    from pipeline.session import Cadence  # imports TensorFlow: not needed to parse flags

    return Cadence(
        log_every_steps=options.log_every_steps,
        checkpoint_every_steps=options.checkpoint_every_steps,
        snapshot_every_examples=options.snapshot_every_examples,
        snapshot_every_seconds=options.snapshot_every_seconds,
        keep_snapshots=options.keep_snapshots,
        evaluate_every_examples=options.evaluate_every_examples,
    )


def run_dir(options: AEVBOptions) -> str:
    return os.path.abspath(options.output)
