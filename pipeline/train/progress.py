"""`RUN_DIR/progress.jsonl` and what a person watching the run sees.

One JSON line per logged step: the test-then-train averages over the examples since the
previous line (a single minibatch's bound is too noisy to read), plus whatever evaluation
ran at that point. On a terminal the line redraws in place; otherwise (CI,
Beam workers, `nohup`) the same information goes to the log, one plain line each time.

>>> import io, json, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "progress.jsonl"
>>> log = ProgressLog(path, stream=io.StringIO())
>>> log.write({"examples": 100, "elbo": -150.0})
>>> json.loads(path.read_text())["elbo"]
-150.0
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
from typing import Any, TextIO

from pipeline.ingest.run_mirror import RunMirror, is_remote, worker_name

logger = logging.getLogger("aevb.progress")


class ProgressLog:
    """Appends JSON lines to a file and shows progress on a terminal or in the log."""

    def __init__(
        self,
        path: str | os.PathLike,
        stream: TextIO | None = None,
        mirror: RunMirror | None = None,
    ) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = stream if stream is not None else sys.stderr
        self._interactive = self._stream.isatty()
        self.mirror = mirror

    def publish(self, force: bool = False) -> None:
        """On an object store: republishes the file (at most every
        `run_mirror.LOG_PUBLISH_SECONDS` unless `force`); nothing on a local disk."""
        if self.mirror is not None:
            self.mirror.publish_log(self.path, force=force)

    def write(self, entry: dict[str, Any]) -> None:
        # One write of one line in append mode: lines from several worker processes
        # appending to the same file do not interleave.
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
        self._show(entry)

    def _show(self, entry: dict[str, Any]) -> None:
        text = describe(entry)
        if not self._interactive:
            logger.info(text)
            return
        self._stream.write("\r\033[K" + text)
        self._stream.flush()


def progress_log(run_dir: str | os.PathLike) -> ProgressLog:
    """The progress log of a run directory: `RUN_DIR/progress.jsonl`, or on an object store
    this process's own `progress-<host>-<pid>.jsonl` (a store cannot append to one object
    from several processes)."""
    if not is_remote(run_dir):
        return ProgressLog(pathlib.Path(run_dir) / "progress.jsonl")
    mirror = RunMirror.for_run(os.fspath(run_dir))
    return ProgressLog(mirror.local / f"progress-{worker_name()}.jsonl", mirror=mirror)


def describe(entry: dict[str, Any]) -> str:
    """A short human-readable summary of a progress entry."""
    parts = [f"{entry.get('key', 'default')}: {entry.get('examples', 0):,} examples"]
    for name, label in (("elbo", "bound"), ("test_elbo", "test bound")):
        if name in entry:
            parts.append(f"{label} {entry[name]:.2f}")
    if entry.get("examples_per_second"):
        parts.append(f"{entry['examples_per_second']:,.0f} ex/s")
    return "  ".join(parts)


def read_progress(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All entries of a progress.jsonl file, skipping a torn last line of a killed run."""
    entries = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries
