"""What each `aevb` subcommand does once its flags parsed (see `pipeline.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

import vae
from pipeline import bench as benchmarks
from pipeline.cli import UsageError, print_json, writable_directory
from pipeline.datasets import CorruptDataError, Dataset, DataUnavailableError, load_dataset
from pipeline.job import examples_already_seen, run_training
from pipeline.options import (
    AEVBOptions,
    cadence,
    drift_settings,
    model_config,
    run_dir,
    scenario_spec,
)
from pipeline.progress import ProgressLog, read_progress
from pipeline.records import validate_model_key
from pipeline.report import (
    bound_figure,
    image_shape,
    manifold_figure,
    parts_figure,
    samples_figure,
)
from pipeline.scenarios import build_scenario
from pipeline.snapshots import read_metadata, resolve_version
from pipeline.sources import parse_source

logger = logging.getLogger("aevb")


def train(args: argparse.Namespace) -> int:
    flags = [arg for arg in args.argv if arg != "train"]
    if not any(arg == "--runner" or arg.startswith("--runner=") for arg in flags):
        flags += ["--runner", args.runner]
    options = PipelineOptions(flags)
    aevb = options.view_as(AEVBOptions)
    try:
        kind, _ = parse_source(aevb.source)
        config = model_config(aevb)
        cadence(aevb)  # validates the cadence flags together
        detector = drift_settings(aevb)  # and the drift detector's
        if scenario_spec(aevb) is not None and kind != "dataset":
            raise ValueError(f"--drift {aevb.drift} replays --dataset: use --source dataset")
        if aevb.adaptation == "reset" and detector is None:
            raise ValueError("--adaptation reset acts on drift detections: choose a detector")
    except ValueError as error:
        raise UsageError(str(error)) from None
    already = examples_already_seen(run_dir(aevb), aevb.model_key)
    if aevb.max_examples is not None and already >= aevb.max_examples:
        logger.info(
            "%s has seen %d examples already (--max-examples %d): nothing to train",
            run_dir(aevb),
            already,
            aevb.max_examples,
        )
        return 0
    if kind == "dataset" or aevb.evaluate_every_examples:
        # Fail here, in one line, rather than in a worker: the data must be loadable.
        dataset = load_data(args)
        logger.info(
            "data: %s, %d training examples, from %s",
            dataset.name,
            len(dataset.train),
            dataset.source,
        )
    logger.info(
        "training %s from %s on %s%s; run directory %s",
        _describe_config(config),
        aevb.source,
        args.runner,
        " (streaming)" if args.streaming else "",
        run_dir(aevb),
    )
    record_drift_schedule(aevb)
    run_training(options)
    for model_dir in sorted((pathlib.Path(run_dir(aevb)) / "snapshots").glob("[!.]*")):
        newest = resolve_version(model_dir)
        metadata = read_metadata(newest)
        logger.info(
            "%s: %s examples seen; newest snapshot %s",
            model_dir.name,
            metadata.get("examples_seen"),
            newest,
        )
    return 0


def score(args: argparse.Namespace) -> int:
    from pipeline.score import (
        ScoreOptions,
        read_scores,
        run_scoring,
        snapshot_config,
        threshold_of,
    )

    flags = list(args.argv)
    del flags[flags.index("score")]
    if not any(arg == "--runner" or arg.startswith("--runner=") for arg in flags):
        flags += ["--runner", args.runner]
    options = PipelineOptions(flags)
    aevb = options.view_as(AEVBOptions)
    scoring = options.view_as(ScoreOptions)
    try:
        kind, _ = parse_source(aevb.source)
        threshold_of(scoring)
        config = snapshot_config(scoring.model)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    runner = args.runner.rsplit(".", 1)[-1]
    if args.streaming and scoring.model_updates == "side-input" and runner == "FnApiRunner":
        raise UsageError(
            "--model-updates side-input needs a runner that feeds unbounded side inputs to a "
            "running stage (Flink, Dataflow); FnApiRunner would score nothing until the "
            "model watch ends: use --model-updates poll"
        )
    if kind == "dataset":
        dataset = load_data(args)
        if dataset.input_dim != config.input_dim:
            raise UsageError(
                f"{scoring.model} expects {config.input_dim} inputs, "
                f"{dataset.name} has {dataset.input_dim}"
            )
    logger.info(
        "scoring %s with %s (%s) on %s%s into %s",
        aevb.source,
        resolve_version(scoring.model),
        "following new versions" if args.streaming else "fixed version",
        args.runner,
        " (streaming)" if args.streaming else "",
        run_dir(aevb),
    )
    run_scoring(options)
    records = read_scores(run_dir(aevb))
    versions = sorted({r["model_version"] for r in records if r["model_version"] is not None})
    logger.info(
        "%d records scored in %s by model versions %s; %d flagged as anomalies",
        len(records),
        run_dir(aevb),
        versions,
        sum(1 for r in records if r["anomaly"]),
    )
    return 0


def produce(args: argparse.Namespace) -> int:
    from pipeline.produce import produce as replay_to_kafka

    if args.key is not None:
        try:
            validate_model_key(args.key)
        except ValueError as error:
            raise UsageError(f"--key: {error}") from None
    dataset = load_data(args)
    replay_to_kafka(
        args.bootstrap,
        args.topic,
        dataset.train,
        key=args.key,
        examples_per_second=args.examples_per_second,
        max_examples=args.max_examples,
        epochs=args.epochs,
        seed=args.seed,
    )
    return 0


def record_drift_schedule(options: AEVBOptions) -> None:
    """Writes a drift scenario's phases into progress.jsonl, so plots mark the true changes."""
    spec = scenario_spec(options)
    if spec is None:
        return
    scenario = build_scenario(
        spec, options.dataset, options.data_dir, options.fallback_dataset, options.seed
    )
    horizon = options.max_examples or 10 * spec.phase_examples
    phases = [phase.to_dict() for phase in scenario.phases(horizon)]
    for phase in phases:
        logger.info(
            "drift scenario %s: phase %d from example %d: %s",
            spec.kind,
            phase["index"],
            phase["start"],
            phase["name"],
        )
    log = ProgressLog(pathlib.Path(run_dir(options)) / "progress.jsonl")
    log.write(
        {
            "key": options.model_key,
            "examples": examples_already_seen(run_dir(options), options.model_key),
            "drift_schedule": {"scenario": dataclasses.asdict(spec), "phases": phases},
        }
    )


def evaluate(args: argparse.Namespace) -> int:
    try:
        version_dir = resolve_version(args.model)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    model = vae.load_model(version_dir)
    dataset = load_data(args)
    if dataset.input_dim != model.config.input_dim:
        raise UsageError(
            f"{version_dir} expects {model.config.input_dim} inputs, "
            f"{dataset.name} has {dataset.input_dim}"
        )
    data = dataset.test if args.split == "test" else dataset.train
    data = data[: args.max_examples]
    result = vae.evaluate(model, data, importance_samples=args.importance_samples, seed=args.seed)
    report = {
        **result.to_dict(),
        "model": str(version_dir),
        "version": int(version_dir.name) if version_dir.name.isdigit() else None,
        "examples_trained": read_metadata(version_dir).get("examples_seen"),
        "dataset": dataset.name,
        "split": args.split,
    }
    print_result(report, args.json)
    return 0


def report(args: argparse.Namespace) -> int:
    progress_path = args.run_dir / "progress.jsonl"
    if not progress_path.exists():
        raise UsageError(f"{args.run_dir} has no progress.jsonl: is it the --output of a run?")
    output = writable_directory(args.output or args.run_dir / "report", "--output")
    entries = read_progress(progress_path)
    title = args.title or args.run_dir.name
    written = [
        bound_figure(entries, output / "bound.png", title=title, paper=args.paper),
        parts_figure(entries, output / "parts.png", title=f"{title}: bound and its terms"),
    ]
    for model_dir in sorted((args.run_dir / "snapshots").glob("[!.]*")):
        written += _model_figures(model_dir, output)
    for path in written:
        print(path)
    return 0


def _model_figures(model_dir: pathlib.Path, output: pathlib.Path) -> list[pathlib.Path]:
    """Samples (and for a 2-D latent space the manifold) of a key's newest snapshot."""
    try:
        version_dir = resolve_version(model_dir)
    except FileNotFoundError:
        return []
    config = read_metadata(version_dir).get("config") or {}
    if image_shape(config.get("input_dim", 0)) is None:
        logger.info("%s: not image data, no sample figures", model_dir.name)
        return []
    model = vae.load_model(version_dir)
    key = model_dir.name
    label = f"{key}, snapshot {version_dir.name}"
    written = [samples_figure(model, output / f"samples-{key}.png", title=f"Samples: {label}")]
    if model.config.latent_dim == 2:
        written.append(
            manifold_figure(model, output / f"manifold-{key}.png", title=f"Manifold: {label}")
        )
    return written


def bench(args: argparse.Namespace) -> int:
    if args.bench == "trainer":
        try:
            config = model_config(args, input_dim=args.input_dim, likelihood="bernoulli")
        except ValueError as error:
            raise UsageError(str(error)) from None
        result = benchmarks.trainer_throughput(
            config,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            repeats=args.repeats,
            reference_command=args.reference_command,
        )
    elif args.bench == "pipeline":
        dataset, config = _dataset_and_config(args)
        result = benchmarks.pipeline_throughput(
            dataset,
            config,
            examples=args.examples,
            chunk_size=args.chunk_size,
            source=args.source,
            runner=args.runner,
            files_format=args.files_format,
            extra_flags=[
                f"--{flag.replace('_', '-')}={getattr(args, flag)}"
                for flag in ("data_dir", "fallback_dataset")
                if getattr(args, flag) is not None
            ],
        )
    elif args.bench == "memory":
        dataset, config = _dataset_and_config(args)
        result = benchmarks.memory_growth(
            dataset,
            config,
            examples=args.examples,
            baseline_examples=args.baseline_examples,
            runner=args.runner,
        )
    elif args.bench == "drift":
        result = _drift_benchmark(args)
    else:
        raise UsageError(f"unknown benchmark {args.bench!r}")
    print_result(result, args.json)
    return 0


def _drift_benchmark(args: argparse.Namespace) -> dict:
    from pipeline import drift_bench
    from pipeline.report import drift_benchmark_figure
    from pipeline.scenarios import SCENARIOS

    policies = [p for p in args.policies.split(",") if p]
    names = [n for n in args.scenarios.split(",") if n]
    unknown = set(policies) - set(drift_bench.POLICIES) | set(names) - set(SCENARIOS)
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
    )
    curves = result.pop("_curves")
    if args.plot_dir is not None:
        output = writable_directory(args.plot_dir, "--plot-dir")
        # From half a phase before the first change: the first 10^6 examples would squeeze it.
        shown_from = args.stationary_examples - args.phase_examples // 2
        for name in names:
            runs = {policy: curves[(name, policy)].since(shown_from) for policy in policies}
            change = next(r["change_examples"] for r in result["results"] if r["scenario"] == name)
            path = drift_benchmark_figure(runs, change, output / f"drift-{name}.png", name)
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


def print_result(result: dict, as_json: bool) -> None:
    """One JSON object (--json) or one aligned `name value` line per field."""
    if as_json:
        print_json(result)
        return
    for name, value in result.items():
        print(f"{name:32s} {value}")


def _dataset_and_config(args: argparse.Namespace) -> tuple[Dataset, vae.VAEConfig]:
    dataset = load_data(args)
    try:
        return dataset, model_config(args, dataset.input_dim, dataset.likelihood)
    except ValueError as error:
        raise UsageError(str(error)) from None


def load_data(args: argparse.Namespace) -> Dataset:
    """The data set the flags name, with data errors turned into one-line usage errors."""
    try:
        return load_dataset(args.dataset, args.data_dir, fallback=args.fallback_dataset)
    except (DataUnavailableError, CorruptDataError) as error:
        raise UsageError(str(error)) from None


def _describe_config(config: vae.VAEConfig) -> str:
    optimizer = [f"{config.optimizer} {config.learning_rate}"]
    if config.accumulator_half_life_examples is not None:
        optimizer.append(f"half-life {config.accumulator_half_life_examples:g} examples")
    if config.update_clip_threshold is not None:
        optimizer.append(f"steps clipped at {config.update_clip_threshold:g}")
    return (
        f"{config.input_dim}-{config.hidden_dim}-{config.latent_dim} {config.likelihood} VAE "
        f"(M={config.batch_size}, L={config.samples_per_example}, {config.estimator}, "
        + ", ".join(optimizer)
        + ")"
    )
