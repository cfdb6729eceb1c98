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

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import PipelineResult

logger = logging.getLogger(__name__)

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


@contextlib.contextmanager
def drain_on_interrupt(job_id: str) -> Iterator[Callable[[], None]]:
    """Within it, the first Ctrl-C or SIGTERM requests a stop of `job_id` (a drain); a
    second Ctrl-C raises KeyboardInterrupt as usual. Main thread only, as signals are.
    Yields a function that takes Ctrl-C back from whatever took it since."""
    draining = False

    def drain(signum, frame) -> None:
        nonlocal draining
        logger.info("stop requested: draining (Ctrl-C again to stop at once)")
        request_stop(job_id)
        draining = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def take_back() -> None:
        if not draining:
            signal.signal(signal.SIGINT, drain)

    previous = {sig: signal.signal(sig, drain) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield take_back
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear(job_id)


@contextlib.contextmanager
def cross_language_services(options: PipelineOptions) -> Iterator[None]:
    """What ``with beam.Pipeline(...)`` provides for cross-language transforms, for a job that
    builds and runs its pipeline itself: ``--beam_services`` overrides apply, and the
    services Beam starts while expanding (a Java expansion service, with the loopback worker
    it then starts beside itself to run its transforms) live until the job has ended."""
    from apache_beam.options.pipeline_options import CrossLanguageOptions
    from apache_beam.utils.subprocess_server import JavaJarServer, SubprocessServer

    overrides = options.view_as(CrossLanguageOptions).beam_services
    with JavaJarServer.beam_services(overrides), SubprocessServer.cache_subprocesses():
        yield


def run_draining_on_interrupt(pipeline: beam.Pipeline, job_id: str) -> PipelineResult | None:
    """Runs a Beam `pipeline` to its end; the first Ctrl-C drains `job_id`, a second one
    stops at once (then None instead of the pipeline's result)."""
    try:
        with drain_on_interrupt(job_id) as take_back_ctrl_c:
            result = pipeline.run()
            # Beam's portable job servers (Prism's among them) take Ctrl-C when they start, to
            # stop the server at once: the job would die instead of draining.
            take_back_ctrl_c()
            result.wait_until_finish()
        return result
    except KeyboardInterrupt:
        logger.info("stopped at once")
        return None
