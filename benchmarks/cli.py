"""`aevb bench NAME ...` (or `python -m benchmarks NAME ...`): parse, run, print one result.

Flags are checked before anything imports TensorFlow, so a mistyped flag answers at once
with one line and exit status 2, as the `aevb` command does.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.drift import DEFAULT_REGIME_MEMORY, PROFILES, STATIONARY_EXAMPLES
from pipeline.ingest.datasets import Dataset
from pipeline.ingest.scenarios import SCENARIOS
from pipeline.jobs.options import (
    DEFAULT_RUNNER,
    USAGE_ERROR,
    FlagParser,
    UsageError,
    add_data_flags,
    add_model_flags,
    load_data,
    model_config,
    model_flags,
    positive_float,
    positive_int,
    resolve_precision,
    writable_directory,
)
from pipeline.outputs.results import print_result

logger = logging.getLogger("aevb")


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="aevb bench", description="Speed and quality benchmarks.")
    benches = parser.add_subparsers(dest="bench", required=True, parser_class=FlagParser)
    trainer = benches.add_parser("trainer", help="samples/s of the paper's MNIST step")
    add_model_flags(trainer.add_argument_group("model and learning algorithm"))
    trainer.add_argument("--input-dim", type=positive_int, default=784)
    trainer.add_argument("--steps", type=positive_int, default=1000)
    trainer.add_argument("--warmup-steps", type=positive_int, default=30)
    trainer.add_argument("--repeats", type=positive_int, default=3)
    trainer.add_argument(
        "--reference-command",
        action="append",
        default=[],
        help='a command printing {"samples_per_second": ...} (e.g. the PyTorch reference), '
        "run alternately with the trainer for a ratio measured in one run; repeatable",
    )
    trainer.add_argument(
        "--precisions",
        default="float32,bfloat16",
        type=_precisions,
        help="the step's precisions to time, alternately (default float32,bfloat16)",
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
    job.add_argument(
        "--repeats", type=positive_int, default=3, help="runs of each side, alternating (3)"
    )
    job.add_argument("--json", action="store_true")

    runners = benches.add_parser(
        "runners",
        help="the streaming job on FnApiRunner, on Prism, and fed by Kafka; produce-to-update lag",
    )
    add_data_flags(runners.add_argument_group("data"))
    add_model_flags(runners.add_argument_group("model and learning algorithm"))
    runners.add_argument("--examples", type=positive_int, default=100_000)
    runners.add_argument(
        "--repeats", type=positive_int, default=3, help="runs of each side, alternating (3)"
    )
    runners.add_argument("--latency-examples", type=positive_int, default=60_000)
    runners.add_argument(
        "--latency-rate", type=positive_float, default=1_000.0, help="messages/s (1,000)"
    )
    runners.add_argument("--json", action="store_true")

    batching = benches.add_parser(
        "key-batching", help="per key-step: a model alone, a fleet's shared step, stacking keys"
    )
    add_model_flags(batching.add_argument_group("model and learning algorithm"))
    batching.add_argument("--input-dim", type=positive_int, default=784)
    batching.add_argument("--keys", type=positive_int, default=8, help="keys per round (8)")
    batching.add_argument("--repeats", type=positive_int, default=30)
    batching.add_argument("--json", action="store_true")

    variance = benches.add_parser(
        "gradient-variance",
        help="the encoder gradient's variance: reparameterised vs score-function, while training",
    )
    add_data_flags(variance.add_argument_group("data"))
    add_model_flags(variance.add_argument_group("model and learning algorithm"))
    variance.add_argument(
        "--points",
        default="0,10000,100000,1000000",
        type=_examples_list,
        help="examples seen at which to measure (default 0,10000,100000,1000000)",
    )
    variance.add_argument("--draws", type=positive_int, default=100, help="gradients per estimate")
    variance.add_argument("--json", action="store_true")

    memory = benches.add_parser("memory", help="resident memory over a long streaming job")
    add_data_flags(memory.add_argument_group("data"))
    add_model_flags(memory.add_argument_group("model and learning algorithm"))
    memory.add_argument("--examples", type=positive_int, default=2_000_000)
    memory.add_argument("--baseline-examples", type=positive_int, default=100_000)
    memory.add_argument("--runner", default=DEFAULT_RUNNER)
    memory.add_argument("--json", action="store_true")

    keys = benches.add_parser(
        "keys", help="a fleet: 1 to 10,000 keyed models in one job, same examples in all"
    )
    add_data_flags(keys.add_argument_group("data"))
    add_model_flags(keys.add_argument_group("model and learning algorithm"))
    keys.add_argument(
        "--examples", type=positive_int, default=1_000_000, help="examples of each case (10^6)"
    )
    keys.add_argument(
        "--keys",
        help="comma-separated cases, K or KxN (K keys of N examples each); default "
        "1,10,100,1000,10000 with --examples in all, and 1000x1000 beside 1x1000000",
    )
    keys.add_argument(
        "--max-models-in-memory",
        type=positive_int,
        default=2000,
        help="the bound for cases with more keys than this (default 2000)",
    )
    keys.add_argument("--probe-keys", type=positive_int, default=50)
    keys.add_argument(
        "--repeats", type=positive_int, default=1, help="runs of each case, alternating (1)"
    )
    keys.add_argument("--json", action="store_true")

    drift = benches.add_parser(
        "drift", help="detection, recovery and forgetting: every scenario x adaptation policy"
    )
    add_data_flags(drift.add_argument_group("data"))
    add_model_flags(drift.add_argument_group("model and learning algorithm"))
    drift.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default="full",
        help="the benchmark's settings: full (changes after 4*10^6 examples, every scenario "
        "and policy) or quick (10^6, phases of 300,000, three scenarios, the Adagrad policies "
        "with and without a regime memory); the flags below override it",
    )
    drift.add_argument("--phase-examples", type=positive_int)
    drift.add_argument(
        "--stationary-examples",
        type=positive_int,
        help="examples of the stationary first phase, the false-alarm run; the changes come "
        f"after them (full: {STATIONARY_EXAMPLES})",
    )
    drift.add_argument(
        "--policies",
        help="comma-separated: any --adaptation, P+memory for P with a regime memory",
    )
    drift.add_argument("--scenarios")
    drift.add_argument(
        "--regime-memory",
        type=positive_int,
        default=DEFAULT_REGIME_MEMORY,
        help="regimes stored by the P+memory policies (default %(default)s)",
    )
    drift.add_argument("--plot-dir", type=pathlib.Path, help="write one PNG per scenario here")
    drift.add_argument(
        "--curves",
        type=pathlib.Path,
        help="write every run's per-minibatch bounds and detections here (.npz), "
        "the stationary runs included, to re-analyse without training again",
    )
    drift.add_argument("--json", action="store_true")
    return parser


def _examples_list(text: str) -> list[int]:
    try:
        points = [int(point) for point in text.split(",") if point]
    except ValueError:
        points = []
    if not points or min(points) < 0:
        raise argparse.ArgumentTypeError(f"expected examples like 0,10000, got {text!r}")
    return points


def _precisions(text: str) -> list[str]:
    from vae.config import PRECISIONS

    precisions = [precision for precision in text.split(",") if precision]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if not precisions or unknown:
        raise argparse.ArgumentTypeError(f"precisions are {', '.join(PRECISIONS)}, got {text!r}")
    return precisions


def _binary_model_config(args: argparse.Namespace) -> Any:
    """The model of the benchmarks that train on synthetic binary data of `--input-dim`."""
    try:
        resolve_precision(args, input_dim=args.input_dim, likelihood="bernoulli")
        return model_config(args, input_dim=args.input_dim, likelihood="bernoulli")
    except ValueError as error:
        raise UsageError(str(error)) from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The result of the benchmark `args` name (imported only now: TensorFlow)."""
    if args.bench == "trainer":
        config = _binary_model_config(args)
        from benchmarks.trainer import trainer_throughput

        return trainer_throughput(
            config,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            repeats=args.repeats,
            reference_commands=args.reference_command,
            precisions=args.precisions,
        )
    if args.bench == "pipeline":
        from benchmarks.job import pipeline_throughput

        dataset, config = _dataset_and_config(args)
        return pipeline_throughput(
            dataset,
            config,
            model_flags(args),
            examples=args.examples,
            repeats=args.repeats,
            chunk_size=args.chunk_size,
            source=args.source,
            runner=args.runner,
            files_format=args.files_format,
            extra_flags=_data_flags(args),
        )
    if args.bench == "runners":
        from benchmarks.runners import runner_benchmark

        dataset, _ = _dataset_and_config(args)
        return runner_benchmark(
            dataset,
            model_flags(args),
            examples=args.examples,
            repeats=args.repeats,
            latency_examples=args.latency_examples,
            latency_rate=args.latency_rate,
            extra_flags=_data_flags(args),
        )
    if args.bench == "keys":
        from benchmarks.keys import default_cases, fleet_benchmark, parse_cases

        dataset, config = _dataset_and_config(args)
        try:
            cases = (
                parse_cases(args.keys, args.examples, args.max_models_in_memory)
                if args.keys
                else default_cases(args.examples, args.max_models_in_memory)
            )
        except ValueError as error:
            raise UsageError(str(error)) from None
        return fleet_benchmark(
            dataset.name,
            config.to_dict(),
            cases,
            data_dir=args.data_dir,
            fallback=args.fallback_dataset,
            probe_keys=args.probe_keys,
            repeats=args.repeats,
        )
    if args.bench == "key-batching":
        from benchmarks.key_batching import key_batching

        return key_batching(_binary_model_config(args), keys=args.keys, repeats=args.repeats)
    if args.bench == "gradient-variance":
        from benchmarks.gradient_variance import gradient_variance

        dataset, config = _dataset_and_config(args)
        if args.draws < 2:
            raise UsageError("--draws: a variance needs at least 2")
        return gradient_variance(dataset, config, points=args.points, draws=args.draws)
    if args.bench == "memory":
        from benchmarks.memory import memory_growth

        dataset, _ = _dataset_and_config(args)
        return memory_growth(
            dataset,
            model_flags(args),
            examples=args.examples,
            baseline_examples=args.baseline_examples,
            runner=args.runner,
            extra_flags=_data_flags(args),
        )
    if args.bench == "drift":
        return _drift_benchmark(args)
    raise UsageError(f"unknown benchmark {args.bench!r}")


def _drift_benchmark(args: argparse.Namespace) -> dict:
    from benchmarks import drift as drift_bench

    profile = drift_bench.PROFILES[args.profile]
    for name in ("phase_examples", "stationary_examples"):
        if getattr(args, name) is None:
            setattr(args, name, profile[name])
    policies = args.policies.split(",") if args.policies else list(profile["policies"])
    names = args.scenarios.split(",") if args.scenarios else list(profile["scenarios"])
    known = {*drift_bench.POLICIES, *(p + drift_bench.MEMORY_SUFFIX for p in drift_bench.POLICIES)}
    unknown = set(policies) - known | set(names) - set(SCENARIOS)
    if unknown:
        raise UsageError(f"unknown policies or scenarios: {', '.join(sorted(unknown))}")
    args.adaptation = "none"  # each policy sets its own optimiser
    dataset, config = _dataset_and_config(args)
    if dataset.train_labels is None:
        raise UsageError(f"the drift benchmark needs a labelled data set, not {dataset.name}")
    result = drift_bench.drift_benchmark(
        dataset,
        config,
        phase_examples=args.phase_examples,
        stationary_examples=args.stationary_examples,
        policies=policies,
        scenario_names=names,
        half_life=args.half_life_examples,
        regime_memory=args.regime_memory,
    )
    result["profile"] = args.profile
    curves = result.pop("_curves")
    if args.plot_dir is not None:
        output = writable_directory(args.plot_dir, "--plot-dir")
        # From half a phase before the first change: the first 10^6 examples would squeeze it.
        shown_from = args.stationary_examples - args.phase_examples // 2
        for name in names:
            runs = {policy: curves[(name, policy)].since(shown_from) for policy in policies}
            change = next(r["change_examples"] for r in result["results"] if r["scenario"] == name)
            path = drift_bench.drift_benchmark_figure(
                runs, change, output / f"drift-{name}.png", name
            )
            logger.info("wrote %s", path)
    if args.curves is not None:
        arrays = {}
        for (name, policy), run in curves.items():
            arrays[f"{name}/{policy}/positions"] = run.positions
            arrays[f"{name}/{policy}/bounds"] = run.bounds
            arrays[f"{name}/{policy}/detections"] = np.asarray(run.detections, np.int64)
        np.savez_compressed(args.curves, **arrays)
        logger.info("wrote %s", args.curves)
    return result


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        print_result(run(args), args.json)
    except UsageError as error:
        print(f"aevb bench {args.bench}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _dataset_and_config(args: argparse.Namespace) -> tuple[Dataset, Any]:
    dataset = load_data(args)
    try:
        resolve_precision(args, dataset.input_dim, dataset.likelihood)
        return dataset, model_config(args, dataset.input_dim, dataset.likelihood)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _data_flags(args: argparse.Namespace) -> list[str]:
    """Where the job finds the data set the benchmark loaded."""
    return [
        f"--{flag.replace('_', '-')}={getattr(args, flag)}"
        for flag in ("data_dir", "fallback_dataset")
        if getattr(args, flag) is not None
    ]
