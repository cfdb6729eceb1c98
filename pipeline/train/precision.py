"""`--precision auto`: bfloat16 matrix products only where this CPU makes them faster.

A bfloat16 training step (`VAEConfig.precision`) needs the CPU's bfloat16 instructions to
gain anything -- AVX512_BF16's dot products or AMX's tiles, which oneDNN uses for
TensorFlow's MatMul -- and even then it runs in graph mode, since XLA computes bfloat16 dots
in float32 (see `vae.train.uses_xla`), against a float32 step that XLA compiles whole. So
`auto` picks bfloat16 only on a CPU that has the instructions and only when the two steps,
timed alternately on random data of the model's shape, put bfloat16 ahead by
`MIN_SPEEDUP`; otherwise float32, with the reason.

>>> import vae
>>> config = vae.VAEConfig(input_dim=4, latent_dim=2, hidden_dim=8, batch_size=2)
>>> choice = choose_precision(config, cpu_flags=set())
>>> choice.precision, choice.reason
('float32', 'this CPU has no bfloat16 matrix instructions (avx512_bf16, amx_bf16)')
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

import vae

__all__ = [
    "BFLOAT16_MATRIX_FLAGS",
    "MIN_SPEEDUP",
    "PrecisionChoice",
    "bfloat16_matrix_flags",
    "choose_precision",
    "step_rates",
]

# The /proc/cpuinfo flags of the instructions oneDNN multiplies bfloat16 matrices with.
BFLOAT16_MATRIX_FLAGS = ("avx512_bf16", "amx_bf16")
# The bfloat16 step must win clearly: on an AMD EPYC with AVX512_BF16 (no AMX) it measured
# 0.89-1.05x the float32 step in medians of alternated runs (docs/benchmarks.md), within
# the repeat-to-repeat spread of these machines, and a choice that flips between restarts
# of a job helps nobody.
MIN_SPEEDUP = 1.10


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """What `auto` chose, why, and the step rates (samples/s by precision) it measured."""

    precision: str
    reason: str
    samples_per_second: dict[str, float] = dataclasses.field(default_factory=dict)


def bfloat16_matrix_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """This CPU's bfloat16 matrix instructions, as /proc/cpuinfo names them (none where
    there is no such file)."""
    try:
        with open(cpuinfo) as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.partition(":")[2].split()) & set(BFLOAT16_MATRIX_FLAGS)


def step_rates(config: vae.VAEConfig, steps: int = 100, repeats: int = 3) -> dict[str, float]:
    """Samples/s of the float32 and the bfloat16 training step of `config`'s model on random
    data, timed alternately, the median of `repeats` runs of `steps` steps each."""
    rng = np.random.default_rng(config.seed)
    batches = np.split(rng.random((10 * config.batch_size, config.input_dim), np.float32), 10)
    trainers = {
        precision: vae.Trainer(dataclasses.replace(config, precision=precision))
        for precision in vae.PRECISIONS
    }
    for trainer in trainers.values():  # compiled and warm before they are timed
        for batch in batches:
            trainer.train_step(batch)
    runs: dict[str, list[float]] = {precision: [] for precision in trainers}
    for _ in range(repeats):
        for precision, trainer in trainers.items():
            started = time.perf_counter()
            for index in range(steps):
                trainer.train_step(batches[index % len(batches)])
            runs[precision].append(steps * config.batch_size / (time.perf_counter() - started))
    return {precision: float(np.median(rates)) for precision, rates in runs.items()}


def choose_precision(config: vae.VAEConfig, cpu_flags: set[str] | None = None) -> PrecisionChoice:
    """float32 or bfloat16 for training `config`'s model on this CPU (`cpu_flags`: its
    bfloat16 matrix instructions, read from /proc/cpuinfo when not given)."""
    flags = bfloat16_matrix_flags() if cpu_flags is None else cpu_flags
    if not flags:
        names = ", ".join(BFLOAT16_MATRIX_FLAGS)
        return PrecisionChoice("float32", f"this CPU has no bfloat16 matrix instructions ({names})")
    rates = step_rates(config)
    speedup = rates["bfloat16"] / rates["float32"]
    chosen = "bfloat16" if speedup >= MIN_SPEEDUP else "float32"
    reason = (
        f"the bfloat16 step measured {speedup:.2f}x the float32 step's samples/s on this CPU "
        f"({', '.join(sorted(flags))}); bfloat16 needs {MIN_SPEEDUP:.2f}x"
    )
    return PrecisionChoice(chosen, reason, rates)
