"""JSON-lines files appended by every worker process: dead letters and scores.

Unbounded jobs cannot wait for windows to close before writing (Beam's `WriteToText` needs
them in streaming), so each worker process appends to a file of its own,
``DIRECTORY/<prefix>-<host>-<pid>.jsonl``: processes never interleave, and the DoFn
instances of one process share its file under a lock that keeps lines whole. The file is
created on the first line, so a clean run leaves no empty files behind. The directory must
be a local or mounted one on every worker.

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
import socket
import threading
from typing import Any

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
        if "://" in os.fspath(directory):
            raise ValueError(
                f"{os.fspath(directory)!r}: JSON lines are appended to files, which needs a "
                "local or mounted directory, not an object store"
            )
        self.directory = os.fspath(directory)
        self.prefix = prefix
        self.flush_every_line = flush_every_line
        self._file = None

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                os.makedirs(self.directory, exist_ok=True)
                name = f"{self.prefix}-{socket.gethostname()}-{os.getpid()}.jsonl"
                path = os.path.join(self.directory, name)
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- worker's lifetime
                # A process of the same host and pid before us (a restarted container) may
                # have died mid-line: start ours on a line of its own.
                if self._file.tell() and not _ends_with_newline(path):
                    self._file.write("\n")
            self._file.write(line)
            if self.flush_every_line:
                self._file.flush()

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def read_json_lines(directory: str | os.PathLike, prefix: str) -> list[dict[str, Any]]:
    """Every whole line of every worker's ``<prefix>-*.jsonl`` in ``directory``; a line a
    killed writer left torn (a full disk, kill -9) is skipped."""
    records = []
    for path in sorted(pathlib.Path(directory).glob(f"{prefix}-*.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    logger.warning("%s: skipping a torn line: %.80s", path, line)
    return records
