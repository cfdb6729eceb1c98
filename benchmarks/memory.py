"""`aevb bench memory`: resident memory of a long streaming job."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from benchmarks.machine import machine
from pipeline.ingest.datasets import Dataset
from pipeline.jobs.train import run_training

__all__ = ["memory_growth"]


def memory_growth(
    dataset: Dataset,
    model_flags: Sequence[str],
    examples: int = 2_000_000,
    baseline_examples: int = 100_000,
    runner: str = "FnApiRunner",
    extra_flags: Sequence[str] = (),
) -> dict[str, Any]:
    """Resident memory of a long streaming job: at `baseline_examples` and at the end.

    `model_flags` are the job's model flags (`pipeline.jobs.options.model_flags`).

    A sampler thread reads this process's VmRSS (the local runner trains in-process) and
    the examples of the newest progress line twice a second.
    """

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
            *model_flags,
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
