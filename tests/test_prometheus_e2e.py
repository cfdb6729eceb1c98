"""End to end with a real Prometheus: a streaming job's bound drifts, AEVBBoundDrift fires.

Debian's `prometheus` runs on loopback with a temporary config that scrapes the trainer
every second and loads the project's own deploy/prometheus/alerts.yml. `aevb train
--streaming` watches a folder: MNIST digits 0-4 first, then (once those are trained and the
rules evaluated) inverted images. Through Prometheus's HTTP API the test sees the bound
series, AEVBBoundDrift inactive before the switch, and pending or firing after it.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime

import numpy as np
import pytest

from benchmarks.services import stop
from pipeline.ingest.datasets import load_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
AEVB = pathlib.Path(sys.executable).parent / "aevb"
MODEL = "e2e"
BEFORE = 20_000  # digits 0-4 trained before the switch
AFTER = 5_000  # inverted images after it

pytestmark = pytest.mark.slow


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.geteuid() == 0:
            pytest.fail(f"{name} is missing although we are root: run `make prometheus`")
        pytest.skip(f"{name} not installed and not root (make prometheus installs it)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(what: str, check, timeout: float, interval: float = 0.5, on_timeout=None):
    """check() until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            details = on_timeout() if on_timeout else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details}")
        time.sleep(interval)


class Prometheus:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def get(self, path: str, **params) -> dict:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            document = json.load(response)
        assert document["status"] == "success", document
        return document["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def rule(self, name: str) -> dict:
        for group in self.get("/api/v1/rules")["groups"]:
            for rule in group["rules"]:
                if rule.get("name") == name:
                    return rule
        raise AssertionError(f"rule {name} not loaded")

    def alerts(self, name: str) -> list[dict]:
        return [
            a
            for a in self.get("/api/v1/alerts")["alerts"]
            if a["labels"].get("alertname") == name and a["labels"].get("model") == MODEL
        ]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def prometheus(tmp_path: pathlib.Path):
    binary = _binary("prometheus")
    metrics_port, web_port = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML: no templating library needed
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {
                        "job_name": "aevb",
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{web_port}"
    try:
        _poll(
            "Prometheus to be ready",
            lambda: process.poll() is None and _ready(f"{base_url}/-/ready"),
            timeout=30,
            on_timeout=lambda: (tmp_path / "prometheus.log").read_text(),
        )
        yield Prometheus(base_url), metrics_port
    finally:
        stop(process, timeout=20)
        log.close()


def _write_atomically(path: pathlib.Path, array: np.ndarray) -> None:
    staging = path.with_suffix(".staging")  # outside the watched *.npy glob
    with staging.open("wb") as handle:
        np.save(handle, array)
    os.rename(staging, path)


def test_bound_drift_alert_follows_a_distribution_switch(prometheus, tmp_path) -> None:
    server, metrics_port = prometheus
    data_dir = os.environ.get("AEVB_DATA_DIR") or None
    dataset = load_dataset("mnist", data_dir, fallback="mnist-5k")
    # Repeated if short: the packaged 5000-image fallback holds only 1998 of these digits.
    digits = np.resize(dataset.train[dataset.train_labels < 5], (BEFORE, dataset.input_dim))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(0, BEFORE, 5000):
        _write_atomically(inputs / f"digits-{i:06d}.npy", digits[i : i + 5000])
    assert sum(len(np.load(p)) for p in inputs.glob("*.npy")) == BEFORE

    log_path = tmp_path / "trainer.log"
    log = log_path.open("w")
    trainer = subprocess.Popen(
        [
            str(AEVB),
            "train",
            "--streaming",
            f"--source=files:{inputs}/*.npy",
            "--input-dim=784",
            "--likelihood=bernoulli",
            "--hidden=200",
            "--latent-dim=10",
            f"--model-key={MODEL}",
            f"--output={tmp_path / 'run'}",
            "--poll-interval-seconds=0.5",
            "--max-batch-wait-seconds=1",
            f"--metrics-port={metrics_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )

    def trainer_log() -> str:
        return log_path.read_text()[-5000:]

    def examples() -> float:
        assert trainer.poll() is None, "trainer exited:\n" + trainer_log()
        return server.value(f'aevb_examples_total{{model="{MODEL}"}}') or 0.0

    try:
        # Before the switch: digits 0-4 trained, the bound series scraped, rules evaluated.
        _poll(f"{BEFORE} examples", lambda: examples() >= BEFORE, 120, on_timeout=trainer_log)
        trained_at = time.time()
        bound = server.query(f'aevb_elbo_nats{{model="{MODEL}"}}')
        assert bound and -543 < float(bound[0]["value"][1]) < 0  # learning, past untrained
        assert server.query(f'aevb_kl_nats{{model="{MODEL}"}}')
        rule = _poll(
            "a rule evaluation after the pre-switch data was scraped",
            lambda: (
                (r := server.rule("AEVBBoundDrift")) and _evaluated_after(r, trained_at + 1.0) and r
            ),
            30,
        )
        assert rule["state"] == "inactive", rule
        assert server.alerts("AEVBBoundDrift") == []
        assert server.value(f'sum(aevb_drift_detections_total{{model="{MODEL}"}})') == 0

        # The switch: inverted images.
        _write_atomically(inputs / "zz-inverted.npy", 1.0 - digits[:AFTER])
        active = _poll(
            "AEVBBoundDrift to become pending or firing",
            lambda: [
                a for a in server.alerts("AEVBBoundDrift") if a["state"] in ("pending", "firing")
            ],
            90,
            on_timeout=trainer_log,
        )
        assert active[0]["labels"]["job"] == "aevb"
        detections = server.value(f'sum(aevb_drift_detections_total{{model="{MODEL}"}})')
        assert detections is not None and detections >= 1
        # The detection's snapshot follows (a SavedModel export takes a second or two).
        _poll(
            "the drift snapshot",
            lambda: (server.value(f'aevb_snapshots_total{{model="{MODEL}"}}') or 0) >= 1,
            30,
            on_timeout=trainer_log,
        )
        assert "drift detected by" in log_path.read_text()
    finally:
        if trainer.poll() is None:
            stop(trainer, timeout=60, sig=signal.SIGINT)  # drain: final checkpoint and snapshot
        log.close()


def _evaluated_after(rule: dict, unix_seconds: float) -> bool:
    stamp = rule.get("lastEvaluation", "")
    if not stamp or stamp.startswith("0001"):
        return False
    # RFC 3339 in UTC with nanoseconds, e.g. 2026-11-21T06:20:09.813123456Z
    date, _, fraction = stamp.rstrip("Z").partition(".")
    moment = datetime.fromisoformat(date + "+00:00").timestamp()
    return moment + float("0." + (fraction.split("+")[0] or "0")) > unix_seconds
