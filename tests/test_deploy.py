"""Tests for deploy/: the Prometheus config and alert rules (with promtool), the Grafana
dashboard and provisioning, and that every metric they name is one the exporter exposes.

promtool comes with Debian's `prometheus` package, which `make test` installs when missing
(as root). These tests skip only when it is missing and cannot be installed (not root).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess

import apache_beam as beam
import numpy as np
import pytest
import yaml
from apache_beam.options.pipeline_options import PipelineOptions
from prometheus_client.parser import text_string_to_metric_families

from pipeline.jobs.options import AEVBOptions
from pipeline.jobs.train import build_training_pipeline
from pipeline.outputs import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "aevb.json"
METRIC_NAME = re.compile(r"\baevb_[a-z_]+")
# Recording rules' series: level:metric:operations.
RECORDED_NAME = re.compile(r"\baevb:[a-z_]+:[a-z_]+")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.geteuid() == 0:
            pytest.fail("promtool is missing although we are root: run `make prometheus`")
        pytest.skip("promtool not installed and not root (make prometheus installs it)")
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def test_prometheus_config_is_valid() -> None:
    out = _promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_rules_are_valid() -> None:
    out = _promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    out = _promtool("test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def _rules() -> list[dict]:
    document = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_required_alerts_exist_and_every_alert_is_unit_tested() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert {
        "AEVBBoundDrift",
        "AEVBStaleSnapshot",
        "AEVBHighRejectedRecords",
        "AEVBTrainerStalled",
        "AEVBFleetDrift",
        "AEVBFleetEvictionThrash",
    } <= alerts
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # tested firing, not only silent
    }
    assert tested == alerts
    # Every recorded series is checked by a PromQL test too.
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    queried = {
        case["expr"].split("{")[0]
        for test in tests["tests"]
        for case in test.get("promql_expr_test", [])
    }
    assert recorded and recorded <= queried


def test_the_dashboard_has_a_fleet_view_of_recorded_and_exposed_series() -> None:
    titles = [panel["title"] for panel in _dashboard()["panels"]]
    assert sum(title.startswith("Fleet:") for title in titles) >= 4
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    used = {name for expr in _dashboard_exprs() for name in RECORDED_NAME.findall(expr)}
    assert used and used <= recorded, used - recorded


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    dashboard = _dashboard()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    dashboard = _dashboard()
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for words in ("bound", "kl", "throughput", "rejected", "snapshot age", "drift"):
        assert words in titles, words
    annotations = [a for a in dashboard["annotations"]["list"] if "expr" in a]
    assert any("aevb_drift_detections_total" in a["expr"] for a in annotations)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # Every panel queries the data source variable, which provisioning resolves.
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])


def test_grafana_provisioning_files() -> None:
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    dashboards = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "aevb.yml").read_text()
    )
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]


# --- every metric named in rules and dashboard is exposed -----------------------------------


@pytest.fixture(scope="module")
def exposed_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names the exporter exposes after a short run of the real job (batch, files
    source with one bad file, default drift detector, a regime memory), in this process."""
    root = tmp_path_factory.mktemp("exposed")
    inputs = root / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    np.save(inputs / "good.npy", (rng.random((60, 8)) > 0.5).astype(np.float32))
    np.save(inputs / "bad.npy", np.ones((2, 3), np.float32))  # wrong width: a dead letter
    _run_small_job(root, "exposed", "--regime-memory=2")
    text = metrics.generate_latest().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # This job's model, or the job-level aggregates (no model label).
            if sample.labels.get("model", "exposed") == "exposed":
                names.add(sample.name)
    return names


def _run_small_job(root: pathlib.Path, model_key: str, *extra_flags: str) -> None:
    """The real training job, batch, in this process, on the .npy files of `root/in`."""
    flags = [
        "--runner=FnApiRunner",
        f"--source=files:{root / 'in'}/*.npy",
        "--input-dim=8",
        "--likelihood=bernoulli",
        "--hidden=8",
        "--latent-dim=2",
        "--batch-size=10",
        f"--output={root / 'run'}",
        f"--model-key={model_key}",
        "--metrics-port=0",  # metrics on (the server itself is run_training's business)
        *extra_flags,
    ]
    options = PipelineOptions(flags)
    pipeline = beam.Pipeline(options=options)
    build_training_pipeline(pipeline, options.view_as(AEVBOptions))
    pipeline.run().wait_until_finish()


def _referenced(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def test_exporter_exposes_the_core_metrics(exposed_names: set[str]) -> None:
    required = {
        "aevb_elbo_nats",
        "aevb_reconstruction_log_likelihood_nats",
        "aevb_kl_nats",
        "aevb_negative_elbo_nats_bucket",
        "aevb_examples_total",
        "aevb_train_steps_total",
        "aevb_skipped_steps_total",
        "aevb_records_rejected_total",
        "aevb_step_seconds_bucket",
        "aevb_snapshots_total",
        "aevb_last_snapshot_timestamp_seconds",
        "aevb_drift_detections_total",
        "aevb_drift_statistic",
        "aevb_fleet_keys_in_memory",
        "aevb_fleet_keys_trained",
        "aevb_fleet_sessions_opened_total",
        "aevb_fleet_evictions_total",
        "aevb_fleet_examples_total",
        "aevb_fleet_drift_detections_total",
        "aevb_fleet_keys_drifting",
        "aevb_fleet_keys_by_negative_elbo_nats",
    }
    assert required <= exposed_names


@pytest.mark.parametrize("source", ["alerts.yml", "dashboard"])
def test_every_metric_named_is_exposed(source: str, exposed_names: set[str]) -> None:
    if source == "alerts.yml":
        exprs = [rule["expr"] for rule in _rules()]
        exprs += [str(v) for rule in _rules() for v in rule.get("annotations", {}).values()]
    else:
        exprs = _dashboard_exprs()
    referenced = _referenced(exprs)
    assert referenced, "no aevb_ metric found: has the naming changed?"
    # A histogram's name in PromQL is its _bucket/_sum/_count series; the exposition has
    # exactly those sample names, so a referenced name must be one of them.
    missing = sorted(referenced - exposed_names)
    assert not missing, f"{source} names metrics the exporter does not expose: {missing}"


def test_names_are_compared_with_their_suffixes(exposed_names: set[str]) -> None:
    # PromQL names a histogram by its series (_bucket, _sum, _count); the regex keeps the
    # suffix and the exposition lists exactly those series, never the bare family name.
    expr = "histogram_quantile(0.5, rate(aevb_step_seconds_bucket[5m])) / aevb_step_seconds"
    assert _referenced([expr]) == {"aevb_step_seconds_bucket", "aevb_step_seconds"}
    assert "aevb_step_seconds_bucket" in exposed_names
    assert "aevb_step_seconds_count" in exposed_names
    assert "aevb_step_seconds" not in exposed_names


def test_a_job_with_per_key_metrics_none_exposes_only_the_aggregates(tmp_path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    np.save(inputs / "rows.npy", (rng.random((60, 8)) > 0.5).astype(np.float32))
    before = _fleet_examples(metrics.generate_latest().decode())
    _run_small_job(tmp_path, "fleet-only", "--per-key-metrics=none")
    text = metrics.generate_latest().decode()
    per_key = {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == "fleet-only"
    }
    # Only the dead letters' counter is kept per key (it is created at the job's start).
    assert per_key <= {"aevb_records_rejected_total", "aevb_records_rejected_created"}, per_key
    assert _fleet_examples(text) - before == 60


def _fleet_examples(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aevb_fleet_examples_total":
                return sample.value
    return 0.0
