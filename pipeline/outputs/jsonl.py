"""JSON-lines files appended by every worker process: dead letters and scores.

Unbounded jobs cannot wait for windows to close before writing (Beam's `WriteToText` needs
them in streaming), so each worker process appends to a file of its own,
``DIRECTORY/<prefix>-<host>-<pid>.jsonl``: processes never interleave, and the DoFn
instances of one process share its file under a lock that keeps lines whole. The file is
created on the first line, so a clean run leaves no empty files behind. On an object store
(``s3://...``), which cannot append, the file is written in the process's working copy of
the directory and republished whole when flushed and closed, and at most every
`pipeline.ingest.run_mirror.LOG_PUBLISH_SECONDS` as lines come.

>>> import tempfile
>>> directory = tempfile.mkdtemp()
>>> writer = WorkerJsonLines(directory, "scores")
>>> writer.write({"score": 1.5}); writer.close()
>>> read_json_lines(directory, "scores")
[{'score': 1.5}]
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
from typing import Any

from pipeline.ingest.run_mirror import (
    RunMirror,
    is_remote,
    published_objects,
    read_object,
    worker_name,
)

__all__ = ["WorkerJsonLines", "read_json_lines"]

logger = logging.getLogger(__name__)


class WorkerJsonLines:
    """Appends JSON objects as lines to this process's ``<prefix>-<host>-<pid>.jsonl``.

    With ``flush_every_line`` each line reaches the file at once (rare records one inspects
    after a crash); otherwise `flush` decides, e.g. at the end of every bundle.
    """

    # One lock for every writer of the process: two DoFn instances of one stage share a file.
    _lock = threading.Lock()

    def __init__(
        self, directory: str | os.PathLike, prefix: str, flush_every_line: bool = False
    ) -> None:
        self.directory = os.fspath(directory)
        self.prefix = prefix
        self.flush_every_line = flush_every_line
        self._file = None
        # On a store: this process's working copy of the directory, published from.
        self._mirror = RunMirror.for_run(self.directory) if is_remote(self.directory) else None
        self._local = os.fspath(self._mirror.local) if self._mirror else self.directory
        self._unpublished = False  # lines in the working copy the store has not

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                os.makedirs(self._local, exist_ok=True)
                name = f"{self.prefix}-{worker_name()}.jsonl"
                path = os.path.join(self._local, name)
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- worker's lifetime
                # A process of the same host and pid before us (a restarted container) may
                # have died mid-line: start ours on a line of its own.
                if self._file.tell() and not _ends_with_newline(path):
                    self._file.write("\n")
            self._file.write(line)
            if self.flush_every_line or self._mirror is not None:
                self._file.flush()
            if self._mirror is not None:
                self._unpublished = not self._mirror.publish_log(self._file.name)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                self._publish()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._publish()
                self._file = None

    def _publish(self) -> None:
        if self._mirror is not None and self._unpublished:
            self._unpublished = not self._mirror.publish_log(self._file.name, force=True)


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def read_json_lines(directory: str | os.PathLike, prefix: str) -> list[dict[str, Any]]:
    """Every whole line of every worker's ``<prefix>-*.jsonl`` in ``directory`` (local, or
    as published on a store); a line a killed writer left torn (a full disk, kill -9) is
    skipped."""
    records = []
    if is_remote(directory):
        pattern = f"{os.fspath(directory).rstrip('/')}/{prefix}-*.jsonl"
        texts = [(url, read_object(url) or b"") for url in published_objects(pattern)]
    else:
        paths = sorted(pathlib.Path(directory).glob(f"{prefix}-*.jsonl"))
        texts = [(path, path.read_bytes()) for path in paths]
    for path, text in texts:
        for line in text.decode("utf-8", errors="replace").splitlines(keepends=True):
            try:
                records.append(json.loads(line))
            except ValueError:
                logger.warning("%s: skipping a torn line: %.80s", path, line)
    return records
