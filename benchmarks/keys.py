"""`aevb bench keys`: a fleet of keyed models in one training job.

Each case trains K keys on the same data set's examples, dealt to the keys in minibatch
chunks, round robin, through the job's training stage (`TrainVAE` on FnApiRunner, with the
Prometheus observer the job adds). Each runs in a process of its own, so its peak resident
memory is its own, and reports:

- wall time of the pipeline and aggregate samples/s, against the bare `vae.Trainer`'s
  samples/s measured in the same process just before (one key, no Beam);
- the time from a new key's first minibatch to its first update once the job has compiled
  (`TrainingSession` opened on the run directory, one step), and the seconds a key's
  checkpoint and snapshot take, as medians over `probe_keys` further keys;
- the peak resident memory, with the bound the issue sets for it:
  1.5 x (keys in memory x state bytes) + 1.5 GB.

Run directories live in a temporary directory, removed after each case: 10,000 keys of
the 784-200-10 model write ~40 GB of checkpoints and snapshots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.machine import machine

__all__ = ["FleetCase", "default_cases", "fleet_benchmark", "parse_cases", "run_case"]

# The cases: the same total examples over 1 to 10,000 keys.
DEFAULT_KEY_COUNTS = (1, 10, 100, 1_000, 10_000)
GIGABYTE = 1024**3


@dataclasses.dataclass(frozen=True)
class FleetCase:
    """K keys with `examples_per_key` examples each, at most `max_models_in_memory` held."""

    keys: int
    examples_per_key: int
    max_models_in_memory: int | None = None

    @property
    def examples(self) -> int:
        return self.keys * self.examples_per_key


def default_cases(examples: int, max_models_in_memory: int) -> list[FleetCase]:
    """K = 1 ... 10,000 with `examples` in all (the bound on models held from 10,000 keys),
    and 1,000 keys x 1,000 examples beside 1 key x 10^6."""
    cases = [
        FleetCase(k, examples // k, max_models_in_memory if k > max_models_in_memory else None)
        for k in DEFAULT_KEY_COUNTS
    ]
    for extra in (FleetCase(1, 1_000_000), FleetCase(1_000, 1_000)):
        if extra not in cases:
            cases.append(extra)
    return cases


def parse_cases(text: str, examples: int, max_models_in_memory: int) -> list[FleetCase]:
    """Cases from "K" (K keys sharing `examples`) or "KxN" (K keys of N examples each).

    >>> parse_cases("10,1000x1000", 10_000, 500)
    [FleetCase(keys=10, examples_per_key=1000, max_models_in_memory=None), \
FleetCase(keys=1000, examples_per_key=1000, max_models_in_memory=500)]
    """
    cases = []
    for part in text.split(","):
        keys_text, times, per_key_text = part.strip().partition("x")
        try:
            keys = int(keys_text)
            per_key = int(per_key_text) if times else examples // keys
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--keys: {part!r} is not K or KxN") from None
        if keys < 1 or per_key < 1:
            raise ValueError(f"--keys: {part!r} needs at least one key and one example per key")
        bound = max_models_in_memory if keys > max_models_in_memory else None
        cases.append(FleetCase(keys, per_key, bound))
    return cases


def fleet_benchmark(
    dataset: str,
    config_dict: dict[str, Any],
    cases: Sequence[FleetCase],
    data_dir: str | None = None,
    fallback: str | None = None,
    probe_keys: int = 50,
    repeats: int = 1,
) -> dict[str, Any]:
    """Runs every case in a child process of its own, the whole list `repeats` times
    (alternating the cases: absolute times drift by 10-20% on a shared machine); each
    case reports its median run by wall time, with every run's wall time."""
    runs: list[list[dict[str, Any]]] = [[] for _ in cases]
    for _ in range(repeats):
        for index, case in enumerate(cases):
            spec = {
                "dataset": dataset,
                "data_dir": data_dir,
                "fallback": fallback,
                "config": config_dict,
                "case": dataclasses.asdict(case),
                "probe_keys": probe_keys,
            }
            runs[index].append(_run_child(spec))
    results = []
    for case_runs in runs:
        ordered = sorted(case_runs, key=lambda run: run["wall_seconds"])
        median = ordered[(len(ordered) - 1) // 2]
        results.append({**median, "runs_wall_seconds": [run["wall_seconds"] for run in case_runs]})
    return {"machine": machine(), "repeats": repeats, "cases": results, **_goals(results)}


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.keys", json.dumps(spec)],
            stdout=output,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        # wait4 reports the child's own peak resident memory, not the largest of all children.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    if child.returncode != 0:
        raise RuntimeError(f"fleet case {spec['case']} failed with status {child.returncode}")
    result = json.loads(text.strip().splitlines()[-1])
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
    held = result["case"]["max_models_in_memory"] or result["case"]["keys"]
    result["memory_bound_bytes"] = int(1.5 * held * result["state_bytes_per_key"] + 1.5 * GIGABYTE)
    return result


def _goals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, from the cases that measure them (None when not run)."""

    def find(keys: int, per_key: int) -> dict[str, Any] | None:
        for result in results:
            if (result["case"]["keys"], result["case"]["examples_per_key"]) == (keys, per_key):
                return result
        return None

    single, fleet = find(1, 1_000_000), find(1_000, 1_000)
    goals: dict[str, Any] = {
        "new_key_first_update_seconds_max": max(r["new_key_first_update_seconds"] for r in results),
        "peak_memory_within_bound": all(
            r["peak_rss_bytes"] <= r["memory_bound_bytes"] for r in results
        ),
    }
    if single and fleet:
        goals["wall_ratio_1000x1000_to_1x1e6"] = fleet["wall_seconds"] / single["wall_seconds"]
        goals["samples_per_second_ratio_1000_keys"] = fleet["samples_per_second_vs_trainer"]
        # The measure the two above stand for: what a key costs beyond its examples.
        goals["fixed_seconds_per_key"] = (fleet["wall_seconds"] - single["wall_seconds"]) / 1000
    return goals


# --------------------------------------------------------------------------- in the child


@functools.cache
def _examples(dataset: str, data_dir: str | None, fallback: str | None):
    from pipeline.ingest.datasets import load_dataset

    return load_dataset(dataset, data_dir, fallback=fallback).train


def _chunk(index: int, case: FleetCase, batch_size: int, source: tuple) -> tuple[str, Any]:
    """Chunk `index` of the stream: one minibatch for key index mod K."""
    data = _examples(*source)
    start = (index * batch_size) % (len(data) - batch_size)
    return f"key-{index % case.keys}", data[start : start + batch_size]


def _bare_trainer_rate(config, data, steps: int = 200, warmup: int = 20) -> float:
    import vae

    trainer = vae.Trainer(config)
    batches = [data[i * config.batch_size : (i + 1) * config.batch_size] for i in range(steps)]
    for batch in batches[:warmup]:
        trainer.train_step(batch)
    start = time.perf_counter()
    for batch in batches:
        trainer.train_step(batch)
    return steps * config.batch_size / (time.perf_counter() - start)


def _probe_new_keys(run_dir: str, config, data, keys: int) -> dict[str, float]:
    """Median seconds of a new key's first update, and of its checkpoint and snapshot."""
    import io

    from pipeline.train.progress import ProgressLog
    from pipeline.train.session import Cadence, TrainingSession

    progress = ProgressLog(os.path.join(run_dir, "probe-progress.jsonl"), stream=io.StringIO())
    batch = data[: config.batch_size]
    first, checkpoint, snapshot = [], [], []
    for index in range(keys):
        start = time.perf_counter()
        session = TrainingSession(run_dir, f"probe-{index}", config, Cadence(), progress)
        session.train(batch)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        session.checkpoint()
        checkpoint.append(time.perf_counter() - start)
        start = time.perf_counter()
        session.snapshot("probe")
        snapshot.append(time.perf_counter() - start)
    return {
        "new_key_first_update_seconds": statistics.median(first),
        "new_key_first_update_seconds_p95": sorted(first)[int(0.95 * (len(first) - 1))],
        "checkpoint_seconds": statistics.median(checkpoint),
        "snapshot_seconds": statistics.median(snapshot),
    }


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case, in this process: the job's training stage, then the probes."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    import vae
    from pipeline.outputs.metrics import PrometheusObserver
    from pipeline.train.trainer import TrainVAE
    from vae.model import parameter_count

    config = vae.VAEConfig.from_dict(spec["config"])
    case = FleetCase(**spec["case"])
    source = (spec["dataset"], spec["data_dir"], spec["fallback"])
    data = _examples(*source)
    trainer_rate = _bare_trainer_rate(config, data)
    chunks = -(-case.examples_per_key // config.batch_size) * case.keys
    with tempfile.TemporaryDirectory(prefix="aevb-fleet-") as run_dir:
        start = time.perf_counter()
        with beam.Pipeline(runner=FnApiRunner()) as pipeline:
            _ = (
                pipeline
                | beam.Create(range(chunks))
                | beam.Map(_chunk, case, config.batch_size, source)
                | TrainVAE(
                    config,
                    run_dir,
                    max_examples=case.examples_per_key,
                    observer_factories=(PrometheusObserver,),
                    max_models_in_memory=case.max_models_in_memory,
                )
            )
        wall = time.perf_counter() - start
        probes = _probe_new_keys(run_dir, config, data, spec["probe_keys"])
    return {
        "case": dataclasses.asdict(case),
        "config": {"hidden": config.hidden_dim, "latent_dim": config.latent_dim},
        "examples": case.examples,
        "wall_seconds": wall,
        "samples_per_second": case.examples / wall,
        "trainer_samples_per_second": trainer_rate,
        "samples_per_second_vs_trainer": case.examples / wall / trainer_rate,
        # Parameters and Adagrad accumulators, float32.
        "state_bytes_per_key": 2 * 4 * parameter_count(config),
        **probes,
    }


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
