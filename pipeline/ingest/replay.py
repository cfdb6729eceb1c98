"""A data set replayed as a stream: reshuffled passes over the examples, in chunks.

Every pass draws a fresh permutation from one seeded generator, so a replay is
deterministic for a seed, and `skip` resumes it at the same place after a restart.
Chunks -- not single examples -- are the unit that travels, because a Python stream
processor pays per element what one example's training step costs. `ReplayPlan` is the one
definition of the order: `replay_chunks` walks it, the Beam source
(`pipeline.ingest.sources.ReplayDataset`) addresses its chunks at random, and `Pacer` is the
rate limit of both that source and `aevb produce`.

>>> import numpy as np
>>> data = np.arange(10, dtype=np.float32).reshape(5, 2)
>>> chunks = list(replay_chunks(data, chunk_size=4, max_examples=7, seed=0))
>>> [len(c) for c in chunks]
[4, 1, 2]
>>> sorted(np.concatenate(chunks[:2])[:, 0].tolist())    # the first pass holds every example
[0.0, 2.0, 4.0, 6.0, 8.0]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["Pacer", "ReplayPlan", "replay_chunks"]

# A rate-limited replay that fell behind (a slow trainer) catches up with at most this many
# seconds' worth of examples at once, instead of flooding.
MAX_BURST_SECONDS = 1.0


def replay_chunks(
    data: np.ndarray,
    chunk_size: int,
    max_examples: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    skip: int = 0,
) -> Iterator[np.ndarray]:
    """Yields the chunks of `ReplayPlan` in order: at most `chunk_size` rows each.

    With neither `max_examples` nor `epochs` the stream is unbounded. `skip` drops that
    many examples first (a resumed run continues the same sequence).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    plan = ReplayPlan(len(data), chunk_size, max_examples, epochs, seed, skip)
    index = 0
    while plan.n_chunks is None or index < plan.n_chunks:
        yield plan.chunk(data, index)
        index += 1


class ReplayPlan:
    """Random access to the chunks of a replay: chunk i without generating the ones before.

    A restriction resumed at chunk 10**6 costs one permutation per pass, not 10**6 chunks.
    Pass p's order is the (p+1)-th permutation drawn from ``default_rng(seed)``; a chunk
    never spans two passes; ``skip`` examples are dropped from the start, and the replay
    ends after ``max_examples`` or ``epochs`` passes, whichever comes first (neither:
    unbounded, ``n_chunks`` None).
    """

    def __init__(
        self,
        n_examples: int,
        chunk_size: int,
        max_examples: int | None,
        epochs: int | None,
        seed: int,
        skip: int,
    ) -> None:
        if n_examples < 1:
            raise ValueError("cannot replay an empty data set")
        self._n = n_examples
        self._size = chunk_size
        self._seed = seed
        self._skip = skip
        limit = max_examples
        if epochs is not None:
            limit = min(limit, epochs * n_examples) if limit is not None else epochs * n_examples
        self._limit = limit
        self._per_pass = math.ceil(n_examples / chunk_size)
        self._first = self._chunk_containing(skip)
        self._rng: np.random.Generator | None = None
        self._pass = -1
        self._order = np.empty(0, dtype=np.int64)

    def _chunk_containing(self, example: int) -> int:
        """Index, counted over all passes from the start, of the chunk with this example."""
        epoch, offset = divmod(example, self._n)
        return epoch * self._per_pass + offset // self._size

    @property
    def n_chunks(self) -> int | None:
        """Number of chunks, or None if the replay is unbounded."""
        if self._limit is None:
            return None
        if self._skip >= self._limit:
            return 0
        return self._chunk_containing(self._limit - 1) - self._first + 1

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._rng is None or epoch < self._pass:
            self._rng, self._pass = np.random.default_rng(self._seed), -1
        while self._pass < epoch:
            self._order = self._rng.permutation(self._n)
            self._pass += 1
        return self._order

    def chunk(self, data: np.ndarray, index: int) -> np.ndarray:
        epoch, within = divmod(self._first + index, self._per_pass)
        pass_start = epoch * self._n
        start = within * self._size
        end = min(start + self._size, self._n)
        if self._limit is not None:
            end = min(end, self._limit - pass_start)
        start += max(0, self._skip - pass_start - start)
        return data[self._permutation(epoch)[start:end]]


class Pacer:
    """Rate limit over the long run: example n is due ``n / rate`` seconds after the start."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._start: float | None = None
        self._sent = 0

    def wait_seconds(self) -> float:
        """Seconds until the next example may be sent (0 if now)."""
        now = self._clock()
        if self._start is None:
            self._start = now
        due = self._start + self._sent / self._rate
        if now - due > MAX_BURST_SECONDS:
            # Forget the backlog beyond one burst, so that a stall is not made up at once.
            self._start += now - due - MAX_BURST_SECONDS
            due = now - MAX_BURST_SECONDS
        return max(0.0, due - now)

    def sent(self, count: int) -> None:
        self._sent += count
