"""Tests for pipeline.outputs.metrics: the exporter, multiprocess mode, the Pushgateway pusher,
and the counters the Beam job keeps (Prometheus and Beam metrics alike).

The pytest process keeps prometheus-client in single-process mode; everything about
multiprocess mode runs in subprocesses, as the trainer's worker processes do.
"""

import http.server
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.request

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.ingest.dead_letter import REASONS, DeadLetter
from pipeline.outputs import metrics, metrics_export, prometheus_families
from pipeline.outputs.dead_letters import WriteDeadLetters
from pipeline.train.counters import beam_counter_name
from pipeline.train.drift import DriftDetection
from pipeline.train.records import TrainingRecord

REPO = pathlib.Path(__file__).resolve().parents[1]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text)[(name, tuple(sorted(labels.items())))]


def _record(key: str, examples_seen: int, elbo: float = -120.0, applied: bool = True):
    per_example = tuple(float(elbo + d) for d in (-10.0, 0.0, 10.0, 0.0))
    return TrainingRecord(
        key=key,
        step=examples_seen // 4,
        examples_seen=examples_seen,
        batch_size=4,
        elbo=elbo,
        reconstruction_log_likelihood=elbo - 20.0,
        kl=20.0,
        applied=applied,
        event_time=0.0,
        processing_time=0.0,
        step_seconds=0.012,
        elbo_per_example=per_example,
    )


def test_observer_exposes_every_metric_with_a_model_label() -> None:
    observer = metrics.PrometheusObserver()
    observer.on_open("obs-a", last_snapshot_unix=1000.0, drift_thresholds={"adwin": 5.0})
    text = metrics.generate_latest().decode()
    # Every series starts at 0, so that rate() sees the first increment.
    for name in ("aevb_examples_total", "aevb_train_steps_total", "aevb_snapshots_total"):
        assert _value(text, name, model="obs-a") == 0.0
    assert _value(text, "aevb_skipped_steps_total", model="obs-a", reason="non_finite") == 0.0
    assert _value(text, "aevb_drift_detections_total", model="obs-a", detector="adwin") == 0.0
    assert _value(text, "aevb_drift_threshold", model="obs-a", detector="adwin") == 5.0
    assert _value(text, "aevb_last_snapshot_timestamp_seconds", model="obs-a") == 1000.0

    observer.on_record(_record("obs-a", 4, elbo=-120.0))
    observer.on_record(_record("obs-a", 8, elbo=-110.0))
    observer.on_record(_record("obs-a", 12, elbo=float("nan"), applied=False))
    observer.on_drift_statistic("obs-a", "adwin", 17.0)
    observer.on_drift(DriftDetection("adwin", 12, 30.0, 5.0, 150.0, 120.0, key="obs-a"))
    observer.on_snapshot("obs-a", "/runs/x/snapshots/obs-a/3", "drift", 2000.0)

    text = metrics.generate_latest().decode()
    assert _value(text, "aevb_examples_total", model="obs-a") == 12
    assert _value(text, "aevb_train_steps_total", model="obs-a") == 2
    assert _value(text, "aevb_skipped_steps_total", model="obs-a", reason="non_finite") == 1
    # Gauges hold the latest finite minibatch: the skipped NaN one does not overwrite them.
    assert _value(text, "aevb_elbo_nats", model="obs-a") == -110.0
    assert _value(text, "aevb_reconstruction_log_likelihood_nats", model="obs-a") == -130.0
    assert _value(text, "aevb_kl_nats", model="obs-a") == 20.0
    assert _value(text, "aevb_negative_elbo_nats_count", model="obs-a") == 8  # NaNs left out
    # Upper-inclusive buckets: the one -100 nats example counts in le="100.0".
    assert _value(text, "aevb_negative_elbo_nats_bucket", model="obs-a", le="100.0") == 1
    assert _value(text, "aevb_negative_elbo_nats_bucket", model="obs-a", le="125.0") == 7
    assert _value(text, "aevb_step_seconds_count", model="obs-a") == 3
    assert _value(text, "aevb_step_seconds_bucket", model="obs-a", le="0.015") == 3
    assert _value(text, "aevb_drift_statistic", model="obs-a", detector="adwin") == 17.0
    assert _value(text, "aevb_drift_detections_total", model="obs-a", detector="adwin") == 1
    assert _value(text, "aevb_snapshots_total", model="obs-a") == 1
    assert _value(text, "aevb_last_snapshot_timestamp_seconds", model="obs-a") == 2000.0
    # No per-example labels: every aevb series has a model label, and only these labels,
    # but the job-level aggregates, which have none.
    allowed = {"model", "reason", "detector", "kind", "le"}
    for name, labels in _samples(text):
        if name.startswith("aevb_") and not name.startswith("aevb_fleet_"):
            assert "model" in dict(labels) and set(dict(labels)) <= allowed, (name, labels)
        if name.startswith("aevb_fleet_"):
            assert set(dict(labels)) <= {"le", "restored"}, (name, labels)


