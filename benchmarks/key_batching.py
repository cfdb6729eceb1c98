"""`aevb bench key-batching`: would one XLA call over several keys beat a call per key?

A fleet trains keys of one configuration through one compiled step that takes each key's
variables as arguments (`vae.train.StepProgram`); a model alone in its process keeps a
step with its variables captured. Training K keys in one call over stacked parameters
(batched matmuls) would save the difference, the binding of a call's arguments, once per
key-step -- and must copy each key's parameters and optimiser state into the stacked
tensors and back, as long as the state is kept per key (its checkpoints, snapshots and
evictions are). This measures, per key-step of K keys trained in turn on one minibatch:

- `dedicated_ms`: one model alone, its own captured step;
- `shared_ms`: K models through the shared step;
- `stacking_ms`: the copy alone, K keys' variables stacked and written back in one
  compiled call with no arithmetic -- the least a batched step over per-key state adds.

Batching can pay only if `stacking_ms` < `shared_ms` - `dedicated_ms`.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

import vae
from benchmarks.machine import machine


def key_batching(config: vae.VAEConfig, keys: int = 8, repeats: int = 30) -> dict[str, Any]:
    """Per key-step milliseconds of the three ways above, medians of `repeats` rounds."""
    batch = (np.random.default_rng(0).random((config.batch_size, config.input_dim)) > 0.5).astype(
        np.float32
    )
    # Made first, while no other model of its configuration lives: it gets its own step.
    alone = vae.Trainer(config)
    fleet = [
        vae.Trainer(dataclasses.replace(config, seed=config.seed + 1 + i)) for i in range(keys)
    ]
    states = [tf.nest.flatten([t.model.parameters(), t.optimizer.state()]) for t in fleet]
    stack_and_write_back = stacking_copy(states)

    def train_alone() -> None:
        for _ in range(keys):
            alone.train_step(batch)

    def train_fleet() -> None:
        for trainer in fleet:
            trainer.train_step(batch)

    rounds = {"dedicated": train_alone, "shared": train_fleet, "stacking": stack_and_write_back}
    for run in rounds.values():  # compile and warm up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(repeats):  # alternating, so that drift of the machine hits all three
        for name, run in rounds.items():
            started = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - started) / keys)
    per_key_ms = {name: 1e3 * statistics.median(values) for name, values in seconds.items()}
    saving = per_key_ms["shared"] - per_key_ms["dedicated"]
    return {
        "benchmark": "key-batching",
        "keys": keys,
        "repeats": repeats,
        "config": config.to_dict(),
        "dedicated_ms": per_key_ms["dedicated"],
        "shared_ms": per_key_ms["shared"],
        "stacking_ms": per_key_ms["stacking"],
        "binding_ms": saving,
        "batching_can_pay": per_key_ms["stacking"] < saving,
        "machine": machine(),
    }


def stacking_copy(states: list[list[tf.Variable]]) -> Callable[[], None]:
    """A compiled call that stacks every key's variables and writes the rows back."""
    count = len(states[0])

    @tf.function(jit_compile=True)
    def copy() -> None:
        for position in range(count):
            stacked = tf.stack([state[position].read_value() for state in states])
            for row, state in enumerate(states):
                state[position].assign(stacked[row])

    return copy
