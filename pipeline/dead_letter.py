"""Dead letters: records the pipeline rejected, with enough context to find and fix them.

A bad record must never stop an unbounded job, and it must never vanish silently either:
decoding and validation route it to the ``DEAD_LETTER_TAG`` output as a :class:`DeadLetter`,
and :class:`WriteDeadLetters` appends it to ``RUN_DIR/dead_letter/`` and counts it in the
Beam metric ``aevb/records_rejected_total_<reason>`` and, when the job exports Prometheus
metrics, in ``aevb_records_rejected_total{model, reason}``.

``position`` is a 1-based line number for text formats (CSV, JSON lines), a 0-based row or
record index for binary formats (``.npy``, ``.npz``, ``.tfrecord``) and for chunks, and
None when unknown (e.g. Kafka messages read without metadata). ``record`` spells it out
("line 7: ...") together with an excerpt of the record.

>>> letter = DeadLetter("in/a.csv", "non_numeric", "cell 'x' is not a number",
...                     record_locator("line", 7, "0.5,x,1"), position=7)
>>> letter.record
'line 7: 0.5,x,1'
>>> import json; json.loads(letter.to_json())["reason"]
'non_numeric'
>>> len(excerpt("9" * 1000)) <= EXCERPT_CHARS
True
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipeline import metrics

__all__ = [
    "DEAD_LETTER_TAG",
    "EXCERPT_CHARS",
    "REASONS",
    "DeadLetter",
    "WriteDeadLetters",
    "excerpt",
    "record_locator",
    "row_excerpt",
]

REASONS: tuple[str, ...] = (
    "wrong_width",
    "non_numeric",
    "non_finite",
    "out_of_support",
    "unparseable_file",
    "pickled_object",
    "unsupported_format",
    "invalid_key",
)
DEAD_LETTER_TAG = "dead_letter"
EXCERPT_CHARS = 200
METRICS_NAMESPACE = "aevb"
# A row excerpt never needs more values than fit in EXCERPT_CHARS; formatting all 784
# pixels of an image only to cut them off would be wasted work.
_EXCERPT_VALUES = 64


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One rejected record (or a whole rejected file), see the module docstring."""

    source: str
    reason: str
    detail: str
    record: str
    position: int | None = None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {self.reason!r}; one of {REASONS}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, marked with '...' when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def row_excerpt(row: np.ndarray) -> str:
    """A short text form of one row of numbers (or of anything array-like)."""
    values = np.asarray(row).reshape(-1)
    # Six significant digits: float32 values printed in full (0.10000000149011612) are noise.
    text = ",".join(
        f"{v:.6g}" if isinstance(v, float) else str(v) for v in values[:_EXCERPT_VALUES].tolist()
    )
    if values.size > _EXCERPT_VALUES:
        text += ",..."
    return excerpt(text)


def record_locator(unit: str, position: int | None, text: str) -> str:
    """The ``record`` field: where the record is ("line 7") and an excerpt of it."""
    where = unit if position is None else f"{unit} {position}"
    return f"{where}: {excerpt(text)}"


# One file per worker process (so processes never interleave), shared by the DoFn instances
# of that process; the lock keeps their lines whole.
_write_lock = threading.Lock()


class _WriteDeadLettersFn(beam.DoFn):
    def __init__(self, run_dir: str, model_key: str, prometheus: bool) -> None:
        self._run_dir = run_dir
        self._model_key = model_key
        self._prometheus = prometheus

    def setup(self) -> None:
        self._counters = {
            reason: Metrics.counter(METRICS_NAMESPACE, f"records_rejected_total_{reason}")
            for reason in REASONS
        }
        self._file = None
        if self._prometheus:
            metrics.init_rejected(self._model_key, REASONS)

    def process(self, letter: DeadLetter) -> Iterator[DeadLetter]:
        line = json.dumps(
            {**dataclasses.asdict(letter), "seen_unix_seconds": time.time()}, ensure_ascii=False
        )
        with _write_lock:
            if self._file is None:
                # Opened on the first letter: a clean run leaves no empty files behind.
                directory = os.path.join(self._run_dir, "dead_letter")
                os.makedirs(directory, exist_ok=True)
                name = f"dead_letter-{socket.gethostname()}-{os.getpid()}.jsonl"
                self._file = open(os.path.join(directory, name), "a", encoding="utf-8")  # noqa: SIM115
            self._file.write(line + "\n")
            # Dead letters are rare and are what one inspects after a crash: never buffer.
            self._file.flush()
        self._counters[letter.reason].inc()
        if self._prometheus:
            metrics.count_rejected(self._model_key, letter.reason)
        yield letter

    def teardown(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None


class WriteDeadLetters(beam.PTransform):
    """Appends dead letters to ``RUN_DIR/dead_letter/dead_letter-<host>-<pid>.jsonl``.

    Each line is a JSON object with the :class:`DeadLetter` fields and
    ``seen_unix_seconds``; the Beam counter ``aevb/records_rejected_total_<reason>`` counts
    them, and with ``prometheus`` also ``aevb_records_rejected_total{model=model_key,
    reason}`` (a rejected record has no trustworthy key of its own: it counts for the job's
    default model key).
    The letters pass through unchanged, so callers can count or test them. The files are
    appended to directly (not with ``WriteToText``, which needs windows in streaming), so
    ``run_dir`` must be a local or mounted directory on every worker.
    """

    def __init__(self, run_dir: str, model_key: str = "default", prometheus: bool = False) -> None:
        super().__init__()
        self._run_dir = os.fspath(run_dir)
        self._model_key = model_key
        self._prometheus = prometheus
        if "://" in self._run_dir:
            raise ValueError(
                f"run_dir {self._run_dir!r}: dead letters are appended to files, which needs "
                "a local or mounted directory, not an object store"
            )

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        return letters | "AppendDeadLetters" >> beam.ParDo(
            _WriteDeadLettersFn(self._run_dir, self._model_key, self._prometheus)
        )
