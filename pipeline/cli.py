"""The `aevb` command: train, score, evaluate and benchmark.

    aevb train --dataset mnist --max-examples 1000000 --output runs/mnist
    aevb score --model runs/mnist/snapshots/default --source 'files:in/*.npy' --output out
    aevb evaluate --model runs/mnist/snapshots/default --dataset mnist --split test --json
    aevb bench trainer --json

Flag errors print one line and exit with status 2; TensorFlow is imported only once the
flags are known to be good, so `aevb --help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import NoReturn

# Importing Beam logs a warning through the root logger ("apitools not found ..."), which
# would configure logging before main() does: a stray stderr line on every flag error, and
# main()'s basicConfig (level, format) ignored. A NullHandler swallows it during the import.
_import_quietly = logging.NullHandler()
logging.getLogger().addHandler(_import_quietly)
from pipeline.options import (  # noqa: E402
    DEFAULT_RUNNER,
    AEVBOptions,
    add_data_flags,
    add_model_flags,
    add_source_flags,
    non_negative_int,
    positive_float,
    positive_int,
)

logging.getLogger().removeHandler(_import_quietly)

logger = logging.getLogger("aevb")
USAGE_ERROR = 2


class UsageError(Exception):
    """A flag or path the user gave cannot work; reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line that names the problem reads better.
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aevb",
        description="Online Auto-Encoding Variational Bayes on streams.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train",
        help="run the training job on Beam (resumes from --output); Beam flags pass through",
    )
    AEVBOptions._add_argparse_args(train)
    beam_flags = train.add_argument_group("Apache Beam (any other Beam flag is passed through)")
    beam_flags.add_argument(
        "--runner", default=DEFAULT_RUNNER, help=f"Beam runner (default {DEFAULT_RUNNER})"
    )
    beam_flags.add_argument("--streaming", action="store_true", help="unbounded, streaming job")

    score = commands.add_parser(
        "score",
        help="score records with a snapshot (RunInference); a streaming job follows new "
        "versions; Beam flags pass through",
    )
    add_score_command_flags(score)

    produce = commands.add_parser(
        "produce", help="replay a data set into a Kafka topic (needs the kafka extra)"
    )
    produce.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers host:port")
    produce.add_argument("--topic", required=True, help="the topic a kafka: source reads")
    add_data_flags(produce.add_argument_group("data"))
    produce.add_argument("--key", help="message key: the model key (default: none)")
    produce.add_argument("--examples-per-second", type=positive_float, help="rate limit")
    produce.add_argument("--max-examples", type=positive_int, help="stop after this many")
    produce.add_argument("--epochs", type=positive_int, help="stop after this many passes")
    produce.add_argument("--seed", type=non_negative_int, default=0, help="replay order")

    evaluate = commands.add_parser("evaluate", help="bound and log-likelihood of a snapshot")
    evaluate.add_argument(
        "--model",
        type=pathlib.Path,
        required=True,
        help="a snapshot version directory or a model directory (newest)",
    )
    add_data_flags(evaluate.add_argument_group("data"))
    evaluate.add_argument("--split", choices=("train", "test"), default="test")
    evaluate.add_argument(
        "--importance-samples",
        type=non_negative_int,
        default=0,
        help="K for the importance-sampled log p(x) (0: bound only)",
    )
    evaluate.add_argument("--max-examples", type=positive_int, help="evaluate the first N only")
    evaluate.add_argument("--seed", type=non_negative_int, default=0)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    report = commands.add_parser(
        "report",
        help="PNG figures of a run: bound and its terms with drift detections "
        "(progress.jsonl), samples and 2-D manifold (newest snapshots)",
    )
    report.add_argument("run_dir", type=pathlib.Path, help="the RUN_DIR of `aevb train`")
    report.add_argument("--output", type=pathlib.Path, help="folder for the PNGs (RUN_DIR/report)")
    report.add_argument(
        "--paper", choices=("mnist", "frey"), help="mark the paper's Figure 2 values"
    )
    report.add_argument("--title", default=None)

    bench = commands.add_parser("bench", help="speed and quality benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    trainer = benches.add_parser("trainer", help="samples/s of the paper's MNIST step")
    add_model_flags(trainer.add_argument_group("model and learning algorithm"))
    trainer.add_argument("--input-dim", type=positive_int, default=784)
    trainer.add_argument("--steps", type=positive_int, default=1000)
    trainer.add_argument("--warmup-steps", type=positive_int, default=30)
    trainer.add_argument("--repeats", type=positive_int, default=3)
    trainer.add_argument(
        "--reference-command",
        help='a command printing {"samples_per_second": ...} (e.g. the PyTorch reference), '
        "run alternately with the trainer for a ratio measured in one run",
    )
    trainer.add_argument("--json", action="store_true")

    job = benches.add_parser(
        "pipeline", help="streaming job vs bare trainer samples/s, measured in one run"
    )
    add_data_flags(job.add_argument_group("data"))
    add_model_flags(job.add_argument_group("model and learning algorithm"))
    job.add_argument("--examples", type=positive_int, default=200_000)
    job.add_argument("--chunk-size", type=positive_int, default=1000)
    job.add_argument("--source", default="dataset", help="dataset or files:GLOB")
    job.add_argument(
        "--files-format",
        choices=("jsonl", "csv", "npy"),
        help="write the examples to files of this format first and watch them (per-record text)",
    )
    job.add_argument("--runner", default=DEFAULT_RUNNER)
    job.add_argument("--json", action="store_true")

    memory = benches.add_parser("memory", help="resident memory over a long streaming job")
    add_data_flags(memory.add_argument_group("data"))
    add_model_flags(memory.add_argument_group("model and learning algorithm"))
    memory.add_argument("--examples", type=positive_int, default=2_000_000)
    memory.add_argument("--baseline-examples", type=positive_int, default=100_000)
    memory.add_argument("--runner", default=DEFAULT_RUNNER)
    memory.add_argument("--json", action="store_true")

    drift = benches.add_parser(
        "drift", help="detection, recovery and forgetting: every scenario x adaptation policy"
    )
    add_data_flags(drift.add_argument_group("data"))
    add_model_flags(drift.add_argument_group("model and learning algorithm"))
    drift.add_argument("--phase-examples", type=positive_int, default=500_000)
    drift.add_argument(
        "--stationary-examples",
        type=positive_int,
        default=4_000_000,
        help="examples of the stationary first phase, the false-alarm run; the changes come "
        "after them (default 4000000, as drift_bench.STATIONARY_EXAMPLES)",
    )
    drift.add_argument("--policies", default="none,reset,decay,rmsprop,adam")
    drift.add_argument("--scenarios", default="class-incremental,gradual,abrupt,recurring")
    drift.add_argument("--plot-dir", type=pathlib.Path, help="write one PNG per scenario here")
    drift.add_argument(
        "--curves",
        type=pathlib.Path,
        help="write every run's per-minibatch bounds and detections here (.npz), "
        "the stationary runs included, to re-analyse without training again",
    )
    drift.add_argument("--json", action="store_true")
    return parser


def add_score_command_flags(parser: argparse.ArgumentParser) -> None:
    """`aevb score`: the sources of `aevb train`, the model to score with, the output."""
    from pipeline.score import add_score_flags

    add_score_flags(parser, require_model=True)
    parser.add_argument(
        "--output", required=True, help="OUT_DIR: scores-*.jsonl and dead_letter/*.jsonl"
    )
    add_data_flags(parser.add_argument_group("data (the dataset source)"))
    source = parser.add_argument_group("source (as for aevb train)")
    add_source_flags(source)
    source.add_argument("--model-key", default="default", help="key of unkeyed records")
    source.add_argument("--max-examples", type=positive_int, help="score at most this many")
    source.add_argument(
        "--epochs", type=positive_int, help="passes over the dataset split (batch: 1)"
    )
    source.add_argument("--seed", type=non_negative_int, default=0, help="replay order")
    beam_flags = parser.add_argument_group("Apache Beam (any other Beam flag is passed through)")
    beam_flags.add_argument(
        "--runner", default=DEFAULT_RUNNER, help=f"Beam runner (default {DEFAULT_RUNNER})"
    )
    beam_flags.add_argument(
        "--streaming", action="store_true", help="unbounded job following new model versions"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Flags neither aevb nor argparse knows are Beam's (--direct_num_workers, --job_endpoint,
    # --flink_master, ...): `train` hands them to PipelineOptions; elsewhere they are errors.
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and args.command not in ("train", "score"):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's Python loggers narrate every SavedModel export at INFO.
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        check_paths(args)
        from pipeline import commands  # TensorFlow is imported from here on.

        handlers = {
            "train": commands.train,
            "evaluate": commands.evaluate,
            "score": commands.score,
            "produce": commands.produce,
            "report": commands.report,
            "bench": commands.bench,
        }
        return handlers[args.command](args)
    except UsageError as error:
        print(f"aevb {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR


def check_paths(args: argparse.Namespace) -> None:
    """Path flags that cannot work, rejected before the slow TensorFlow import."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not pathlib.Path(data_dir).is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a readable directory")
    if args.command == "train":
        writable_directory(pathlib.Path(args.output), "--output")
    elif args.command in ("evaluate", "score"):
        from pipeline.snapshots import resolve_version  # imports no TensorFlow

        if args.command == "score":
            writable_directory(pathlib.Path(args.output), "--output")

        try:
            resolve_version(args.model)
        except FileNotFoundError as error:
            raise UsageError(f"--model {error}") from None


def writable_directory(path: pathlib.Path, flag: str) -> pathlib.Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot create directory ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: directory is not writable")
    return path


def print_json(value: dict) -> None:
    print(json.dumps(value, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
