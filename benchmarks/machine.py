"""What a figure was measured on: the CPU, its cores, the software, its matmul rate."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import tensorflow as tf

__all__ = ["PEAK_MATMUL_SIZE", "machine", "matmul_gflops"]

# The /proc/cpuinfo flags that decide how fast a float32 or bfloat16 matmul can be.
MATRIX_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
# Square enough to reach the BLAS kernel's peak, small enough to time in a fraction of a second.
PEAK_MATMUL_SIZE = 1024


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
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            lines = handle.read().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
        flags = next(
            (set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")),
            set(),
        )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "matrix_instructions": [flag for flag in MATRIX_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }
