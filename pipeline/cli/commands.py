"""What each `aevb` subcommand does once its flags parsed (see `pipeline.cli.main`)."""

from __future__ import annotations

import argparse
import logging
import pathlib
from collections.abc import Callable
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

import vae
from pipeline.ingest.keys import validate_model_key
from pipeline.ingest.run_mirror import configure_stores
from pipeline.ingest.sources import files_match, parse_source
from pipeline.jobs.options import (
    AEVBOptions,
    UsageError,
    cadence,
    drift_settings,
    load_data,
    model_config,
    resolve_precision,
    run_dir,
    scenario_spec,
    writable_directory,
)
from pipeline.jobs.run_lock import RunDirectoryBusy
from pipeline.jobs.train import run_training
from pipeline.outputs.metrics_export import MetricsExportError
from pipeline.outputs.results import print_result
from pipeline.train.checkpoints import checkpointed_examples
from pipeline.train.progress import read_progress
from vae.snapshot_format import read_metadata, resolve_version

logger = logging.getLogger("aevb")


def train(args: argparse.Namespace) -> int:
    flags = [arg for arg in args.argv if arg != "train"]
    if not any(arg == "--runner" or arg.startswith("--runner=") for arg in flags):
        flags += ["--runner", args.runner]
    options = PipelineOptions(flags)
    aevb = options.view_as(AEVBOptions)
    try:
        kind, _ = parse_source(aevb.source)
        precision_choice = resolve_precision(aevb)  # before the workers read the options
        config = model_config(aevb)
        cadence(aevb)  # validates the cadence flags together
        detector = drift_settings(aevb)  # and the drift detector's
        if scenario_spec(aevb) is not None and kind != "dataset":
            raise ValueError(f"--drift {aevb.drift} replays --dataset: use --source dataset")
        if aevb.adaptation == "reset" and detector is None:
            raise ValueError("--adaptation reset acts on drift detections: choose a detector")
        if aevb.regime_memory and detector is None:
            raise ValueError("--regime-memory acts on drift detections: choose a detector")
    except ValueError as error:
        raise UsageError(str(error)) from None
    configure_stores(options)  # a run directory on a store: its endpoint, credentials
    already = checkpointed_examples(run_dir(aevb), aevb.model_key)
    if aevb.max_examples is not None and already >= aevb.max_examples:
        logger.info(
            "%s has seen %d examples already (--max-examples %d): nothing to train",
            run_dir(aevb),
            already,
            aevb.max_examples,
        )
        return 0
    if kind == "files" and not args.streaming and not files_match(aevb.source.partition(":")[2]):
        raise UsageError(f"--source {aevb.source}: no files match (a batch job reads them once)")
    if kind == "dataset" or aevb.evaluate_every_examples:
        # Fail here, in one line, rather than in a worker: the data must be loadable.
        dataset = load_data(args)
        logger.info(
            "data: %s, %d training examples, from %s",
            dataset.name,
            len(dataset.train),
            dataset.source,
        )
    if precision_choice is not None:
        logger.info(
            "--precision auto: %s, as %s", precision_choice.precision, precision_choice.reason
        )
    logger.info(
        "training %s from %s on %s%s; run directory %s",
        _describe_config(config),
        aevb.source,
        args.runner,
        " (streaming)" if args.streaming else "",
        run_dir(aevb),
    )
    try:
        run_training(options)
    except (RunDirectoryBusy, MetricsExportError) as error:
        raise UsageError(str(error)) from None
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
    from pipeline.jobs.score import (
        ScoreOptions,
        models_config,
        resolve_model_version,
        run_scoring,
        snapshot_config,
        threshold_of,
    )
    from pipeline.outputs.scores import read_scores

    flags = list(args.argv)
    del flags[flags.index("score")]
    if not any(arg == "--runner" or arg.startswith("--runner=") for arg in flags):
        flags += ["--runner", args.runner]
    options = PipelineOptions(flags)
    aevb = options.view_as(AEVBOptions)
    scoring = options.view_as(ScoreOptions)
    configure_stores(options)  # models on a store: its endpoint, credentials
    try:
        kind, _ = parse_source(aevb.source)
        threshold_of(scoring)
        if scoring.models:
            config = models_config(scoring.models)
        else:
            config = snapshot_config(scoring.model)
            # Loaded once here: a damaged snapshot is one line, not a worker's traceback
            # (on a store, the workers fetch and load it).
            if "://" not in scoring.model:
                load_snapshot(vae.load, resolve_version(scoring.model))
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if scoring.models and scoring.model_updates == "side-input":
        raise UsageError("--models follows each key's versions by polling: --model-updates poll")
    runner = args.runner.rsplit(".", 1)[-1]
    # Measured: neither feeds the model watch to the running RunInference stage (Prism 2.77
    # scored nothing in 120 s of a streaming job; FnApiRunner holds the stage until the
    # watch ends). Polling works on both (tests/test_portable.py).
    if args.streaming and scoring.model_updates == "side-input" and runner in LOCAL_RUNNERS:
        raise UsageError(
            "--model-updates side-input needs a runner that feeds unbounded side inputs to a "
            f"running stage (Flink, Dataflow); {runner} would score nothing until the "
            "model watch ends: use --model-updates poll"
        )
    if kind == "dataset":
        dataset = load_data(args)
        if dataset.input_dim != config.input_dim:
            raise UsageError(
                f"{scoring.model or scoring.models} expects {config.input_dim} inputs, "
                f"{dataset.name} has {dataset.input_dim}"
            )
    logger.info(
        "scoring %s with %s (%s) on %s%s into %s",
        aevb.source,
        f"a model per key in {scoring.models}"
        if scoring.models
        else resolve_model_version(scoring.model),
        "following new versions" if args.streaming else "fixed version",
        args.runner,
        " (streaming)" if args.streaming else "",
        run_dir(aevb),
    )
    try:
        run_scoring(options)
    except RunDirectoryBusy as error:
        raise UsageError(str(error)) from None
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
    from pipeline.jobs.produce import produce as replay_to_kafka

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


