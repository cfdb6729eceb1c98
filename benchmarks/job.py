"""`aevb bench pipeline`: the Beam job's samples/s against the bare trainer's, same model."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

import vae
from benchmarks.machine import machine
from pipeline.ingest.datasets import Dataset
from pipeline.ingest.replay import replay_chunks
from pipeline.jobs.train import run_training
from pipeline.train.checkpoints import CONFIG_FILE
from pipeline.train.progress import read_progress

__all__ = ["pipeline_throughput", "steady_rate"]


def pipeline_throughput(
    dataset: Dataset,
    config: vae.VAEConfig,
    model_flags: Sequence[str],
    examples: int = 200_000,
    chunk_size: int = 1000,
    source: str = "dataset",
    runner: str = "FnApiRunner",
    extra_flags: Sequence[str] = (),
    files_format: str | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Steady-state samples/s of the streaming job against the bare trainer, same config.

    `model_flags` are the job's model flags, those `config` was made from
    (`pipeline.jobs.options.model_flags`), so both sides train the same model; the result's
    `job_config` is the config the job's checkpoint recorded. The two sides alternate
    `repeats` times. Both are timed after their compile and start-up: the trainer after a
    warm-up, the job between its first and last progress lines (one every 10 steps) past the
    first tenth of the examples, so the ratio measures what Beam adds per example, not
    start-up costs. With `files_format` (`jsonl`, `csv` or `npy`) the examples are first
    written to files of FILE_ROWS rows in that format, and the job watches their folder:
    the cost of decoding per-record text.
    """
    trainer_runs, job_runs, total_seconds = [], [], []
    with tempfile.TemporaryDirectory(prefix="aevb-bench-") as scratch:
        if files_format is not None:
            folder = os.path.join(scratch, "incoming")
            _write_example_files(dataset.train, examples, folder, files_format)
            source = f"files:{folder}/*.{files_format}"
        for repeat in range(repeats):
            trainer_runs.append(_bare_trainer_rate(dataset.train, config, examples))
            run_dir = os.path.join(scratch, f"run-{repeat}")
            flags = [
                f"--runner={runner}",
                "--streaming",
                f"--source={source}",
                f"--dataset={dataset.name}",
                f"--max-examples={examples}",
                f"--chunk-size={chunk_size}",
                f"--output={run_dir}",
                "--log-every-steps=10",
                *model_flags,
                *extra_flags,
            ]
            started = time.perf_counter()
            run_training(PipelineOptions(flags))
            total_seconds.append(time.perf_counter() - started)
            job_runs.append(steady_rate(os.path.join(run_dir, "progress.jsonl"), examples))
            job_config = _checkpoint_config(run_dir)
    pipeline_rate = statistics.median(job_runs)
    trainer_rate = statistics.median(trainer_runs)
    return {
        "benchmark": "pipeline",
        "source": source,
        "runner": runner,
        "examples": examples,
        "chunk_size": chunk_size,
        "repeats": repeats,
        "pipeline_samples_per_second": pipeline_rate,
        "trainer_samples_per_second": trainer_rate,
        "runs_pipeline_samples_per_second": job_runs,
        "runs_trainer_samples_per_second": trainer_runs,
        "ratio": pipeline_rate / trainer_rate,
        "pipeline_total_seconds": statistics.median(total_seconds),
        "config": config.to_dict(),
        "job_config": job_config,
        "machine": machine(),
    }


def steady_rate(progress_path: str, examples: int) -> float:
    """Examples per second between the job's progress lines past its first tenth."""
    # Skip the first tenth: the first lines include compilation and the source's start.
    steady = [p for p in read_progress(progress_path) if p["examples"] >= examples // 10]
    first, last = steady[0], steady[-1]
    return (last["examples"] - first["examples"]) / (last["wall_seconds"] - first["wall_seconds"])


def _checkpoint_config(run_dir: str) -> dict[str, Any]:
    """The model config the job's checkpoint recorded (one model key: the default)."""
    (path,) = pathlib.Path(run_dir, "checkpoints").glob(f"*/{CONFIG_FILE}")
    return json.loads(path.read_text())


FILE_ROWS = 5000


def _write_example_files(data: np.ndarray, examples: int, folder: str, fmt: str) -> None:
    """`examples` rows of `data` (cycled) as files of FILE_ROWS rows, one record per row."""
    os.makedirs(folder)
    rows = np.resize(data, (examples, data.shape[1]))
    # Shortest exact text for binary data; 4 decimals otherwise (the text formats' real use).
    text = (lambda v: f"{v:g}") if np.isin(data[:100], (0.0, 1.0)).all() else (lambda v: f"{v:.4f}")
    for index, start in enumerate(range(0, examples, FILE_ROWS)):
        part = rows[start : start + FILE_ROWS]
        path = os.path.join(folder, f"part-{index:05d}.{fmt}")
        if fmt == "npy":
            np.save(path, part)
            continue
        lines = (",".join(text(v) for v in row) for row in part)
        if fmt == "jsonl":
            lines = (f"[{line}]" for line in lines)
        with open(path, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def _bare_trainer_rate(data: np.ndarray, config: vae.VAEConfig, examples: int) -> float:
    trainer = vae.Trainer(config)
    batches = replay_chunks(data, config.batch_size, max_examples=examples, seed=config.seed)
    warmup = 20
    for _ in range(warmup):
        trainer.train_step(next(batches))
    started = time.perf_counter()
    trained = 0
    for batch in batches:
        trainer.train_step(batch)
        trained += len(batch)
    return trained / (time.perf_counter() - started)
