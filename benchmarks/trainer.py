"""`aevb bench trainer`: samples/s of the paper's MNIST step against a reference command."""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import subprocess
import time
from collections.abc import Sequence
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
    reference_commands: Sequence[str] = (),
    precisions: Sequence[str] = ("float32",),
) -> dict[str, Any]:
    """Samples per second of `Trainer.train_step` on random binary data, in each of
    `precisions` (`config`'s own first).

    The same work as the shared PyTorch reference (`../shared/bench/torch_reference.py`): 50
    distinct minibatches cycled, results fetched to NumPy every step as a pipeline would.
    The trainers and the `reference_commands` run in turn within each repeat, and the medians
    are compared: ratios measured in one run, on the same machine load.
    """
    precisions = list(dict.fromkeys([config.precision, *precisions]))
    trainers = {
        precision: vae.Trainer(dataclasses.replace(config, precision=precision))
        for precision in precisions
    }
    rng = np.random.default_rng(config.seed)
    data = (rng.random((50 * config.batch_size, config.input_dim)) > 0.5).astype(np.float32)
    batches = np.split(data, 50)
    for trainer in trainers.values():
        for index in range(warmup_steps):
            trainer.train_step(batches[index % 50])
    runs: dict[str, list[float]] = {precision: [] for precision in precisions}
    reference_runs: dict[str, list[float]] = {command: [] for command in reference_commands}
    for _ in range(repeats):
        for precision, trainer in trainers.items():
            started = time.perf_counter()
            for index in range(steps):
                trainer.train_step(batches[index % 50])
            runs[precision].append(steps * config.batch_size / (time.perf_counter() - started))
        for command in reference_commands:
            reference_runs[command].append(_run_reference(command))
    by_precision = {precision: statistics.median(rates) for precision, rates in runs.items()}
    samples_per_second = by_precision[config.precision]
    flops = vae.train_flops_per_example(config)
    step_gflops = samples_per_second * flops / 1e9
    peak = matmul_gflops(PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE)
    result: dict[str, Any] = {
        "benchmark": "trainer",
        "samples_per_second": samples_per_second,
        "runs_samples_per_second": runs[config.precision],
        "samples_per_second_by_precision": by_precision,
        "runs_by_precision": runs,
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
    if reference_commands:
        references = [
            {
                "command": command,
                "samples_per_second": statistics.median(rates),
                "runs_samples_per_second": rates,
                "ratio_by_precision": {
                    precision: rate / statistics.median(rates)
                    for precision, rate in by_precision.items()
                },
            }
            for command, rates in reference_runs.items()
        ]
        first = references[0]
        result.update(
            references=references,
            reference_command=first["command"],
            reference_samples_per_second=first["samples_per_second"],
            ratio_to_reference=samples_per_second / first["samples_per_second"],
        )
    return result


def _run_reference(command: str) -> float:
    completed = subprocess.run(
        shlex.split(command), capture_output=True, text=True, check=True, timeout=600
    )
    last_line = completed.stdout.strip().splitlines()[-1]
    return float(json.loads(last_line)["samples_per_second"])
