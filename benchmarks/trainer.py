"""`aevb bench trainer`: samples/s of the paper's MNIST step against a reference command."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import time
from typing import Any

import numpy as np

import vae
from benchmarks.machine import PEAK_MATMUL_SIZE, machine, matmul_gflops

__all__ = ["trainer_throughput"]


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


def _run_reference(command: str) -> float:
    completed = subprocess.run(
        shlex.split(command), capture_output=True, text=True, check=True, timeout=600
    )
    last_line = completed.stdout.strip().splitlines()[-1]
    return float(json.loads(last_line)["samples_per_second"])
