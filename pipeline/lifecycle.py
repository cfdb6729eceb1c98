"""Graceful stop of a running job: the sources stop reading, the rest drains.

Ctrl-C (or SIGTERM) on `aevb train`, or the trainer reaching `--max-examples`, requests a
stop for the job. The project's sources check the request between reads and finish, so
the pipeline drains like a bounded one: buffered minibatches are trained, the end-of-input
timers write the final checkpoint and snapshot. The request lives in the process, which is
where the local runner executes sources and trainer alike; on a distributed runner use the
runner's own drain (Flink `stop --drain`, Dataflow drain).

>>> job = "doctest-job"
>>> stop_requested(job)
False
>>> request_stop(job); stop_requested(job)
True
>>> clear(job); stop_requested(job)
False
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_stopped: set[str] = set()


def request_stop(job_id: str) -> None:
    with _lock:
        _stopped.add(job_id)


def stop_requested(job_id: str) -> bool:
    with _lock:
        return job_id in _stopped


def clear(job_id: str) -> None:
    with _lock:
        _stopped.discard(job_id)