def _fleet_values(text: str) -> dict[str, float]:
    return {
        name: _value(text, name)
        for name in (
            "aevb_fleet_keys_in_memory",
            "aevb_fleet_keys_trained",
            "aevb_fleet_evictions_total",
            "aevb_fleet_examples_total",
            "aevb_fleet_drift_detections_total",
            "aevb_fleet_keys_drifting",
        )
    }


def test_fleet_aggregates_count_keys_and_place_their_bounds(tmp_path: pathlib.Path) -> None:
    """The job-level series in a registry of their own: keys in memory, evictions,
    restores, keys trained, drifting keys and the gauge histogram of bounds over keys."""
    registry = CollectorRegistry()
    now = [1000.0]
    fleet = metrics.Fleet(metrics.Families(registry=registry), clock=lambda: now[0])
    fleet.opened(resumed=False)
    fleet.opened(resumed=False)
    fleet.record("a", 100, elbo=-90.0)  # le 100 and above
    fleet.record("b", 100, elbo=-140.0)  # le 150 and above
    fleet.record("a", 100, elbo=-130.0)  # a moves up: le 150 and above
    fleet.record("b", 100, elbo=float("nan"))  # a skipped minibatch: b stays where it was
    fleet.closed("evicted")
    fleet.opened(resumed=True)
    fleet.drift("a")
    fleet.drift("a")  # the same key, still one drifting key
    text = generate_latest(registry).decode()
    assert _fleet_values(text) == {
        "aevb_fleet_keys_in_memory": 2,
        "aevb_fleet_keys_trained": 2,
        "aevb_fleet_evictions_total": 1,
        "aevb_fleet_examples_total": 400,
        "aevb_fleet_drift_detections_total": 2,
        "aevb_fleet_keys_drifting": 1,
    }
    assert _value(text, "aevb_fleet_sessions_opened_total", restored="false") == 2
    assert _value(text, "aevb_fleet_sessions_opened_total", restored="true") == 1
    buckets = {
        le: _value(text, "aevb_fleet_keys_by_negative_elbo_nats", le=le)
        for le in ("75.0", "100.0", "125.0", "150.0", "+Inf")
    }
    assert buckets == {"75.0": 0, "100.0": 0, "125.0": 0, "150.0": 2, "+Inf": 2}
    # After the window, the drifting key no longer counts (on the next minibatch).
    now[0] += metrics.DRIFTING_SECONDS + 1
    fleet.record("b", 100, elbo=-95.0)
    text = generate_latest(registry).decode()
    assert _value(text, "aevb_fleet_keys_drifting") == 0
    assert _value(text, "aevb_fleet_keys_by_negative_elbo_nats", le="100.0") == 1
    assert _value(text, "aevb_fleet_keys_by_negative_elbo_nats", le="150.0") == 2


def test_per_key_metrics_none_keeps_only_the_aggregates() -> None:
    observer = metrics.PrometheusObserver(per_key="none")
    observer.on_open("quiet-key", last_snapshot_unix=1.0, drift_thresholds={"adwin": 5.0})
    observer.on_record(_record("quiet-key", 4, elbo=-120.0))
    observer.on_drift(DriftDetection("adwin", 1, 30.0, 5.0, 150.0, 120.0, key="quiet-key"))
    observer.on_snapshot("quiet-key", "/runs/x/snapshots/quiet-key/1", "drift", 2.0)
    text = metrics.generate_latest().decode()
    assert 'model="quiet-key"' not in text
    assert _value(text, "aevb_fleet_examples_total") >= 4
    with pytest.raises(ValueError, match="per_key must be one of"):
        metrics.PrometheusObserver(per_key="some")


def _without_created(text: str) -> str:
    """An exposition with the ``_created`` timestamps (when each series was made) blanked."""
    return re.sub(r"(?m)^(\w+_created(?:\{[^}]*\})?) \S+$", r"\1 T", text)


def test_observe_many_matches_one_observation_at_a_time() -> None:
    buckets = metrics.NEGATIVE_ELBO_BUCKETS
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    one = Histogram("x_nats", "d", ["model"], buckets=buckets, registry=theirs)
    many = prometheus_families.HistogramFamily("x_nats", "d", ["model"], ours, buckets=buckets)
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.normal(120, 40, 500), np.asarray(buckets), [-5000.0, 1e6, np.nan, np.inf]]
    )
    finite = values[np.isfinite(values)]
    for value in finite:
        one.labels(model="m").observe(float(value))
    many.labels(model="m").observe_many(values)
    # prometheus-client's histogram, one observation at a time: the same bucket counts.
    text = generate_latest(ours).decode()
    assert _without_created(text) == _without_created(generate_latest(theirs).decode())
    assert _value(text, "x_nats_bucket", model="m", le="100.0") == np.sum(finite <= 100.0)
    assert _value(text, "x_nats_count", model="m") == finite.size
    # Neither exposes _sum with negative buckets (a falling sum would look like a reset).
    assert many.labels(model="m").total() == pytest.approx(sum(finite.tolist()))


def _prometheus_client_twin(family: prometheus_families.MetricFamily, registry: CollectorRegistry):
    """prometheus-client's own metric with `family`'s name, help, labels and buckets."""
    if family.type == "counter":
        return Counter(family.name, family.documentation, family.labelnames, registry=registry)
    if family.type == "gauge":
        return Gauge(
            family.name,
            family.documentation,
            family.labelnames,
            registry=registry,
            multiprocess_mode=family.multiprocess_mode,
        )
    return Histogram(
        family.name,
        family.documentation,
        family.labelnames,
        registry=registry,
        buckets=family.buckets,
    )


def _exercise(metric, family: prometheus_families.MetricFamily) -> None:
    """The same updates on `family` (when `metric` is it) or on its prometheus-client twin,
    which observes one value at a time. Runs in subprocesses too (`_TWINS`)."""
    values = [-3000.0, -2000.0, -1.0, 0.0, 0.001, 0.0075, 12.5, 100.0, 130.0, 5000.0, 1e9]
    for i in range(2):
        if family.labelnames or metric is family:
            series = metric.labels(**{name: f"{name}-{i}" for name in family.labelnames})
        else:  # prometheus-client's metric without labels is its own series
            series = metric
        if family.type == "counter":
            series.inc(3 * i)
            series.inc(0.5)
        elif family.type == "gauge":
            series.set(2.5)
            series.set(-1.0 * i)
        elif metric is family:
            series.observe(values[0])
            series.observe_many(np.asarray(values[1:]) * (i + 1))
        else:
            for value in [values[0], *(v * (i + 1) for v in values[1:])]:
                series.observe(value)


