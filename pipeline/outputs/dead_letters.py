"""Writing and counting dead letters: ``RUN_DIR/dead_letter/dead_letter-<host>-<pid>.jsonl``.

Each line is a JSON object with the `pipeline.ingest.dead_letter.DeadLetter` fields and
``seen_unix_seconds``. A letter of a file already written (same file and content, position and
reason: a restarted job reading its files again) is not written or counted again. Every
letter is counted in the Beam counter ``aevb/records_rejected_total_<reason>`` and, when the
job exports Prometheus metrics, in ``aevb_records_rejected_total{model, reason}``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.ingest.dead_letter import REASONS, DeadLetter
from pipeline.ingest.run_mirror import use_store_options
from pipeline.outputs import metrics
from pipeline.outputs.jsonl import WorkerJsonLines, read_json_lines
from pipeline.train.counters import NAMESPACE, beam_counter_name

__all__ = ["DEAD_LETTER_DIR", "DEAD_LETTER_PREFIX", "WriteDeadLetters"]

DEAD_LETTER_DIR = "dead_letter"
DEAD_LETTER_PREFIX = "dead_letter"


# Per process and dead-letter directory: the letters of files written so far, by (origin,
# position, reason), read from the directory once -- a restarted job reads its files again,
# and their letters must be written once only, whichever DoFn instance meets them.
_written_by_directory: dict[str, set[tuple]] = {}
_written_lock = threading.Lock()


def _written_letters(directory: str) -> set[tuple]:
    with _written_lock:
        if directory not in _written_by_directory:
            _written_by_directory[directory] = {
                (letter["origin"], letter["position"], letter["reason"])
                for letter in read_json_lines(directory, DEAD_LETTER_PREFIX)
                if letter.get("origin") is not None
            }
        return _written_by_directory[directory]


class _WriteDeadLettersFn(beam.DoFn):
    def __init__(
        self, run_dir: str, model_key: str, prometheus: bool, store_options: Mapping[str, Any]
    ) -> None:
        self._run_dir = run_dir
        self._model_key = model_key
        self._prometheus = prometheus
        self._store_options = store_options

    def setup(self) -> None:
        use_store_options(self._store_options)
        directory = os.path.join(self._run_dir, DEAD_LETTER_DIR)
        self._written = _written_letters(directory)
        self._counters = {
            reason: Metrics.counter(
                NAMESPACE, beam_counter_name("aevb_records_rejected_total", reason)
            )
            for reason in REASONS
        }
        # Dead letters are rare and are what one inspects after a crash: never buffered.
        self._file = WorkerJsonLines(directory, DEAD_LETTER_PREFIX, flush_every_line=True)
        if self._prometheus:
            metrics.init_rejected(self._model_key, REASONS)

    def process(self, letter: DeadLetter) -> Iterator[DeadLetter]:
        if letter.origin is not None:
            seen = (letter.origin, letter.position, letter.reason)
            with _written_lock:
                if seen in self._written:
                    return
                self._written.add(seen)
        self._file.write({**dataclasses.asdict(letter), "seen_unix_seconds": time.time()})
        self._counters[letter.reason].inc()
        if self._prometheus:
            metrics.count_rejected(self._model_key, letter.reason)
        yield letter

    def finish_bundle(self) -> None:
        self._file.flush()  # on a store: published (lines were flushed to the working copy)

    def teardown(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()


class WriteDeadLetters(beam.PTransform):
    """Appends dead letters to ``RUN_DIR/dead_letter/`` and counts them (module docstring).

    With ``prometheus`` they also count in ``aevb_records_rejected_total{model=model_key,
    reason}`` (a rejected record has no trustworthy key of its own: it counts for the job's
    default model key). The letters pass through unchanged, so callers can count or test
    them. ``run_dir`` may be on an object store (`pipeline.outputs.jsonl`), reached with
    ``store_options`` (`pipeline.ingest.run_mirror.store_options`).
    """

    def __init__(
        self,
        run_dir: str,
        model_key: str = "default",
        prometheus: bool = False,
        store_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._run_dir = os.fspath(run_dir)
        self._model_key = model_key
        self._prometheus = prometheus
        self._store_options = dict(store_options or {})

    def expand(self, letters: beam.PCollection) -> beam.PCollection:
        return letters | "AppendDeadLetters" >> beam.ParDo(
            _WriteDeadLettersFn(
                self._run_dir, self._model_key, self._prometheus, self._store_options
            )
        )
