"""The `aevb` command: train, score, evaluate and benchmark.

    aevb train --dataset mnist --max-examples 1000000 --output runs/mnist
    aevb score --model runs/mnist/snapshots/default --source 'files:in/*.npy' --output out
    aevb evaluate --model runs/mnist/snapshots/default --dataset mnist --split test --json
    aevb bench trainer --json            (the benchmarks of a source checkout)

Flag errors print one line and exit with status 2; TensorFlow is imported only once the
flags are known to be good, so `aevb --help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import pathlib
import sys
from collections.abc import Sequence

# Importing Beam logs a warning through the root logger ("apitools not found ..."), which
# would configure logging before main() does: a stray stderr line on every flag error, and
# main()'s basicConfig (level, format) ignored. A NullHandler swallows it during the import.
_import_quietly = logging.NullHandler()
logging.getLogger().addHandler(_import_quietly)
from pipeline.jobs.options import (  # noqa: E402
    DEFAULT_RUNNER,
    USAGE_ERROR,
    AEVBOptions,
    FlagParser,
    UsageError,
    add_data_flags,
    add_source_flags,
    non_negative_int,
    positive_float,
    positive_int,
    writable_directory,
)

logging.getLogger().removeHandler(_import_quietly)

logger = logging.getLogger("aevb")


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="aevb",
        description="Online Auto-Encoding Variational Bayes on streams.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=FlagParser)

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

    bench = commands.add_parser(
        "bench",
        help="speed and quality benchmarks of a source checkout (benchmarks/, not installed)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="`aevb bench --help`")
    return parser


def add_score_command_flags(parser: argparse.ArgumentParser) -> None:
    """`aevb score`: the sources of `aevb train`, the model to score with, the output."""
    from pipeline.jobs.score import add_score_flags

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
    if argv[:1] == ["bench"]:
        # The benchmarks parse their own flags (benchmarks/cli.py), imported only when asked.
        try:
            return _benchmarks().main(argv[1:])
        except UsageError as error:
            print(f"aevb bench: error: {error}", file=sys.stderr)
            return USAGE_ERROR
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and args.command not in ("train", "score"):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_disk_full_reports)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's Python loggers narrate every SavedModel export at INFO.
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        check_paths(args)
        from pipeline.cli import commands  # TensorFlow is imported from here on.

        handlers = {
            "train": commands.train,
            "evaluate": commands.evaluate,
            "score": commands.score,
            "produce": commands.produce,
            "report": commands.report,
        }
        return handlers[args.command](args)
    except UsageError as error:
        print(f"aevb {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as error:
        if not _disk_full(error):
            raise
        print(
            f"aevb {args.command}: error: no space left on device ({_disk_full(error)}); "
            "free some and run the same command again: it resumes from the last checkpoint",
            file=sys.stderr,
        )
        return 1


# How the operating system says a write found the disk full, in whatever exception carries it
# (an OSError, TensorFlow's ResourceExhaustedError, Beam's RuntimeError around either).
_DISK_FULL = "No space left on device"


def _disk_full(error: BaseException) -> str | None:
    """The message of the disk-full error in `error`'s chain, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return f"{error.filename or error.strerror}"
        text = str(error)
        if _DISK_FULL in text:
            return text[: text.index(_DISK_FULL)].strip(" ;:").rsplit(" ", 1)[-1] or _DISK_FULL
        error = error.__cause__ or error.__context__
    return None


def _drop_disk_full_reports(record: logging.LogRecord) -> bool:
    """Beam logs each failed bundle with its traceback; on a full disk the job ends with one
    line instead (`main`), so those reports are dropped."""
    exception = record.exc_info[1] if record.exc_info else None
    return _DISK_FULL not in record.getMessage() and not (exception and _disk_full(exception))


def check_paths(args: argparse.Namespace) -> None:
    """Path flags that cannot work, rejected before the slow TensorFlow import."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not pathlib.Path(data_dir).is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a readable directory")
    if args.command == "train":
        if "://" not in args.output:  # a store's is checked by the job's first write
            writable_directory(pathlib.Path(args.output), "--output")
    elif args.command in ("evaluate", "score"):
        from vae.snapshot_format import resolve_version  # imports no TensorFlow

        if args.command == "score":
            if "://" in args.output:
                raise UsageError(
                    f"--output {args.output}: scores are written to a local or mounted directory"
                )
            writable_directory(pathlib.Path(args.output), "--output")
            if "://" in (args.model or ""):
                return  # on a store: checked when the job reads it

        if getattr(args, "models", None) is not None:
            if "://" in args.models:
                raise UsageError(
                    f"--models {args.models}: a model per key is scored from a local or "
                    "mounted directory; on an object store, score one key with --model"
                )
            if not pathlib.Path(args.models).is_dir():
                raise UsageError(f"--models {args.models} is not a directory")
            return
        try:
            resolve_version(args.model)
        except FileNotFoundError as error:
            raise UsageError(f"--model {error}") from None


def _benchmarks():
    """`benchmarks.cli`: in a source checkout (an editable install puts it on the path),
    never in the installed package."""
    try:
        return importlib.import_module("benchmarks.cli")
    except ModuleNotFoundError as error:
        if error.name not in ("benchmarks", "benchmarks.cli"):
            raise
        raise UsageError(
            "the benchmarks are not part of the installed package: run them in a source "
            "checkout installed in editable mode (make install), or `python -m benchmarks`"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