def test_families_expose_as_prometheus_client_metrics() -> None:
    """Single-process mode: our families' exposition is prometheus-client's own."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    families = metrics.Families(registry=ours).all()
    assert len(families) == 24
    for family in families:
        _exercise(family, family)
        _exercise(_prometheus_client_twin(family, theirs), family)
    text = generate_latest(ours).decode()
    assert _without_created(text) == _without_created(generate_latest(theirs).decode())
    assert "aevb_examples_created{" in text  # the _created series are compared as well


def test_negative_elbo_buckets_are_not_latency_defaults() -> None:
    assert tuple(metrics.NEGATIVE_ELBO_BUCKETS) != Histogram.DEFAULT_BUCKETS[:-1]
    assert min(metrics.NEGATIVE_ELBO_BUCKETS) < 0 < 543 < max(metrics.NEGATIVE_ELBO_BUCKETS)


# --- multiprocess mode ------------------------------------------------------------------------

_WORKER = """
import os, sys, time
from pipeline.outputs import metrics, prometheus_families
from pipeline.train.records import TrainingRecord
assert metrics.use_multiprocess_dir(sys.argv[1])
observer = metrics.PrometheusObserver()
observer.on_open("shared", last_snapshot_unix=float(sys.argv[2]), drift_thresholds={"adwin": 5.0})
for i in range(int(sys.argv[3])):
    observer.on_record(TrainingRecord(key="shared", step=i, examples_seen=0, batch_size=100,
        elbo=float(sys.argv[4]), reconstruction_log_likelihood=-1.0, kl=1.0, applied=True,
        event_time=0.0, processing_time=0.0, elbo_per_example=(float(sys.argv[4]),) * 100))
metrics.count_rejected("shared", "wrong_width", 2)
"""


def _python(script: str, *args: object, inherited_dir: pathlib.Path | None = None) -> list[str]:
    """Runs `script` in a fresh interpreter; its printed words. The multiprocess directory
    is not set, or `inherited_dir` when given (as a worker process inherits it)."""
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    if inherited_dir is not None:
        env[metrics.MULTIPROC_ENV] = str(inherited_dir)
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()


def _run_worker(
    directory: pathlib.Path, snapshot: float, steps: int, elbo: float, inherited: bool = False
) -> None:
    _python(
        _WORKER, directory, snapshot, steps, elbo, inherited_dir=directory if inherited else None
    )


def _aggregate(directory: pathlib.Path) -> str:
    """The exposition of every process's values in `directory`, as the driver serves it."""
    registry = CollectorRegistry()
    metrics.multiprocess.MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry).decode()


def test_worker_processes_are_aggregated(tmp_path: pathlib.Path) -> None:
    # A driver-like process switching after import, then a worker inheriting the directory.
    _run_worker(tmp_path, snapshot=100.0, steps=3, elbo=-150.0)
    _run_worker(tmp_path, snapshot=200.0, steps=5, elbo=-120.0, inherited=True)  # later
    assert len(list(tmp_path.glob("counter_*.db"))) == 2  # one file per process

    text = _aggregate(tmp_path)
    # Counters and histograms are summed over processes ...
    assert _value(text, "aevb_examples_total", model="shared") == 800
    assert _value(text, "aevb_train_steps_total", model="shared") == 8
    assert _value(text, "aevb_negative_elbo_nats_count", model="shared") == 800
    assert _value(text, "aevb_records_rejected_total", model="shared", reason="wrong_width") == 4
    # ... gauges report the most recently set value, whichever process set it.
    assert _value(text, "aevb_elbo_nats", model="shared") == -120.0
    assert _value(text, "aevb_last_snapshot_timestamp_seconds", model="shared") == 200.0


def test_multiprocess_mode_cannot_be_chosen_after_metrics_exist(tmp_path: pathlib.Path) -> None:
    script = (
        "import sys; from pipeline.outputs import metrics; metrics.families(); "
        "print(metrics.use_multiprocess_dir(sys.argv[1]), metrics.multiprocess_dir())"
    )
    assert _python(script, tmp_path) == ["False", "None"]
    # Chosen before any metric exists, and again by a second job in the same process: its
    # values go on to the same file (mapped once), exported with the first job's.
    script = (
        "import sys; from pipeline.outputs import metrics; "
        "first = metrics.use_multiprocess_dir(sys.argv[1]); "
        "metrics.families().examples.labels(model='first').inc(); "
        "again = metrics.use_multiprocess_dir(sys.argv[1]); "
        "metrics.families().examples.labels(model='again').inc(2); print(first, again)"
    )
    assert _python(script, tmp_path) == ["True", "True"]
    assert len(list(tmp_path.glob("counter_*.db"))) == 1
    text = _aggregate(tmp_path)
    assert _value(text, "aevb_examples_total", model="first") == 1
    assert _value(text, "aevb_examples_total", model="again") == 2


