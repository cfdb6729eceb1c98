"""`aevb bench runners`: the streaming job on the local runner, on Prism, and fed by Kafka.

Three sides alternate `repeats` times, each the same streaming job over the same examples
(`examples` of the data set, one model key): the dataset source on `FnApiRunner`, the
dataset source on Prism (Beam's portable runner, SDK workers in this process), and a Kafka
topic holding those examples on Prism (Beam's Java KafkaIO through the expansion service
`make services` builds; a topic per run, filled before the job starts). Each side's rate is
its steady samples/s between progress lines past the first tenth (`benchmarks.job`), so
start-up (Prism, the expansion service, the Java worker) is reported apart, as the job's
total seconds.

Then the latency run: `aevb produce` sends `latency_examples` messages at
`latency_rate` per second while the Prism job trains from the topic; every progress line
gives the lag from the creation of the last minibatch's newest message to the update that
learned it (`event_lag_seconds`), summarised over the second half of the run (the first
holds the messages sent while the job was starting).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from benchmarks.job import steady_rate
from benchmarks.machine import machine
from benchmarks.services import expansion_service_jar, kafka_broker, prism_flags, stop
from pipeline.ingest.datasets import Dataset
from pipeline.jobs.options import DEFAULT_RUNNER
from pipeline.jobs.produce import produce
from pipeline.jobs.train import run_training
from pipeline.train.progress import read_progress

__all__ = ["runner_benchmark"]

SIDES = ("fnapi-dataset", "prism-dataset", "prism-kafka")


def runner_benchmark(
    dataset: Dataset,
    model_flags: Sequence[str],
    examples: int = 100_000,
    repeats: int = 3,
    latency_examples: int = 60_000,
    latency_rate: float = 1_000.0,
    extra_flags: Sequence[str] = (),
) -> dict[str, Any]:
    """Samples/s of each side (median of `repeats`, alternated) and the latency run."""
    rates: dict[str, list[float]] = {side: [] for side in SIDES}
    totals: dict[str, list[float]] = {side: [] for side in SIDES}
    jar = str(expansion_service_jar())
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="aevb-bench-runners-"))
        bootstrap = stack.enter_context(kafka_broker(pathlib.Path(scratch, "broker")))
        for repeat in range(repeats):
            for side in SIDES:
                run_dir = os.path.join(scratch, f"{side}-{repeat}")
                flags = [
                    "--streaming",
                    f"--dataset={dataset.name}",
                    f"--max-examples={examples}",
                    f"--output={run_dir}",
                    "--log-every-steps=10",
                    *model_flags,
                    *extra_flags,
                ]
                flags += (
                    prism_flags() if side.startswith("prism") else [f"--runner={DEFAULT_RUNNER}"]
                )
                if side.endswith("kafka"):
                    topic = f"examples-{repeat}"
                    produce(bootstrap, topic, dataset.train, max_examples=examples)
                    flags += [
                        f"--source=kafka:{bootstrap}/{topic}",
                        f"--kafka-expansion-service={jar}",
                    ]
                started = time.perf_counter()
                run_training(PipelineOptions(flags))
                totals[side].append(time.perf_counter() - started)
                rates[side].append(steady_rate(os.path.join(run_dir, "progress.jsonl"), examples))
        latency = _latency_run(
            bootstrap,
            dataset,
            model_flags,
            extra_flags,
            jar,
            os.path.join(scratch, "latency"),
            latency_examples,
            latency_rate,
        )
    median = {side: statistics.median(rates[side]) for side in SIDES}
    return {
        "benchmark": "runners",
        "examples": examples,
        "repeats": repeats,
        "samples_per_second": median,
        "runs_samples_per_second": rates,
        "total_seconds": {side: statistics.median(totals[side]) for side in SIDES},
        "prism_over_fnapi": median["prism-dataset"] / median["fnapi-dataset"],
        "kafka_over_dataset_on_prism": median["prism-kafka"] / median["prism-dataset"],
        "latency": latency,
        "machine": machine(),
    }


def _latency_run(
    bootstrap: str,
    dataset: Dataset,
    model_flags: Sequence[str],
    data_flags: Sequence[str],
    jar: str,
    run_dir: str,
    examples: int,
    rate: float,
) -> dict[str, Any]:
    """An unbounded streaming Prism job on a topic `aevb produce` fills at `rate`
    messages/s, stopped once it has trained `examples`. Unbounded: with --max-examples the
    Kafka read is bounded, and Beam hands on the messages only once it has read them all."""
    from kafka.admin import KafkaAdminClient, NewTopic  # the kafka extra

    topic = "latency"
    # KafkaIO fails at the start on a topic that does not exist yet.
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()
    aevb = os.path.join(os.path.dirname(sys.executable), "aevb")
    progress = os.path.join(run_dir, "progress.jsonl")
    producer = subprocess.Popen(
        [
            *(aevb, "produce", "--bootstrap", bootstrap, "--topic", topic),
            *(f"--dataset={dataset.name}", f"--max-examples={examples}"),
            f"--examples-per-second={rate}",
            *data_flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115 -- closed in the finally below
    job = subprocess.Popen(
        [
            *(aevb, "train", "--streaming", f"--source=kafka:{bootstrap}/{topic}"),
            *(f"--kafka-expansion-service={jar}", f"--dataset={dataset.name}"),
            *(f"--output={run_dir}", "--log-every-steps=1", *model_flags, *data_flags),
            *prism_flags(),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120 + 2 * examples / rate
        # Until all are trained, or nothing more is 10 s after the producer is done: runs of
        # 20,000 and 10,000 messages ended 84 and 147 short (not the flush timer: on Prism it
        # trained a topic's last 50 of 150 messages 2 s after, as --max-batch-wait-seconds 2
        # says; the read, not yet known). The result says how many were trained.
        trained, idle_since = 0, time.monotonic()
        while trained < examples:
            if _trained(progress) > trained:
                trained, idle_since = _trained(progress), time.monotonic()
            started = trained > 0  # the job takes ~20 s to start
            if started and producer.poll() is not None and time.monotonic() - idle_since > 10:
                break
            if job.poll() is not None or time.monotonic() > deadline:
                with open(f"{run_dir}.log") as output:
                    tail = output.read()[-3000:]
                raise RuntimeError(f"the Kafka job trained {trained} of {examples}:\n{tail}")
            time.sleep(0.5)
    finally:
        # A Kafka read does not end on a drain request: the second Ctrl-C stops at once
        # (its models were checkpointed at the end of every bundle).
        job.send_signal(signal.SIGINT)
        time.sleep(2)
        # Time to stop Prism and the expansion service it started: killed, the job would
        # leave both running.
        stop(job, timeout=60, sig=signal.SIGINT)
        log.close()
        producer.wait(timeout=600)
    lines = [p for p in read_progress(progress) if "elbo" in p]
    steady = np.array([p["event_lag_seconds"] for p in lines[len(lines) // 2 :]])
    return {
        "examples": examples,
        "trained": trained,
        "messages_per_second": rate,
        "minibatches": len(steady),
        "median_seconds": float(np.median(steady)),
        "p95_seconds": float(np.percentile(steady, 95)),
        "max_seconds": float(steady.max()),
    }


def _trained(progress: str) -> int:
    lines = read_progress(progress) if os.path.exists(progress) else []
    return max((p["examples"] for p in lines), default=0)
