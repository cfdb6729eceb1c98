"""The scoring job's output files: ``OUT_DIR/scores-<host>-<pid>.jsonl``.

One JSON object per scored record (see `pipeline.score.anomalies`), appended per worker
(`pipeline.outputs.jsonl`) and flushed at the end of every bundle, so the same job works in
batch and streaming; OUT_DIR must be a local or mounted directory on every worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from pipeline.outputs.jsonl import WorkerJsonLines, read_json_lines

__all__ = ["SCORES_PREFIX", "WriteScores", "read_scores"]

SCORES_PREFIX = "scores"


class _WriteScoresFn(beam.DoFn):
    def __init__(self, out_dir: str) -> None:
        self._out_dir = out_dir

    def setup(self) -> None:
        self._file = WorkerJsonLines(self._out_dir, SCORES_PREFIX)

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self._file.write(record)
        yield record

    def finish_bundle(self) -> None:
        self._file.flush()

    def teardown(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()


class WriteScores(beam.PTransform):
    """Appends the output dicts to ``out_dir/scores-<host>-<pid>.jsonl``; passes them on."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        super().__init__()
        self._out_dir = os.fspath(out_dir)

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return records | "AppendScores" >> beam.ParDo(_WriteScoresFn(self._out_dir))


def read_scores(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every output line of a scoring job's OUT_DIR (all workers' files)."""
    return read_json_lines(out_dir, SCORES_PREFIX)