# After the imports and the two functions above.
_TWINS = """
if sys.argv[1] == "ours":  # switched after import, as the driver does
    assert metrics.use_multiprocess_dir(sys.argv[2])
    for family in metrics.families().all():
        _exercise(family, family)
else:  # prometheus-client's own: the directory was set before prometheus-client's import
    registry = CollectorRegistry()
    for family in metrics.Families(registry=None, values=values.MutexValue).all():
        _exercise(_prometheus_client_twin(family, registry), family)
"""


def test_multiprocess_files_are_prometheus_client_ones(tmp_path: pathlib.Path) -> None:
    """Multiprocess mode: the files, aggregated, read as prometheus-client's own metrics'."""
    script = "\n".join(
        [
            "import sys",
            "import numpy as np",
            "from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values",
            "from pipeline.outputs import metrics, prometheus_families",
            inspect.getsource(_prometheus_client_twin),
            inspect.getsource(_exercise),
            _TWINS,
        ]
    )
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    _python(script, "ours", tmp_path / "ours")
    _python(script, "theirs", tmp_path / "theirs", inherited_dir=tmp_path / "theirs")
    ours, theirs = _aggregate(tmp_path / "ours"), _aggregate(tmp_path / "theirs")
    assert _samples(ours) == _samples(theirs)  # names, labels, values
    assert _value(ours, "aevb_negative_elbo_nats_count", model="model-1") == 11
    assert {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(ours)} == {
        f.name: (f.type, f.documentation) for f in text_string_to_metric_families(theirs)
    }


# --- serving and pushing --------------------------------------------------------------------


