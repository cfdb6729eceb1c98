"""One writer per run directory: a job holds an exclusive lock on it while it runs.

Two jobs writing one run directory would both train from scratch, pick the same snapshot
versions and interleave versions of two different models. `RunDirectoryLock` takes an
exclusive `flock` on ``RUN_DIR/.lock`` for the job's life; the operating system releases it
when the process ends, however it ends (kill -9 included), so a stale lock never blocks a
restart. The file names the holder's process id, for the message a second job prints.

>>> import tempfile
>>> run_dir = tempfile.mkdtemp()
>>> with RunDirectoryLock(run_dir):  # doctest: +ELLIPSIS
...     RunDirectoryLock(run_dir).acquire()
Traceback (most recent call last):
...
pipeline.jobs.run_lock.RunDirectoryBusy: ... is in use by another job (process ...); ...
>>> RunDirectoryLock(run_dir).acquire().release()    # free again
"""

from __future__ import annotations

import fcntl
import os
import pathlib

__all__ = ["LOCK_FILE", "RunDirectoryBusy", "RunDirectoryLock"]

LOCK_FILE = ".lock"


class RunDirectoryBusy(RuntimeError):
    """Another job holds the run directory."""


class RunDirectoryLock:
    """An exclusive, non-blocking `flock` on ``run_dir/.lock`` (a local or mounted directory)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirectoryLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryBusy(
                f"{self.run_dir} is in use by another job (process {holder}); "
                "wait for it to end or choose another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # Closing drops the flock; the file stays, so a waiting job never races a delete.
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
