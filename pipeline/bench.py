"""Benchmarks behind `aevb bench ...`: each returns one JSON-ready dict.

Timings on small shared machines move by 10-20% from run to run, so every benchmark that
compares two things alternates them inside one call and reports medians and their ratio.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

import vae
from pipeline.datasets import Dataset
from pipeline.replay import replay_chunks

# Square enough to reach the BLAS kernel's peak, small enough to time in a fraction of a second.
PEAK_MATMUL_SIZE = 1024


def trainer_throughput(
    config: vae.VAEConfig,
    steps: int = 1000,
    warmup_steps: int = 30,
    repeats: int = 3,
    reference_command: str | None = None,
) -> dict[str, Any]:
    """Samples per second of `Trainer.train_step` on random binary data.

    The same work as the shared PyTorch reference (`../shared/bench/torch_reference.py`): 50
    distinct minibatches cycled, results fetched to NumPy every step as a pipeline would.
    With `reference_command`, that command runs between the repeats and the medians of
    both are compared.
    """
    trainer = vae.Trainer(config)
    rng = np.random.default_rng(config.seed)
    data = (rng.random((50 * config.batch_size, config.input_dim)) > 0.5).astype(np.float32)
    batches = np.split(data, 50)
    for index in range(warmup_steps):
        trainer.train_step(batches[index % 50])
    runs, reference_runs = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for index in range(steps):
            trainer.train_step(batches[index % 50])
        runs.append(steps * config.batch_size / (time.perf_counter() - started))
        if reference_command:
            reference_runs.append(_run_reference(reference_command))
    samples_per_second = statistics.median(runs)
    flops = vae.train_flops_per_example(config)
    step_gflops = samples_per_second * flops / 1e9
    peak = matmul_gflops(PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE)
    result: dict[str, Any] = {
        "benchmark": "trainer",
        "samples_per_second": samples_per_second,
        "runs_samples_per_second": runs,
        "config": config.to_dict(),
        "flops_per_example": flops,
        "achieved_gflops": step_gflops,
        "machine_matmul_gflops": peak,
        "fraction_of_matmul_rate": step_gflops / peak,
        "step_shape_matmul_gflops": matmul_gflops(
            config.batch_size, config.input_dim, config.hidden_dim
        ),
        "machine": machine(),
    }
    if reference_runs:
        reference = statistics.median(reference_runs)
        result.update(
            reference_command=reference_command,
            reference_samples_per_second=reference,
            runs_reference_samples_per_second=reference_runs,
            ratio_to_reference=samples_per_second / reference,
        )
    return result


def matmul_gflops(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    """Sustained float32 matmul rate of this machine for [m, k] x [k, n], in GFLOP/s."""
    a = tf.random.normal([m, k])
    b = tf.random.normal([k, n])
    repeats = 20

    @tf.function
    def product_chain(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        total = tf.zeros([m, n])
        for _ in tf.range(repeats):
            total += tf.matmul(a, b)
        return total

    product_chain(a, b).numpy()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        product_chain(a, b).numpy()
        calls += 1
    elapsed = time.perf_counter() - started
    return 2.0 * m * k * n * repeats * calls / elapsed / 1e9


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }


def _run_reference(command: str) -> float:
    completed = subprocess.run(
        shlex.split(command), capture_output=True, text=True, check=True, timeout=600
    )
    last_line = completed.stdout.strip().splitlines()[-1]
    return float(json.loads(last_line)["samples_per_second"])


def pipeline_throughput(
    dataset: Dataset,
    config: vae.VAEConfig,
    examples: int = 200_000,
    chunk_size: int = 1000,
    source: str = "dataset",
    runner: str = "FnApiRunner",
    extra_flags: Sequence[str] = (),
    files_format: str | None = None,
) -> dict[str, Any]:
    """Steady-state samples/s of the streaming job against the bare trainer, same config.

    Both are timed after their compile and start-up: the trainer after a warm-up, the
    job between its first and last progress lines (the job writes one every 10 steps), so
    the ratio measures what Beam adds per example, not start-up costs. With `files_format`
    (`jsonl`, `csv` or `npy`) the examples are first written to files of FILE_ROWS rows in
    that format, and the job watches their folder: the cost of decoding per-record text.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.job import run_training
    from pipeline.progress import read_progress

    trainer_rate = _bare_trainer_rate(dataset.train, config, examples)
    with tempfile.TemporaryDirectory(prefix="aevb-bench-") as run_dir:
        if files_format is not None:
            folder = os.path.join(run_dir, "incoming")
            _write_example_files(dataset.train, examples, folder, files_format)
            source = f"files:{folder}/*.{files_format}"
        flags = [
            f"--runner={runner}",
            "--streaming",
            f"--source={source}",
            f"--dataset={dataset.name}",
            f"--max-examples={examples}",
            f"--chunk-size={chunk_size}",
            f"--output={run_dir}",
            "--log-every-steps=10",
            f"--latent-dim={config.latent_dim}",
            f"--hidden={config.hidden_dim}",
            f"--batch-size={config.batch_size}",
            f"--learning-rate={config.learning_rate}",
            f"--seed={config.seed}",
            *extra_flags,
        ]
        started = time.perf_counter()
        run_training(PipelineOptions(flags))
        total_seconds = time.perf_counter() - started
        progress = read_progress(os.path.join(run_dir, "progress.jsonl"))
    # Skip the first tenth: the first lines include compilation and the source's start.
    steady = [p for p in progress if p["examples"] >= examples // 10]
    first, last = steady[0], steady[-1]
    pipeline_rate = (last["examples"] - first["examples"]) / (
        last["wall_seconds"] - first["wall_seconds"]
    )
    return {
        "benchmark": "pipeline",
        "source": source,
        "runner": runner,
        "examples": examples,
        "chunk_size": chunk_size,
        "pipeline_samples_per_second": pipeline_rate,
        "trainer_samples_per_second": trainer_rate,
        "ratio": pipeline_rate / trainer_rate,
        "pipeline_total_seconds": total_seconds,
        "config": config.to_dict(),
        "machine": machine(),
    }


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


def memory_growth(
    dataset: Dataset,
    config: vae.VAEConfig,
    examples: int = 2_000_000,
    baseline_examples: int = 100_000,
    runner: str = "FnApiRunner",
    extra_flags: Sequence[str] = (),
) -> dict[str, Any]:
    """Resident memory of a long streaming job: at `baseline_examples` and at the end.

    A sampler thread reads this process's VmRSS (the local runner trains in-process) and
    the examples of the newest progress line twice a second.
    """
    import threading

    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.job import run_training

    samples: list[tuple[int, int]] = []
    done = threading.Event()
    with tempfile.TemporaryDirectory(prefix="aevb-memory-") as run_dir:
        progress_path = os.path.join(run_dir, "progress.jsonl")

        def sample() -> None:
            while not done.wait(0.5):
                examples_now = _last_examples(progress_path)
                if examples_now is not None:
                    samples.append((examples_now, _resident_bytes()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        flags = [
            f"--runner={runner}",
            "--streaming",
            f"--dataset={dataset.name}",
            f"--max-examples={examples}",
            f"--output={run_dir}",
            "--log-every-steps=50",
            "--snapshot-every-examples=200000",
            f"--latent-dim={config.latent_dim}",
            f"--hidden={config.hidden_dim}",
            f"--batch-size={config.batch_size}",
            f"--seed={config.seed}",
            *extra_flags,
        ]
        try:
            run_training(PipelineOptions(flags))
        finally:
            done.set()
            sampler.join()
    baseline = next(rss for seen, rss in samples if seen >= baseline_examples)
    final = samples[-1][1]
    return {
        "benchmark": "memory",
        "examples": examples,
        "baseline_examples": baseline_examples,
        "rss_bytes_at_baseline": baseline,
        "rss_bytes_at_end": final,
        "growth": final / baseline - 1,
        "rss_samples": samples[:: max(1, len(samples) // 40)],
        "machine": machine(),
    }


def _resident_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _last_examples(path: str) -> int | None:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 4096))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["examples"])
        except (ValueError, KeyError):
            continue
    return None
