"""A data set replayed as a stream: reshuffled passes over the examples, in chunks.

Every pass draws a fresh permutation from one seeded generator, so a replay is
deterministic for a seed, and `skip` resumes it at the same place after a restart.
Chunks -- not single examples -- are the unit that travels, because a Python stream
processor pays per element what one example's training step costs.

>>> import numpy as np
>>> data = np.arange(10, dtype=np.float32).reshape(5, 2)
>>> chunks = list(replay_chunks(data, chunk_size=4, max_examples=7, seed=0))
>>> [len(c) for c in chunks]
[4, 1, 2]
>>> sorted(np.concatenate(chunks[:2])[:, 0].tolist())    # the first pass holds every example
[0.0, 2.0, 4.0, 6.0, 8.0]
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def replay_chunks(
    data: np.ndarray,
    chunk_size: int,
    max_examples: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    skip: int = 0,
) -> Iterator[np.ndarray]:
    """Yields chunks of at most `chunk_size` rows; stops after max_examples or epochs.

    A chunk never spans two passes, so each pass is an exact permutation of the data.
    With neither limit the stream is unbounded. `skip` drops that many examples first
    (a resumed run continues the same sequence).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if len(data) == 0:
        raise ValueError("cannot replay an empty data set")
    rng = np.random.default_rng(seed)
    limit = max_examples
    if epochs is not None:
        limit = min(limit, epochs * len(data)) if limit is not None else epochs * len(data)
    position = 0
    while limit is None or position < limit:
        order = rng.permutation(len(data))
        for start in range(0, len(data), chunk_size):
            end = min(start + chunk_size, len(data))
            if limit is not None:
                end = min(end, start + limit - position)
            count = end - start
            if count <= 0:
                return
            if position + count > skip:
                first = max(0, skip - position)
                yield data[order[start + first : end]]
            position += count
            if limit is not None and position >= limit:
                return
