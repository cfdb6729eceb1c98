"""Where a job's Prometheus metrics go: /metrics on a port, or a Pushgateway.

A streaming job serves ``/metrics`` (`serve_metrics`); a batch job pushes to a Pushgateway
every few seconds and once at the end (`MetricsPusher`), one group per model key. Either
way the driver exports the aggregate of every worker process of the local runners:
`MetricsExport` switches to prometheus-client's multiprocess mode before any worker starts
(`ensure_multiprocess_dir`), see `pipeline.outputs.metrics`.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading

import prometheus_client
from prometheus_client import CollectorRegistry

from pipeline.outputs.metrics import exposition_registry, multiprocess_dir, use_multiprocess_dir

__all__ = [
    "MetricsExport",
    "MetricsExportError",
    "MetricsPusher",
    "ensure_multiprocess_dir",
    "push_once",
    "serve_metrics",
]

logger = logging.getLogger(__name__)


def serve_metrics(address: str = "127.0.0.1", port: int = 0):
    """Serves /metrics on address:port in a daemon thread; returns the HTTP server.

    Port 0 picks a free port (``server.server_port``). ``server.shutdown()`` stops it.
    """
    server, _thread = prometheus_client.start_http_server(
        port, addr=address, registry=exposition_registry()
    )
    logger.info("serving Prometheus metrics on http://%s:%d/metrics", address, server.server_port)
    return server


class _OneModel:
    """A collector over another registry's samples of one ``model`` label value (None: the
    job-level samples, which have no ``model`` label)."""

    def __init__(self, source: CollectorRegistry, model: str | None) -> None:
        self._source = source
        self._model = model

    def collect(self):
        for family in self._source.collect():
            samples = [s for s in family.samples if s.labels.get("model") == self._model]
            if samples:
                copy = prometheus_client.Metric(family.name, family.documentation, family.type)
                copy.samples = samples
                yield copy


def models_in(registry: CollectorRegistry) -> list[str]:
    """The ``model`` label values present in `registry`."""
    return sorted(
        {s.labels["model"] for f in registry.collect() for s in f.samples if "model" in s.labels}
    )


def push_once(gateway: str, job: str, timeout: float = 10.0) -> list[str]:
    """Pushes every model's metrics to a Pushgateway, grouping key {job, model}, and the
    job-level aggregates (``aevb_fleet_*``) under {job} alone.

    One PUT per model key (``/metrics/job/<job>/model/<key>``), each replacing that
    group, so models never overwrite one another. Returns the keys pushed.
    """
    source = exposition_registry()
    fleet = CollectorRegistry()
    fleet.register(_OneModel(source, None))
    if any(family.samples for family in fleet.collect()):
        prometheus_client.push_to_gateway(gateway, job=job, registry=fleet, timeout=timeout)
    models = models_in(source)
    for model in models:
        registry = CollectorRegistry()
        registry.register(_OneModel(source, model))
        prometheus_client.push_to_gateway(
            gateway, job=job, registry=registry, grouping_key={"model": model}, timeout=timeout
        )
    return models


class MetricsPusher:
    """Pushes to a Pushgateway every `interval` seconds in a daemon thread, and once more
    on `stop()` (the batch job's final values). Push failures are logged, never raised:
    monitoring must not stop a training job."""

    def __init__(self, gateway: str, job: str, interval: float = 30.0) -> None:
        if not interval > 0:
            raise ValueError(f"push interval must be positive, got {interval}")
        self.gateway = gateway
        self.job = job
        self.interval = interval
        self.pushes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aevb-metrics-pusher", daemon=True)

    def start(self) -> MetricsPusher:
        self._thread.start()
        return self

    def push(self) -> None:
        try:
            push_once(self.gateway, self.job)
            self.pushes += 1
        except Exception as error:  # any network or HTTP error: log, keep training
            self.failures += 1
            logger.warning("push to Pushgateway %s failed: %s", self.gateway, error)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.push()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.push()


def ensure_multiprocess_dir() -> str | None:
    """The process's multiprocess directory, made and switched to if there is none yet.

    A ``PROMETHEUS_MULTIPROC_DIR`` set by the user (or an earlier job in this process) is
    used as it is; otherwise a fresh temporary directory, removed when the process exits
    (local, not under the run directory, which may be a network file system where
    memory-mapped files misbehave). Returns None when this process already created its
    metrics in single-process mode (then only this process's values are exported).
    """
    existing = multiprocess_dir()
    if existing is not None:
        os.makedirs(existing, exist_ok=True)
        return existing if use_multiprocess_dir(existing) else None
    directory = tempfile.mkdtemp(prefix="aevb-prometheus-")
    if not use_multiprocess_dir(directory):
        os.rmdir(directory)
        return None
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


class MetricsExportError(RuntimeError):
    """The metrics cannot be served as asked (the port is taken, ...)."""


class MetricsExport:
    """A job's metrics export: multiprocess mode, the /metrics server, the Pushgateway
    pusher. `start()` before the pipeline runs (before any worker process starts);
    `close()` after the last session closed: one final push, then the server stops."""

    def __init__(
        self,
        address: str = "127.0.0.1",
        port: int | None = None,
        pushgateway: str | None = None,
        push_job: str = "aevb",
        push_interval_seconds: float = 30.0,
    ) -> None:
        self.address = address
        self.port = port
        self.pushgateway = pushgateway
        self.push_job = push_job
        self.push_interval_seconds = push_interval_seconds
        self.directory: str | None = None
        self.server = None
        self.pusher: MetricsPusher | None = None

    def start(self) -> MetricsExport:
        self.directory = ensure_multiprocess_dir()
        if self.directory is None:
            logger.warning(
                "Prometheus metrics were created in this process before the job started: "
                "exporting this process's values only (worker subprocesses are not seen)"
            )
        else:
            logger.info("Prometheus multiprocess directory %s", self.directory)
        if self.port is not None:
            try:
                self.server = serve_metrics(self.address, self.port)
            except OSError as error:  # the port is taken, the address not this machine's
                raise MetricsExportError(
                    f"cannot serve /metrics on {self.address}:{self.port}: "
                    f"{error.strerror or error}"
                ) from None
        if self.pushgateway is not None:
            self.pusher = MetricsPusher(
                self.pushgateway, self.push_job, self.push_interval_seconds
            ).start()
        return self

    @property
    def bound_port(self) -> int | None:
        return None if self.server is None else self.server.server_port

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.stop()
            self.pusher = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