def evaluate(args: argparse.Namespace) -> int:
    try:
        version_dir = resolve_version(args.model)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    model = load_snapshot(vae.load_model, version_dir)
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
    from pipeline.outputs.figures import bound_figure, parts_figure  # matplotlib: only here

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
    from pipeline.outputs.figures import image_shape, manifold_figure, samples_figure

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


def load_snapshot(load: Callable[[pathlib.Path], Any], version_dir: pathlib.Path) -> Any:
    """`load(version_dir)`, with a damaged snapshot (missing variables, a truncated graph)
    turned into a one-line usage error."""
    import tensorflow as tf

    try:
        return load(version_dir)
    except (OSError, ValueError, tf.errors.OpError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(
            f"--model {version_dir} is not a readable snapshot: {first_line}"
        ) from None


# Beam's local runners, which score nothing with a model-update side input in streaming.
LOCAL_RUNNERS = ("FnApiRunner", "PrismRunner")


def _describe_config(config: vae.VAEConfig) -> str:
    optimizer = [f"{config.optimizer} {config.learning_rate}"]
    if config.accumulator_half_life_examples is not None:
        optimizer.append(f"half-life {config.accumulator_half_life_examples:g} examples")
    if config.update_clip_threshold is not None:
        optimizer.append(f"steps clipped at {config.update_clip_threshold:g}")
    if config.drift_step_boost is not None:
        optimizer.append(f"steps x{config.drift_step_boost:g} at a drift detection")
    return (
        f"{config.input_dim}-{config.hidden_dim}-{config.latent_dim} {config.likelihood} VAE "
        f"by {config.method.replace('_', '-')} "
        f"(M={config.batch_size}, L={config.samples_per_example}, {config.estimator}, "
        f"{config.precision} matmuls, " + ", ".join(optimizer) + ")"
    )
