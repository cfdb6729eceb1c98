"""The training job: source -> decode/validate -> TrainVAE -> records, as one Beam pipeline.

    read (dataset | files | kafka)
      -> decode and validate  --(bad records)--> dead_letter/*.jsonl
      -> TrainVAE (key, minibatch, test-then-train)
      -> training records

The read path is `pipeline.ingest.read.ReadExamples`, the same as the scoring job's. Each
model key's session watches the bound for drift (`pipeline.train.drift`) and, when the job
exports metrics, updates them (`pipeline.outputs.metrics`); `run_training` serves /metrics
(--metrics-port) or pushes to a Pushgateway (--pushgateway) from the driver.

`build_training_pipeline` applies these steps to a pipeline the caller owns, so the job
can be extended or tested; `run_training` is what `aevb train` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.ingest import lifecycle
from pipeline.ingest.run_mirror import RunMirror, configure_stores, is_remote, store_options
from pipeline.ingest.scenarios import build_scenario
from pipeline.jobs.options import (
    AEVBOptions,
    cadence,
    drift_settings,
    exports_metrics,
    input_spec,
    model_config,
    read_examples,
    run_dir,
    scenario_spec,
)
from pipeline.jobs.run_lock import RunDirectoryLock
from pipeline.outputs.dead_letters import WriteDeadLetters
from pipeline.outputs.metrics import PrometheusObserver
from pipeline.outputs.metrics_export import MetricsExport
from pipeline.train.checkpoints import checkpointed_examples, remove_partial_checkpoints
from pipeline.train.progress import progress_log
from pipeline.train.snapshots import remove_staging
from pipeline.train.trainer import TestSetEvaluation, TrainVAE, close_live_sessions

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """The PCollections of a built training job."""

    records: beam.PCollection
    dead_letters: beam.PCollection
    job_id: str


def build_training_pipeline(
    pipeline: beam.Pipeline, options: AEVBOptions, job_id: str | None = None
) -> TrainingJob:
    job_id = job_id or uuid.uuid4().hex
    streaming = options.view_as(StandardOptions).streaming
    directory = run_dir(options)
    input_dim, likelihood = input_spec(options)
    examples, dead_letters = pipeline | "ReadExamples" >> read_examples(
        options,
        input_dim,
        likelihood,
        streaming=streaming,
        job_id=job_id,
        epochs=options.epochs,
        skip=checkpointed_examples(directory, options.model_key),
        scenario=scenario_spec(options),
    )
    evaluation = None
    if options.evaluate_every_examples:
        evaluation = TestSetEvaluation(
            options.dataset,
            options.data_dir,
            options.fallback_dataset,
            options.evaluate_examples,
            options.seed,
        )
    prometheus = exports_metrics(options)
    records = examples | "TrainVAE" >> TrainVAE(
        model_config(options),
        directory,
        cadence=cadence(options),
        max_batch_wait_seconds=options.max_batch_wait_seconds,
        max_examples=options.max_examples,
        default_key=options.model_key,
        job_id=job_id,
        evaluation=evaluation,
        streaming=streaming,
        observer_factories=(
            [functools.partial(PrometheusObserver, per_key=options.per_key_metrics)]
            if prometheus
            else []
        ),
        drift=drift_settings(options),
        reset_optimizer_on_drift=options.adaptation == "reset",
        max_models_in_memory=options.max_models_in_memory,
        regime_memory=options.regime_memory,
        store_options=store_options(options),
    )
    dead_letters = dead_letters | "WriteDeadLetters" >> WriteDeadLetters(
        directory,
        model_key=options.model_key,
        prometheus=prometheus,
        store_options=store_options(options),
    )
    return TrainingJob(records=records, dead_letters=dead_letters, job_id=job_id)


def run_training(options: PipelineOptions) -> beam.runners.runner.PipelineResult | None:
    """Runs the job until its input ends, --max-examples, or Ctrl-C.

    The first Ctrl-C (or SIGTERM) drains: sources stop, buffered minibatches train, the
    final checkpoint and snapshot are written, the job ends normally. A second Ctrl-C stops
    at once, still checkpointing the models open in this process.

    With --metrics-port or --pushgateway, metrics go to Prometheus from this process (see
    `pipeline.outputs.metrics_export.MetricsExport`), set up before any worker process starts.

    Raises:
        RunDirectoryBusy: another job holds the run directory (`pipeline.jobs.run_lock`).
        MetricsExportError: --metrics-port cannot be served.
    """
    aevb_options = options.view_as(AEVBOptions)
    directory = run_dir(aevb_options)
    # The job reads the store before Beam would configure it (the flags' --s3_endpoint_url).
    configure_stores(options)
    with _hold(directory):
        # Leftovers of a job killed mid-write (a full disk, kill -9): this job owns the
        # directory now, and nothing reads them.
        if is_remote(directory):
            leftovers = RunMirror.for_run(directory).remove_unpublished_versions()
        else:
            leftovers = remove_partial_checkpoints(directory) + remove_staging(directory)
        for leftover in leftovers:
            logger.info("removed %s, left by an interrupted write", leftover)
        export = None
        if exports_metrics(aevb_options):
            export = MetricsExport(
                address=aevb_options.metrics_address,
                port=aevb_options.metrics_port,
                pushgateway=aevb_options.pushgateway,
                push_job=aevb_options.push_job,
                push_interval_seconds=aevb_options.push_interval_seconds,
            ).start()
        try:
            record_drift_schedule(aevb_options)
            with lifecycle.cross_language_services(options):
                pipeline = beam.Pipeline(options=options)
                job = build_training_pipeline(pipeline, aevb_options)
                return lifecycle.run_draining_on_interrupt(pipeline, job.job_id)
        finally:
            # Models trained in this process (the local runners' workers) get their final
            # checkpoint and snapshot here. Elsewhere the checkpoint at the end of every
            # bundle keeps them, and in a batch job the end-of-input timer closes them.
            closed = close_live_sessions(directory)
            if closed:
                logger.info("wrote final checkpoints and snapshots of %d models", closed)
            if export is not None:
                export.close()  # after the final snapshots: the last push includes them


def _hold(directory: str) -> contextlib.AbstractContextManager:
    """The run directory's lock; none on an object store, which has no lock a crashed job
    would release (one job per run directory is then the user's to keep)."""
    if not is_remote(directory):
        return RunDirectoryLock(directory)
    logger.warning("%s is on an object store: not locked against a second job", directory)
    return contextlib.nullcontext()


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
    log = progress_log(run_dir(options))
    log.write(
        {
            "key": options.model_key,
            "examples": checkpointed_examples(run_dir(options), options.model_key),
            "drift_schedule": {"scenario": dataclasses.asdict(spec), "phases": phases},
        }
    )
    log.publish(force=True)
