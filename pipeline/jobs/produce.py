"""`aevb produce`: replays a data set into a Kafka topic, the input of a Kafka-fed job.

Each example becomes one message: a CSV line of its values (six significant digits), the
form :class:`pipeline.ingest.decode.DecodeRecords` reads, keyed with the model key. The replay is
`pipeline.ingest.replay.replay_chunks` (reshuffled passes; unbounded unless --max-examples or
--epochs) at --examples-per-second.

The Kafka client is `kafka-python` (pure Python), installed with the project's `kafka` extra
(`pip install 'aevb-stream[kafka]'`, as the container image does); only this command needs it.

>>> encode_row(np.array([0.0, 0.5, 1 / 3], dtype=np.float32))
b'0,0.5,0.333333'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np

from pipeline.ingest.replay import Pacer, replay_chunks

__all__ = ["encode_row", "produce", "replay_into"]

logger = logging.getLogger(__name__)

# send(key, value): what the replay needs of a producer.
Send = Callable[[bytes | None, bytes], object]


def encode_row(row: np.ndarray) -> bytes:
    """One example as a message value: a CSV line."""
    return ",".join(f"{value:.6g}" for value in np.asarray(row).tolist()).encode("ascii")


def replay_into(
    send: Send,
    chunks: Iterable[np.ndarray],
    key: str | None = None,
    examples_per_second: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Sends every row of `chunks` with `send(key, value)`; returns the number sent.

    With `examples_per_second`, example n is sent no earlier than n / rate seconds after
    the first (the rate limit of the data-set source, `pipeline.ingest.replay.Pacer`).
    """
    key_bytes = None if key is None else key.encode("utf-8")
    pacer = None if examples_per_second is None else Pacer(examples_per_second, clock=clock)
    sent = 0
    for chunk in chunks:
        for row in chunk:
            if pacer is not None:
                if (wait := pacer.wait_seconds()) > 0:
                    sleep(wait)
                pacer.sent(1)
            send(key_bytes, encode_row(row))
            sent += 1
    return sent


def produce(
    bootstrap: str,
    topic: str,
    data: np.ndarray,
    *,
    key: str | None = None,
    examples_per_second: float | None = None,
    max_examples: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
) -> int:
    """Replays `data` into `topic` on the Kafka cluster at `bootstrap`; returns examples sent."""
    from kafka import KafkaProducer  # the `kafka` extra

    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), linger_ms=20)
    logger.info("replaying %d examples per pass into %s at %s", len(data), topic, bootstrap)
    try:
        sent = replay_into(
            lambda k, v: producer.send(topic, key=k, value=v),
            replay_chunks(data, 1000, max_examples, epochs, seed),
            key=key,
            examples_per_second=examples_per_second,
        )
        producer.flush()
    finally:
        producer.close()
    logger.info("sent %d examples to %s", sent, topic)
    return sent