def test_serve_metrics_on_loopback() -> None:
    metrics.PrometheusObserver().on_open("served", last_snapshot_unix=5.0)
    server = metrics_export.serve_metrics("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        assert _value(text, "aevb_last_snapshot_timestamp_seconds", model="served") == 5.0
    finally:
        server.shutdown()
        server.server_close()


class FakePushgateway:
    """Records the requests a Pushgateway would get."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                gateway.requests.append(("PUT", self.path, self.rfile.read(length).decode()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pushgateway():
    gateway = FakePushgateway()
    yield gateway
    gateway.close()


def test_push_groups_by_job_and_model(pushgateway: FakePushgateway) -> None:
    observer = metrics.PrometheusObserver()
    for key in ("push-a", "push-b"):
        observer.on_open(key, last_snapshot_unix=1.0)
    observer.on_record(_record("push-a", 4))
    pushed = metrics_export.push_once(pushgateway.url, job="aevb-batch")
    assert {"push-a", "push-b"} <= set(pushed)
    by_path = {path: body for _, path, body in pushgateway.requests}
    body_a = by_path["/metrics/job/aevb-batch/model/push-a"]
    body_b = by_path["/metrics/job/aevb-batch/model/push-b"]
    assert _value(body_a, "aevb_examples_total", model="push-a") == 4
    assert _value(body_b, "aevb_examples_total", model="push-b") == 0
    # Each group holds its own model's series only; the job's aggregates have their own.
    assert all(dict(labels).get("model") == "push-a" for _, labels in _samples(body_a))
    fleet = by_path["/metrics/job/aevb-batch"]
    assert _value(fleet, "aevb_fleet_examples_total") >= 4
    assert all("model" not in dict(labels) for _, labels in _samples(fleet))


def test_pusher_pushes_on_an_interval_and_at_the_end(pushgateway: FakePushgateway) -> None:
    metrics.PrometheusObserver().on_open("interval", last_snapshot_unix=1.0)
    pusher = metrics_export.MetricsPusher(pushgateway.url, job="aevb", interval=0.05).start()
    deadline = time.monotonic() + 10
    while pusher.pushes < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pusher.pushes >= 2
    pusher.stop()
    final = pusher.pushes
    assert final >= 3  # the interval pushes, then the final one
    assert not pusher._thread.is_alive()


def test_pusher_survives_an_unreachable_gateway() -> None:
    metrics.PrometheusObserver().on_open("unreachable", last_snapshot_unix=1.0)
    pusher = metrics_export.MetricsPusher("http://127.0.0.1:9", job="aevb", interval=60)
    pusher.stop()  # never started: only the final push, which fails
    assert pusher.failures == 1 and pusher.pushes == 0


# --- the Beam job's counters ----------------------------------------------------------------


def test_dead_letters_count_in_prometheus_and_beam(tmp_path: pathlib.Path) -> None:
    letters = [
        DeadLetter("a.csv", "non_numeric", "cell", "line 2: x", 2),
        DeadLetter("b.npy", "wrong_width", "3 values", "row 0: 1,2,3", 0),
        DeadLetter("b.npy", "wrong_width", "3 values", "row 1: 1,2,3", 1),
    ]
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = (
        pipeline
        | beam.Create(letters)
        | WriteDeadLetters(str(tmp_path), model_key="letters", prometheus=True)
    )
    result = pipeline.run()
    result.wait_until_finish()
    text = metrics.generate_latest().decode()
    assert _value(text, "aevb_records_rejected_total", model="letters", reason="wrong_width") == 2
    assert _value(text, "aevb_records_rejected_total", model="letters", reason="non_numeric") == 1
    for reason in REASONS:  # every reason's series exists, at 0 when unused
        assert ("aevb_records_rejected_total", (("model", "letters"), ("reason", reason))) in (
            _samples(text)
        )
    counters = result.metrics().query(MetricsFilter().with_namespace("aevb"))["counters"]
    beam_counts = {c.key.metric.name: c.committed for c in counters if c.committed}
    assert beam_counts == {
        beam_counter_name("aevb_records_rejected_total", "wrong_width"): 2,
        beam_counter_name("aevb_records_rejected_total", "non_numeric"): 1,
    }


def test_trainer_counts_in_prometheus_and_beam_alike(tmp_path: pathlib.Path) -> None:
    import vae
    from pipeline.train.trainer import TrainVAE

    config = vae.VAEConfig(input_dim=8, latent_dim=2, hidden_dim=8, batch_size=10)
    data = (np.random.default_rng(0).random((95, 8)) > 0.5).astype(np.float32)
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = (
        pipeline
        | beam.Create([("trainer-m", data[:50]), ("trainer-m", data[50:])])
        | TrainVAE(
            config,
            str(tmp_path),
            observer_factories=[metrics.PrometheusObserver],
            drift=None,
        )
    )
    result = pipeline.run()
    result.wait_until_finish()
    text = metrics.generate_latest().decode()
    assert _value(text, "aevb_examples_total", model="trainer-m") == 95
    assert _value(text, "aevb_train_steps_total", model="trainer-m") == 10  # 9 full, 1 partial
    assert _value(text, "aevb_snapshots_total", model="trainer-m") == 1  # end of input
    counters = result.metrics().query(MetricsFilter().with_namespace("aevb"))["counters"]
    beam_counts = {c.key.metric.name: c.committed for c in counters}
    assert beam_counts["examples_total"] == 95
    assert beam_counts["train_steps_total"] == 10
    assert beam_counts["snapshots_total"] == 1
    snapshot = json.loads(
        (tmp_path / "snapshots" / "trainer-m" / "1" / "assets.extra" / "aevb.json").read_text()
    )
    assert _value(text, "aevb_last_snapshot_timestamp_seconds", model="trainer-m") == (
        pytest.approx(snapshot["created_unix_seconds"])
    )
