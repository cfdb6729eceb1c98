"""The training job: source -> decode/validate -> TrainVAE -> records, as one Beam pipeline.

    read (dataset | files | kafka)
      -> decode and validate  --(bad records)--> dead_letter/*.jsonl
      -> TrainVAE (key, minibatch, test-then-train)
      -> training records

Each model key's session updates the Prometheus metrics and watches the bound for drift
(`pipeline.metrics`, `pipeline.drift`); `run_training` serves /metrics (--metrics-port) or
pushes to a Pushgateway (--pushgateway) from the driver.

`build_training_pipeline` applies these steps to a pipeline the caller owns, so the job
can be extended or tested; `run_training` is what `aevb train` calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline import lifecycle
from pipeline.checkpoints import CheckpointStore
from pipeline.dead_letter import DEAD_LETTER_TAG, WriteDeadLetters
from pipeline.decode import DecodeFiles, DecodeRecords, ValidateChunks
from pipeline.metrics import MetricsExport
from pipeline.options import (
    AEVBOptions,
    cadence,
    drift_settings,
    input_spec,
    metrics_settings,
    model_config,
    run_dir,
    scenario_spec,
)
from pipeline.sources import ReplayDataset, kafka_source, parse_source, read_files
from pipeline.trainer import TestSetEvaluation, TrainVAE, close_live_sessions

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """The PCollections of a built training job."""

    records: beam.PCollection
    dead_letters: beam.PCollection
    job_id: str


def examples_already_seen(run_directory: str, key: str) -> int:
    """Examples a previous run of `key` trained on, from its checkpoint (0 if none)."""
    state = pathlib.Path(run_directory) / "checkpoints" / key / CheckpointStore.STATE_FILE
    return json.loads(state.read_text())["examples_seen"] if state.exists() else 0


def build_training_pipeline(
    pipeline: beam.Pipeline, options: AEVBOptions, job_id: str | None = None
) -> TrainingJob:
    job_id = job_id or uuid.uuid4().hex
    streaming = options.view_as(StandardOptions).streaming
    directory = run_dir(options)
    config = model_config(options)
    input_dim, likelihood = input_spec(options)
    kind, argument = parse_source(options.source)

    if kind == "dataset":
        already = examples_already_seen(directory, options.model_key)
        examples, dead_letters = (
            pipeline
            | "ReplayDataset"
            >> ReplayDataset(
                options.dataset,
                data_dir=options.data_dir,
                fallback=options.fallback_dataset,
                model_key=options.model_key,
                chunk_size=options.chunk_size,
                # Counted from the start of the replay, which `skip` resumes.
                max_examples=options.max_examples,
                epochs=None if options.epochs is None else options.epochs,
                streaming=streaming,
                examples_per_second=options.examples_per_second,
                seed=options.seed,
                skip=already,
                job_id=job_id,
                scenario=scenario_spec(options),
            )
            | "Validate"
            >> beam.ParDo(ValidateChunks(input_dim, likelihood)).with_outputs(
                DEAD_LETTER_TAG, main="examples"
            )
        )
    elif kind == "files":
        examples, dead_letters = (
            pipeline
            | "ReadFiles"
            >> read_files(
                argument,
                streaming=streaming,
                job_id=job_id,
                poll_interval_seconds=options.poll_interval_seconds,
            )
            | "Decode"
            >> beam.ParDo(DecodeFiles(input_dim, likelihood, options.model_key)).with_outputs(
                DEAD_LETTER_TAG, main="examples"
            )
        )
    else:
        decoded = (
            pipeline
            | "ReadKafka" >> kafka_source(argument, max_examples=options.max_examples)
            | "Decode"
            >> DecodeRecords(input_dim, likelihood, options.model_key, source=options.source)
        )
        examples, dead_letters = decoded[None], decoded[DEAD_LETTER_TAG]

    evaluation = None
    if options.evaluate_every_examples:
        evaluation = TestSetEvaluation(
            options.dataset,
            options.data_dir,
            options.fallback_dataset,
            options.evaluate_examples,
            options.seed,
        )
    records = examples | "TrainVAE" >> TrainVAE(
        config,
        directory,
        cadence=cadence(options),
        max_batch_wait_seconds=options.max_batch_wait_seconds,
        max_examples=options.max_examples,
        default_key=options.model_key,
        job_id=job_id,
        evaluation=evaluation,
        streaming=streaming,
        metrics=metrics_settings(options),
        drift=drift_settings(options),
        reset_optimizer_on_drift=options.adaptation == "reset",
    )
    dead_letters = dead_letters | "WriteDeadLetters" >> WriteDeadLetters(
        directory,
        model_key=options.model_key,
        prometheus=metrics_settings(options) is not None,
    )
    return TrainingJob(records=records, dead_letters=dead_letters, job_id=job_id)


def run_training(options: PipelineOptions) -> beam.runners.runner.PipelineResult | None:
    """Runs the job until its input ends, --max-examples, or Ctrl-C.

    The first Ctrl-C (or SIGTERM) drains: sources stop, buffered minibatches train, the
    final checkpoint and snapshot are written, the job ends normally. A second Ctrl-C stops
    at once, still checkpointing the models open in this process.

    With --metrics-port or --pushgateway, metrics go to Prometheus from this process (see
    `pipeline.metrics.MetricsExport`), set up before any worker process starts.
    """
    aevb_options = options.view_as(AEVBOptions)
    directory = run_dir(aevb_options)
    os.makedirs(directory, exist_ok=True)
    export = None
    if metrics_settings(aevb_options) is not None:
        export = MetricsExport(
            address=aevb_options.metrics_address,
            port=aevb_options.metrics_port,
            pushgateway=aevb_options.pushgateway,
            push_job=aevb_options.push_job,
            push_interval_seconds=aevb_options.push_interval_seconds,
        ).start()
    pipeline = beam.Pipeline(options=options)
    job = build_training_pipeline(pipeline, aevb_options)

    try:
        return lifecycle.run_draining_on_interrupt(pipeline, job.job_id)
    finally:
        # Models trained in this process (the local runners' workers) get their final
        # checkpoint and snapshot here; remote workers checkpoint theirs in DoFn.teardown.
        closed = close_live_sessions(directory)
        if closed:
            logger.info("wrote final checkpoints and snapshots of %d models", closed)
        if export is not None:
            export.close()  # after the final snapshots: the last push includes them
